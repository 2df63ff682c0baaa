"""State-dict conversion between diffusers' Wan / AnyFlow / AnyFlow-FAR transformers and `WanModel`.

"Full" state dicts hold unsharded tensors (TP = 1 layout); `shard_state_dict`
moves between the full layout and a tensor-parallel rank's shards using the parameters'
``tensor_model_parallel`` / ``partition_dim`` attributes (megatron-core's convention).

Name mapping (diffusers -> this project), i = block index:

    blocks.i.attn1.{to_q,to_k,to_v}   -> blocks.i.self_attention.linear_qkv  (rows head by head: q, k, v)
    blocks.i.attn1.to_out.0           -> blocks.i.self_attention.linear_proj
    blocks.i.attn1.norm_{q,k}         -> blocks.i.self_attention.{q,k}_layernorm
    blocks.i.attn2.to_q               -> blocks.i.cross_attention.linear_q
    blocks.i.attn2.{to_k,to_v}        -> blocks.i.cross_attention.linear_kv  (rows head by head: k, v)
    blocks.i.attn2.to_out.0           -> blocks.i.cross_attention.linear_proj
    blocks.i.attn2.norm_{q,k}         -> blocks.i.cross_attention.{q,k}_layernorm
    blocks.i.norm2                    -> blocks.i.cross_attn_norm
    blocks.i.ffn.net.0.proj           -> blocks.i.mlp.linear_fc1
    blocks.i.ffn.net.2                -> blocks.i.mlp.linear_fc2
    everything else (patch_embedding, far_patch_embedding (FAR), condition_embedder.*, scale_shift_table,
    proj_out, blocks.i.scale_shift_table) -> same name
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_anyflow.parallel.tensor_parallel import tp_rank, tp_world_size

StateDict = Dict[str, torch.Tensor]

_RENAMES = [  # (diffusers suffix, project suffix) inside blocks.i.
    ("attn1.to_out.0", "self_attention.linear_proj"),
    ("attn1.norm_q", "self_attention.q_layernorm"),
    ("attn1.norm_k", "self_attention.k_layernorm"),
    ("attn2.to_q", "cross_attention.linear_q"),
    ("attn2.to_out.0", "cross_attention.linear_proj"),
    ("attn2.norm_q", "cross_attention.q_layernorm"),
    ("attn2.norm_k", "cross_attention.k_layernorm"),
    ("norm2", "cross_attn_norm"),
    ("ffn.net.0.proj", "mlp.linear_fc1"),
    ("ffn.net.2", "mlp.linear_fc2"),
]
_FUSED = [  # (diffusers parts, project name)
    (("attn1.to_q", "attn1.to_k", "attn1.to_v"), "self_attention.linear_qkv"),
    (("attn2.to_k", "attn2.to_v"), "cross_attention.linear_kv"),
]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


HF_ANYFLOW = "AnyFlowTransformer3DModel"
HF_WAN = "WanTransformer3DModel"
HF_ANYFLOW_FAR = "AnyFlowFARTransformer3DModel"
# Defaults of diffusers' AnyFlowFARTransformer3DModel for the FAR keys a released (reference) config may omit.
FAR_DEFAULTS = dict(compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=(1, 3, 3, 3, 3, 3, 3, 2))
# Keys of the reference FAR class that diffusers' FAR class does not take (dropped on import, docs/design/far.md 7.3).
FAR_REFERENCE_ONLY = ("qk_norm", "added_kv_proj_dim", "init_far_model", "init_flowmap_model")


class ConversionError(ValueError):
    """A state dict does not match the model: missing / unexpected keys or a shape mismatch."""


def interleave_heads(parts: List[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Fuse [n*d, ...] tensors into [n*g*d, ...] rows ordered (head, part, d)."""
    n = parts[0].shape[0] // head_dim
    stacked = torch.stack([p.reshape(n, head_dim, *p.shape[1:]) for p in parts], dim=1)
    return stacked.reshape(n * len(parts) * head_dim, *parts[0].shape[1:])


def deinterleave_heads(fused: torch.Tensor, groups: int, head_dim: int) -> List[torch.Tensor]:
    """Inverse of `interleave_heads`."""
    n = fused.shape[0] // (groups * head_dim)
    x = fused.reshape(n, groups, head_dim, *fused.shape[1:])
    return [x[:, g].reshape(n * head_dim, *fused.shape[1:]).contiguous() for g in range(groups)]


def _check_fused_parts(named: List[Tuple[str, torch.Tensor]], head_dim: int, hidden_size: Optional[int],
                       into: str) -> None:
    """Raise `ConversionError` naming the first q/k/v part whose shape cannot be fused into ``into``."""
    first_key, first = named[0]
    if hidden_size is not None:
        expected = (hidden_size,) * first.dim() if first.dim() <= 2 else None
        source = f"hidden size {hidden_size}"
    else:
        expected, source = None, None
    if expected is None:
        expected, source = tuple(first.shape), f"the shape of {first_key}"
    for key, t in named:
        if tuple(t.shape) != tuple(expected):
            raise ConversionError(f"{key}: expected {tuple(expected)} ({source}; fused into {into}), "
                                  f"found {tuple(t.shape)}")
    if first.shape[0] % head_dim:
        raise ConversionError(f"{first_key}: {first.shape[0]} rows do not split into heads of "
                              f"attention_head_dim {head_dim} (fused into {into})")


def hf_to_megatron(hf: StateDict, head_dim: int, hidden_size: Optional[int] = None) -> StateDict:
    """Rename and fuse a diffusers `WanTransformer3DModel` / `AnyFlowTransformer3DModel` state dict.

    Args:
        hf: diffusers state dict (full tensors).
        head_dim: attention head dimension (``attention_head_dim``).
        hidden_size: when given, each q / k / v part must be ``(hidden_size, hidden_size)`` (weights)
            or ``(hidden_size,)`` (biases); otherwise the parts must match each other.
    Returns:
        a full (TP = 1) state dict of `WanModel`. Keys it does not know are passed through under their
        own name so that `check_state_dict` can report them as unexpected.
    Raises:
        ConversionError: a q / k / v part of the wrong shape (names the key, the expected and the
            found shape).
    """
    out: StateDict = {}
    used = set()
    blocks = sorted({int(m.group(1)) for k in hf for m in [_BLOCK.match(k)] if m})
    for i in blocks:
        for parts, name in _FUSED:
            for kind in ("weight", "bias"):
                keys = [f"blocks.{i}.{p}.{kind}" for p in parts]
                if all(k in hf for k in keys):
                    into = f"blocks.{i}.{name}.{kind}"
                    _check_fused_parts([(k, hf[k]) for k in keys], head_dim, hidden_size, into)
                    out[into] = interleave_heads([hf[k] for k in keys], head_dim)
                    used.update(keys)
    for k, v in hf.items():
        if k in used:
            continue
        m = _BLOCK.match(k)
        if m:
            i, mid, kind = m.groups()
            for src, dst in _RENAMES:
                if mid == src:
                    k = f"blocks.{i}.{dst}.{kind}"
                    break
        out[k] = v
    return out


def megatron_to_hf(sd: StateDict, head_dim: int) -> StateDict:
    """Inverse of `hf_to_megatron` on a full state dict (``_extra_state`` entries dropped)."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("_extra_state") or v is None:
            continue
        m = _BLOCK.match(k)
        if not m:
            out[k] = v
            continue
        i, mid, kind = m.groups()
        fused = [parts for parts, name in _FUSED if name == mid]
        if fused:
            for p, t in zip(fused[0], deinterleave_heads(v, len(fused[0]), head_dim)):
                out[f"blocks.{i}.{p}.{kind}"] = t
            continue
        for src, dst in _RENAMES:
            if mid == dst:
                k = f"blocks.{i}.{src}.{kind}"
                break
        out[k] = v
    return out


def model_full_shapes(model: torch.nn.Module) -> Dict[str, Tuple[Tuple[int, ...], torch.Tensor]]:
    """name -> (full unsharded shape, the local tensor) for the model's parameters and persistent buffers."""
    tp = tp_world_size()
    params = dict(model.named_parameters())
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v is None or k.endswith("_extra_state"):
            continue
        shape = list(v.shape)
        p = params.get(k)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= tp
        out[k] = (tuple(shape), v)
    return out


def check_state_dict(model: torch.nn.Module, full: StateDict, source: str = "checkpoint",
                     ignore: Iterable[str] = ()) -> None:
    """Raise `ConversionError` naming missing / unexpected keys and shape mismatches (full layout)."""
    ignore = tuple(ignore)
    expected = {k: s for k, (s, _) in model_full_shapes(model).items() if not k.startswith(ignore)}
    given = {k for k in full if not k.endswith("_extra_state") and not k.startswith(ignore)}
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    bad = [f"{k}: expected {expected[k]}, found {tuple(full[k].shape)}"
           for k in sorted(given & set(expected)) if tuple(full[k].shape) != expected[k]]
    msgs = []
    if missing:
        msgs.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        msgs.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if bad:
        msgs.append("shape mismatches: " + "; ".join(bad[:20]))
    if msgs:
        raise ConversionError(f"{source} does not match the model: " + " | ".join(msgs))


def shard_state_dict(model: torch.nn.Module, full: StateDict) -> StateDict:
    """This TP rank's slice of a full state dict, following each parameter's partition attributes."""
    tp, rank = tp_world_size(), tp_rank()
    params = dict(model.named_parameters())
    out = {}
    for k, v in full.items():
        p = params.get(k)
        if p is not None and getattr(p, "tensor_model_parallel", False) and tp > 1:
            v = v.chunk(tp, dim=p.partition_dim)[rank]
        out[k] = v
    return out


def load_full_state_dict(model: torch.nn.Module, full: StateDict, source: str = "checkpoint",
                         strict: bool = True) -> None:
    """Check ``full`` against ``model`` (full shapes) and copy this rank's shards into it."""
    if strict:
        check_state_dict(model, full, source)
    local = shard_state_dict(model, full)
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in local.items():
            if k in own and own[k] is not None:
                own[k].copy_(v.to(own[k].dtype))


def arch_from_hf_config(hf_cfg: dict) -> dict:
    """`WanConfig` architecture fields from a diffusers transformer ``config.json`` dict.

    Raises:
        ConversionError: unsupported class or features (image conditioning, no qk norm across heads).
    """
    cls = hf_cfg.get("_class_name")
    if cls not in (HF_ANYFLOW, HF_WAN, HF_ANYFLOW_FAR):
        raise ConversionError(f"config _class_name={cls!r}; expected {HF_ANYFLOW!r}, {HF_ANYFLOW_FAR!r} or {HF_WAN!r}")
    far = cls == HF_ANYFLOW_FAR
    if hf_cfg.get("image_dim") is not None or hf_cfg.get("added_kv_proj_dim") is not None:
        raise ConversionError("image-conditioned (I2V) Wan transformers (image_dim / added_kv_proj_dim set) are "
                              "not supported; convert a T2V checkpoint")
    if cls == HF_WAN and hf_cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ConversionError(f"qk_norm={hf_cfg.get('qk_norm')!r}; only 'rms_norm_across_heads' is supported")
    heads, hd = hf_cfg.get("num_attention_heads", 40), hf_cfg.get("attention_head_dim", 128)
    arch = dict(
        hidden_size=heads * hd, num_attention_heads=heads, num_layers=hf_cfg.get("num_layers", 40),
        ffn_hidden_size=hf_cfg.get("ffn_dim", 13824), in_channels=hf_cfg.get("in_channels", 16),
        out_channels=hf_cfg.get("out_channels", 16) or hf_cfg.get("in_channels", 16),
        patch_size=list(hf_cfg.get("patch_size", (1, 2, 2))), text_dim=hf_cfg.get("text_dim", 4096),
        freq_dim=hf_cfg.get("freq_dim", 256), rope_max_seq_len=hf_cfg.get("rope_max_seq_len", 1024),
        cross_attn_norm=hf_cfg.get("cross_attn_norm", True), layernorm_epsilon=hf_cfg.get("eps", 1e-6),
        delta_embedder=cls in (HF_ANYFLOW, HF_ANYFLOW_FAR),
    )
    if cls in (HF_ANYFLOW, HF_ANYFLOW_FAR):
        # The reference FAR class defaults gate_value to 0; released configs that omit it were trained
        # with diffusers' 0.25 (docs/design/far.md 7.3): fill diffusers' default.
        arch.update(delta_gate=hf_cfg.get("gate_value", 0.25), deltatime_type=hf_cfg.get("deltatime_type", "r"))
    if far:
        if hf_cfg.get("qk_norm", "rms_norm_across_heads") not in (None, "rms_norm_across_heads"):
            raise ConversionError(f"qk_norm={hf_cfg.get('qk_norm')!r}; only 'rms_norm_across_heads' is supported")
        arch["far"] = True
        for k, v in FAR_DEFAULTS.items():
            val = hf_cfg.get(k)
            val = v if val is None else val
            arch[k] = int(val) if k == "full_chunk_limit" else [int(x) for x in val]
    return arch


def far_config_defaults_filled(hf_cfg: dict) -> list:
    """What `arch_from_hf_config` assumes for a FAR config (a reference / released one) beyond what it
    states, for the converter's message: ``"key=value"`` for each FAR key it omits (filled with
    diffusers' default), then ``"key (ignored)"`` for each reference-only key it carries. Empty for a
    complete diffusers config."""
    filled = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in FAR_DEFAULTS.items()
              if hf_cfg.get(k) is None]
    if "gate_value" not in hf_cfg:
        filled.append("gate_value=0.25")
    return filled + [f"{k} (ignored)" for k in FAR_REFERENCE_ONLY if k in hf_cfg]


def hf_config_from_arch(arch: dict) -> dict:
    """diffusers ``config.json`` for `AnyFlowFARTransformer3DModel` (``far``), `AnyFlowTransformer3DModel`
    (with a delta embedder) or `WanTransformer3DModel` (without) from `WanConfig.arch_dict()`."""
    heads = arch["num_attention_heads"]
    common = dict(
        patch_size=list(arch["patch_size"]), num_attention_heads=heads,
        attention_head_dim=arch["hidden_size"] // heads, in_channels=arch["in_channels"],
        out_channels=arch["out_channels"], text_dim=arch["text_dim"], freq_dim=arch["freq_dim"],
        ffn_dim=arch["ffn_hidden_size"], num_layers=arch["num_layers"], cross_attn_norm=arch["cross_attn_norm"],
        eps=arch["layernorm_epsilon"], image_dim=None, rope_max_seq_len=arch["rope_max_seq_len"],
    )
    if arch.get("far"):
        return dict(_class_name=HF_ANYFLOW_FAR, **common, gate_value=arch["delta_gate"],
                    deltatime_type=arch["deltatime_type"], compressed_patch_size=list(arch["compressed_patch_size"]),
                    full_chunk_limit=arch["full_chunk_limit"], chunk_partition=list(arch["chunk_partition"]))
    if arch["delta_embedder"]:
        return dict(_class_name=HF_ANYFLOW, **common, gate_value=arch["delta_gate"],
                    deltatime_type=arch["deltatime_type"])
    return dict(_class_name=HF_WAN, **common, qk_norm="rms_norm_across_heads", added_kv_proj_dim=None,
                pos_embed_seq_len=None)


def lora_to_diffusers(model: torch.nn.Module, adapter: str, head_dim: int) -> Tuple[StateDict, dict]:
    """One adapter of a LoRA-wrapped `WanModel` (TP = 1) as a diffusers / PEFT transformer LoRA.

    Keys follow diffusers' ``load_lora_weights`` convention for the transformer:
    ``transformer.<diffusers module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r] (float32),
    module names by the mapping of `megatron_to_hf` (a fused ``linear_qkv`` / ``linear_kv`` gives one pair
    per part: its adapter already holds one A / B per q / k / v, see `megatron_anyflow.models.lora`).

    The scaling ``alpha / rank`` is folded into ``lora_B`` (``B' = (alpha / rank) B``, the same float32
    product this project's merge uses), and the returned PEFT config has ``lora_alpha == r``: the file
    means ``W + B' A`` under PEFT's metadata, under the convention "no alpha = rank" of diffusers / kohya /
    ComfyUI loaders alike, so no loader can apply the wrong scale.

    Args:
        model: a `WanModel` whose target linears are `LoRALinear` with ``adapter`` (TP = 1: full weights).
        adapter: the adapter's name (e.g. ``"generator"``).
        head_dim: attention head dimension (splits fused outputs).
    Returns:
        ``(state_dict, lora_config)``: the tensors without the ``transformer.`` prefix (as
        ``save_lora_weights(transformer_lora_layers=...)`` takes them) and the PEFT ``LoraConfig`` kwargs
        (``r``, ``lora_alpha``, ``target_modules``) for ``transformer_lora_adapter_metadata``.
    Raises:
        ValueError: no linear of ``model`` holds ``adapter``.
    """
    from megatron_anyflow.models import lora as L

    out: StateDict = {}
    rank = None
    for m in L.lora_modules(model):
        if adapter not in m.adapters:
            continue
        ad = m.adapters[adapter]
        rank = ad.rank
        # The diffusers module(s) of this linear, in group order, from the one name mapping.
        probe = megatron_to_hf({f"{m.name}.weight": torch.zeros(m.groups * head_dim, 1)}, head_dim)
        names = [k[: -len(".weight")] for k in probe]
        b = ad.lora_B.detach().float() * ad.scaling  # [groups, out, r]; exact when scaling is 1
        a = ad.lora_A.detach().float()
        for g, name in enumerate(names):
            out[f"{name}.lora_A.weight"] = a[g * rank:(g + 1) * rank].contiguous()
            out[f"{name}.lora_B.weight"] = b[g].contiguous()
    if rank is None:
        raise ValueError(f"no LoRA linear of the model holds adapter {adapter!r}")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in out})
    return out, {"r": rank, "lora_alpha": rank, "target_modules": targets}
