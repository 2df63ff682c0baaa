#!/usr/bin/env python
"""Per-GPU memory plan (computed, not measured) for AnyFlow stage 1 and stage 2 on Wan2.1 1.3B / 14B.

What is counted, per GPU, in GiB (2^30 bytes):

* **base weights** -- one frozen copy shared by the generator, the fake score and the teacher (the real
  score is the base with no adapter active, i.e. the teacher is the base or merged into it). Exact
  parameter counts and dtypes come from a ``WanModel`` built on the meta device with ``bf16=True``
  (diffusers' fp32 modules -- time / delta embedders, adaLN tables, norms -- stay fp32).
  Tensor-parallel parameters (megatron ``tensor_model_parallel``) are divided by TP, the others
  (embedders, adaLN tables, head, row-parallel biases) are replicated on every rank.
* **LoRA adapters** (rank 256 on self-attention q/k/v/o, FFN, time and delta embedders; ``models.lora``
  layout): column-parallel linears keep A ``[groups*r, in]`` replicated and B ``[out/TP, r]`` sharded;
  row-parallel ones A ``[r, in/TP]`` sharded and B ``[out, r]`` replicated; plain linears both whole.
  A *trainable* adapter (generator; fake score in stage 2) costs 2 B (bf16 weight) + 4 B (fp32 grad
  buffer) + 12 B (fp32 master + Adam m, v) per parameter; the 12 B are divided by DP x CP with the
  distributed optimizer (``--no-dist-opt`` to keep them whole). The generator's EMA is one fp32 copy
  (4 B). ``--teacher-adapter`` adds a frozen bf16 teacher adapter (2 B) instead of a merged teacher.
* **activations** of every forward that keeps its graph, bf16 (2 B per element). For a Wan block with
  ``s`` tokens on the rank after the context-parallel split, micro-batch ``b``, hidden ``h``, FFN ``F``,
  ``C`` = 512 text tokens, TP size ``t``, LoRA rank ``r``, with sequence parallelism (the default when
  ``t > 1``; ``--no-sp`` replicates the part outside the TP region), the elements kept for backward are:

  - outside the TP region (split by ``t`` under SP): 8 s b h -- for self-attention, cross-attention and
    FFN the norm input and the (modulated) norm output; the self-attention and FFN outputs that the
    adaLN gates multiply;
  - inside the TP region (always split by ``t``): 9 s b h (q, k before the qk RMSNorm; q, k, v after
    norm / RoPE and the output, as flash attention saves them; cross-attention q before / after its norm
    and output) + 2 s b F (GELU input and output) + 3 C b h (text k before its norm, k, v);
  - LoRA A outputs of the active adapter: (4 + 2 / t) s b r (q/k/v and fc1 see the gathered sequence);
  - flash-attention softmax statistics: 2 s b a / t fp32 values (self and cross).

  ``full`` recomputation keeps only each layer's input (s b h / t with SP) and recomputes one layer at a
  time in backward (that layer's full set is counted once as transient). ``selective`` recomputes the
  norm/modulation outputs that feed linears and the GELU output (drops 3 s b h and s b F). Attention
  itself is flash attention: no ``s^2`` term. Per forward with grad, the patch embedding, head and
  residual stream outside the blocks add 3 s b h / t.
* **transient**: one layer's recomputed activations (full recomputation) plus the attention backward
  workspace (dq, dk, dv, do bf16 and an fp32 dq accumulator: 12 s b h / t bytes; with CP, the Ulysses
  all-to-all buffers add 12 s b h / t bytes).
* **reserve**: CUDA context, NCCL buffers and allocator fragmentation (``--reserve-gib``, default 5).

Steps and their forwards with grad: stage 1 -- one (the conditional forward; the null and +/- finite
difference forwards run without grad). Stage 2 -- the generator step keeps up to 3 rollout segments
(``--grad-through chain``, the reference) or 2 (``no_grad_prefix``); the DMD score calls run without
grad; the stage-1 co-training loss is back-propagated separately (one more graph only with
``--stage1-same-graph``); the critic step keeps one fake-score forward. The peak is the larger step.

Not counted: text encoder and VAE (latents and text embeddings are precomputed), data-loader memory,
CUDA graphs. Tokens: ``frames`` video frames -> ``(frames - 1) / 4 + 1`` latent frames, ``H/8 x W/8``
latents, patch (1, 2, 2): 81 x 480 x 832 -> 21 x 60 x 104 -> 32,760 tokens.

Usage::

    python tools/memory_plan.py                        # headline: 14B and 1.3B on 8 x 80 GB and 1 x 141 GB
    python tools/memory_plan.py --preset wan2.1-14b --stage 2 --tp 8 --cp 1 --dp 1
    python tools/memory_plan.py --json                 # the same as JSON on stdout
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

GIB = float(1 << 30)
BF16 = 2
#: Usable memory of the cards the plan is made for (what ``nvidia-smi`` reports, in GiB).
H100_80GB_GIB = 79.6
H200_141GB_GIB = 139.0
TEXT_TOKENS = 512
PRESETS = ("wan2.1-1.3b", "wan2.1-14b")


# ------------------------------------------------------------------------------------------------
# parameter counts (meta-device model)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of one preset (whole model, TP = 1) split by how they shard and their size.

    Attributes:
        hidden, ffn, heads, layers: architecture.
        sharded_bytes: bytes of the tensor-parallel parameters (divided by TP per rank).
        replicated_bytes: bytes of the replicated parameters.
        sharded_params, replicated_params: the same as parameter counts.
        lora_sharded, lora_replicated: parameters of ONE rank-``lora_rank`` adapter that are / are not
            divided by TP.
        lora_rank: the adapter rank counted.
    """

    preset: str
    hidden: int
    ffn: int
    heads: int
    layers: int
    sharded_params: int
    replicated_params: int
    sharded_bytes: int
    replicated_bytes: int
    lora_rank: int
    lora_sharded: int
    lora_replicated: int

    @property
    def total_params(self) -> int:
        return self.sharded_params + self.replicated_params

    @property
    def lora_params(self) -> int:
        return self.lora_sharded + self.lora_replicated


def _quiet_imports():
    warnings.filterwarnings("ignore")
    import torch  # noqa: F401
    from megatron_anyflow.models.lora import DEFAULT_TARGETS, _kind, _match
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel
    return DEFAULT_TARGETS, _kind, _match, wan_config, WanModel


def lora_counts(model, rank: int, targets: Optional[Sequence[str]] = None):
    """``(sharded, replicated)`` parameter counts of one LoRA adapter on ``model`` at TP = 1.

    Same layout as ``models.lora.LoRALinear.add_adapter``: column-parallel ``A [groups*r, in]``
    replicated, ``B [groups, out/groups, r]`` sharded; row-parallel ``A [r, in]`` sharded, ``B [out, r]``
    replicated; ``nn.Linear``: both replicated.
    """
    default_targets, _kind, _match, _, _ = _quiet_imports()
    targets = default_targets if targets is None else targets
    sharded = replicated = 0
    for name, module in model.named_modules():
        if not _match(name, targets):
            continue
        kind = _kind(module)
        out_f, in_f = module.weight.shape
        groups = getattr(module, "lora_out_groups", (1, None))[0]
        a, b = groups * rank * in_f, out_f * rank
        if kind == "column":
            replicated, sharded = replicated + a, sharded + b
        elif kind == "row":
            sharded, replicated = sharded + a, replicated + b
        else:
            replicated += a + b
    return sharded, replicated


@functools.lru_cache(maxsize=8)
def model_counts(preset: str, lora_rank: int = 256) -> ModelCounts:
    """Exact counts from a ``WanModel`` of ``preset`` built on the meta device (bf16 params; < 1 s after
    the imports). Does not need torch.distributed / megatron parallel state.

    Raises:
        ValueError: unknown preset.
    """
    import torch

    _, _, _, wan_config, WanModel = _quiet_imports()
    cfg = wan_config(preset, perform_initialization=False, bf16=True)
    with torch.device("meta"):
        model = WanModel(cfg)
    sp = rp = sb = rb = 0
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()
        if getattr(p, "tensor_model_parallel", False):
            sp, sb = sp + p.numel(), sb + nbytes
        else:
            rp, rb = rp + p.numel(), rb + nbytes
    ls, lr = lora_counts(model, lora_rank)
    return ModelCounts(preset=preset, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                       heads=cfg.num_attention_heads, layers=cfg.num_layers, sharded_params=sp,
                       replicated_params=rp, sharded_bytes=sb, replicated_bytes=rb, lora_rank=lora_rank,
                       lora_sharded=ls, lora_replicated=lr)


# ------------------------------------------------------------------------------------------------
# tokens and activations
# ------------------------------------------------------------------------------------------------
def latent_tokens(frames: int, height: int, width: int) -> int:
    """Tokens of one sample: ``((frames - 1)/4 + 1) * (height/16) * (width/16)`` (Wan VAE 4x8x8, patch 1x2x2).

    Raises:
        ValueError: ``frames`` not of the form 4n + 1, or height / width not multiples of 16.
    """
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4n + 1 (Wan VAE), got {frames}")
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 16, got {height} x {width}")
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def layer_activation_bytes(s: int, b: int, h: int, ffn: int, heads: int, tp: int, sp: bool = True,
                           recompute: str = "none", lora_rank: int = 256, text_tokens: int = TEXT_TOKENS) -> float:
    """Bytes kept for backward by ONE Wan block (see the module docstring for the derivation).

    Args:
        s: tokens of one sample on this rank after the context-parallel split (before the SP split).
        b: micro-batch. h, ffn, heads: architecture. tp: tensor-parallel size. sp: sequence parallelism.
        recompute: ``"none"``, ``"selective"`` or ``"full"`` (``full``: the layer input only).
        lora_rank: rank of the active adapter (0: no LoRA).

    Raises:
        ValueError: unknown ``recompute``.
    """
    t_out = tp if (sp and tp > 1) else 1
    if recompute == "full":
        return BF16 * s * b * h / t_out
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    outside = 8 * s * b * h
    inside = 9 * s * b * h + 2 * s * b * ffn + 3 * text_tokens * b * h
    if recompute == "selective":
        outside -= 3 * s * b * h
        inside -= s * b * ffn
    lora = (4 + 2 / tp) * s * b * lora_rank
    stats = 2 * s * b * heads / tp * 4  # fp32 bytes
    return BF16 * (outside / t_out + inside / tp + lora) + stats


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------
@dataclass
class PlanConfig:
    """One configuration to plan. ``tp * cp * dp`` GPUs; see the module docstring for the accounting."""

    preset: str = "wan2.1-14b"
    stage: int = 2
    tp: int = 8
    cp: int = 1
    dp: int = 1
    sp: bool = True
    frames: int = 81
    height: int = 480
    width: int = 832
    micro_batch: int = 1
    recompute: str = "full"
    grad_through: str = "chain"
    stage1_same_graph: bool = False
    lora_rank: int = 256
    teacher_adapter: bool = False
    dist_opt: bool = True
    reserve_gib: float = 5.0
    gpu_gib: float = H100_80GB_GIB

    def check(self, counts: ModelCounts) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("tp", "cp", "dp", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if counts.heads % self.tp:
            raise ValueError(f"TP={self.tp} does not divide the {counts.heads} heads of {self.preset}")
        if self.grad_through not in ("chain", "no_grad_prefix"):
            raise ValueError(f"grad_through must be 'chain' or 'no_grad_prefix', got {self.grad_through!r}")
        latent_tokens(self.frames, self.height, self.width)  # validates the clip size


def plan(cfg: PlanConfig) -> Dict[str, object]:
    """Per-GPU memory of ``cfg``.

    Returns:
        dict with ``components`` (name -> GiB, in print order), ``total_gib``, ``fits`` (total <=
        ``gpu_gib``), ``tokens`` (per sample), ``tokens_per_rank`` (after CP), ``grad_forwards``,
        ``cp_attention`` (``"ulysses"`` when heads divide by TP*CP, else ``"ring"``) and ``config``.

    Raises:
        ValueError: invalid configuration (see :meth:`PlanConfig.check`).
    """
    counts = model_counts(cfg.preset, cfg.lora_rank)
    cfg.check(counts)
    h, F, L, a = counts.hidden, counts.ffn, counts.layers, counts.heads
    tp, cp, dp, b = cfg.tp, cfg.cp, cfg.dp, cfg.micro_batch
    tokens = latent_tokens(cfg.frames, cfg.height, cfg.width)
    s = math.ceil(tokens / (tp * cp)) * tp  # tokens on this CP rank (padded so SP divides)
    sp = cfg.sp and tp > 1

    comp: Dict[str, float] = {}
    comp["base weights (bf16, TP-sharded + replicated)"] = (counts.sharded_bytes / tp + counts.replicated_bytes) / GIB
    lora_local = counts.lora_sharded / tp + counts.lora_replicated
    shard = dp * cp if cfg.dist_opt else 1
    per_trainable = lora_local * (2 + 4 + 12 / shard)
    n_train = 1 if cfg.stage == 1 else 2
    comp[f"LoRA generator (bf16 + fp32 grad + fp32 master/Adam /{shard})"] = per_trainable / GIB
    if cfg.stage == 2:
        comp[f"LoRA fake score (bf16 + fp32 grad + fp32 master/Adam /{shard})"] = per_trainable / GIB
    comp["generator EMA (fp32)"] = lora_local * 4 / GIB
    if cfg.teacher_adapter and cfg.stage == 2:
        comp["LoRA teacher (frozen bf16)"] = lora_local * 2 / GIB

    per_layer = layer_activation_bytes(s, b, h, F, a, tp, sp, cfg.recompute, cfg.lora_rank)
    outside_layers = BF16 * 3 * s * b * h / tp
    stack = L * per_layer + outside_layers
    if cfg.stage == 1:
        grad_forwards = 1
        act_label = "activations: 1 forward with grad"
    else:
        gen = 3 if cfg.grad_through == "chain" else 2
        if cfg.stage1_same_graph:
            gen += 1
        grad_forwards = max(gen, 1)  # the critic step keeps 1
        act_label = f"activations: {gen} generator forwards with grad ({cfg.grad_through})"
    comp[act_label] = grad_forwards * stack / GIB
    transient = BF16 * 12 / 2 * s * b * h / tp  # attention backward workspace (12 s b h / t bytes)
    if cp > 1:
        transient += 12 * s * b * h / tp
    if cfg.recompute == "full":
        transient += layer_activation_bytes(s, b, h, F, a, tp, sp, "none", cfg.lora_rank)
    comp["transient: recomputed layer + attention workspace"] = transient / GIB
    comp["reserve (CUDA context, NCCL, fragmentation)"] = cfg.reserve_gib
    total = sum(comp.values())
    return {
        "config": asdict(cfg),
        "gpus": tp * cp * dp,
        "tokens": tokens,
        "tokens_per_rank": s,
        "grad_forwards": grad_forwards,
        "cp_attention": "ulysses" if a % (tp * cp) == 0 else "ring",
        "components": comp,
        "total_gib": total,
        "fits": total <= cfg.gpu_gib,
        "trainable_adapters": n_train,
        "params": {"base": counts.total_params, "lora_per_adapter": counts.lora_params},
    }


_RECOMPUTE_ORDER = ("none", "selective", "full")


def search_layouts(preset: str, stage: int, gpus: int = 8, gpu_gib: float = H100_80GB_GIB,
                   **kw) -> List[Dict[str, object]]:
    """Every (TP, CP, DP) with TP * CP * DP = ``gpus`` (TP dividing the heads) and every recomputation,
    sorted best first: fitting plans before the others, then least recomputation, then most data
    parallelism (throughput), then least memory."""
    counts = model_counts(preset, kw.get("lora_rank", 256))
    out = []
    for tp in (1, 2, 4, 8, 16):
        for cp in (1, 2, 4, 8, 16):
            if tp * cp > gpus or gpus % (tp * cp) or counts.heads % tp:
                continue
            for rc in _RECOMPUTE_ORDER:
                cfg = PlanConfig(preset=preset, stage=stage, tp=tp, cp=cp, dp=gpus // (tp * cp), recompute=rc,
                                 gpu_gib=gpu_gib, **kw)
                out.append(plan(cfg))
    out.sort(key=lambda p: (not p["fits"], _RECOMPUTE_ORDER.index(p["config"]["recompute"]),
                            -p["config"]["dp"], p["total_gib"]))
    return out


def search_clip(preset: str, stage: int, gpu_gib: float = H200_141GB_GIB,
                frames_options: Sequence[int] = (81, 61, 49, 33, 17), **kw) -> List[Dict[str, object]]:
    """One GPU (TP = CP = DP = 1): for each clip length and recomputation, the plan; longest fitting clip
    with least recomputation first."""
    out = []
    for fr in frames_options:
        for rc in _RECOMPUTE_ORDER:
            out.append(plan(PlanConfig(preset=preset, stage=stage, tp=1, cp=1, dp=1, frames=fr, recompute=rc,
                                       gpu_gib=gpu_gib, **kw)))
    out.sort(key=lambda p: (not p["fits"], -p["config"]["frames"],
                            _RECOMPUTE_ORDER.index(p["config"]["recompute"])))
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _layout(p) -> str:
    c = p["config"]
    return (f"{c['preset']} stage {c['stage']}: TP={c['tp']} CP={c['cp']} DP={c['dp']} SP={c['sp'] and c['tp'] > 1} "
            f"{c['frames']}x{c['height']}x{c['width']} ({p['tokens']} tokens, {p['tokens_per_rank']}/CP rank) "
            f"b={c['micro_batch']} recompute={c['recompute']}")


def format_plan(p) -> str:
    lines = [_layout(p), f"  {'component':68s} {'GiB/GPU':>9s}"]
    for k, v in p["components"].items():
        lines.append(f"  {k:68s} {v:9.2f}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':68s} {p['total_gib']:9.2f}   -> {verdict} in {p['config']['gpu_gib']} GiB")
    return "\n".join(lines)


def _row(p) -> Dict[str, object]:
    c = p["config"]
    return {"tp": c["tp"], "cp": c["cp"], "dp": c["dp"], "frames": c["frames"], "tokens": p["tokens"],
            "recompute": c["recompute"], "total_gib": round(p["total_gib"], 2), "fits": p["fits"]}


def headline(kw, frames: int = 81) -> Dict[str, object]:
    """The default report: both presets, stage 1 and 2, on 1 node of 8 x 80 GB (``frames``-frame clips,
    layout search) and on one 141 GB GPU (clip lengths 81..17 frames).

    Returns ``{"<preset>/stage<k>/<machine>": {"best": plan, "table": [rows]}}``; the 8 x 80 GB table has
    the least recomputation that fits for every layout, the 141 GB table the same for every clip length
    (where nothing fits, the mode with the smallest total).
    """
    res = {}

    def least_per(plans, key):
        rows = {}
        for p in plans:  # sorted best first: a fitting plan with the least recomputation comes first
            k = key(p["config"])
            if k not in rows or (not rows[k]["fits"] and p["total_gib"] < rows[k]["total_gib"]):
                rows[k] = p
        return [_row(p) for p in rows.values()]

    for preset in PRESETS:
        for stage in (1, 2):
            lay = search_layouts(preset, stage, 8, H100_80GB_GIB, frames=frames, **kw)
            clip = search_clip(preset, stage, H200_141GB_GIB, **kw)
            res[f"{preset}/stage{stage}/8x80GB"] = {
                "best": lay[0], "table": least_per(lay, lambda c: (c["tp"], c["cp"], c["dp"]))}
            res[f"{preset}/stage{stage}/1x141GB"] = {
                "best": clip[0], "table": sorted(least_per(clip, lambda c: c["frames"]), key=lambda r: -r["frames"])}
    return res


def _format_rows(rows) -> str:
    out = [f"    {'TP':>3s} {'CP':>3s} {'DP':>3s} {'frames':>6s} {'tokens':>7s} {'recompute':>10s} {'GiB':>8s}"]
    for r in rows:
        out.append(f"    {r['tp']:3d} {r['cp']:3d} {r['dp']:3d} {r['frames']:6d} {r['tokens']:7d} "
                   f"{r['recompute']:>10s} {r['total_gib']:8.1f}  {'fits' if r['fits'] else 'does not fit'}")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default=None, help="one preset (default: the headline report)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--tp", type=int, default=None, help="with --cp/--dp: plan this layout (else search)")
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the layout search")
    p.add_argument("--gpu-gib", type=float, default=None, help=f"usable GiB per GPU (80 GB card: {H100_80GB_GIB})")
    p.add_argument("--no-sp", action="store_true", help="no sequence parallelism")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--recompute", choices=_RECOMPUTE_ORDER, default="full")
    p.add_argument("--grad-through", choices=("chain", "no_grad_prefix"), default="chain")
    p.add_argument("--stage1-same-graph", action="store_true",
                   help="stage-2 co-training loss in the generator's graph (one more forward with grad)")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--teacher-adapter", action="store_true",
                   help="a frozen teacher adapter instead of a merged teacher")
    p.add_argument("--no-dist-opt", action="store_true", help="optimizer state not sharded over DP x CP")
    p.add_argument("--reserve-gib", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kw = dict(sp=not args.no_sp, micro_batch=args.micro_batch, grad_through=args.grad_through,
              stage1_same_graph=args.stage1_same_graph, lora_rank=args.lora_rank,
              teacher_adapter=args.teacher_adapter, dist_opt=not args.no_dist_opt, reserve_gib=args.reserve_gib)
    kw.update(height=args.height, width=args.width)
    if args.preset is None:
        res = headline(kw, frames=args.frames)
        if args.json:
            print(json.dumps(res, indent=1, default=str))
            return 0
        for key, r in res.items():
            print(f"=== {key}: best plan")
            print(format_plan(r["best"]))
            print("  least recomputation that fits, per " + ("layout:" if "8x80" in key else "clip length:"))
            print(_format_rows(r["table"]))
            print()
        return 0
    gpu_gib = args.gpu_gib if args.gpu_gib is not None else H100_80GB_GIB
    kw.update(frames=args.frames)
    if args.tp is not None:
        res = plan(PlanConfig(preset=args.preset, stage=args.stage, tp=args.tp, cp=args.cp, dp=args.dp,
                              recompute=args.recompute, gpu_gib=gpu_gib, **kw))
        print(json.dumps(res, indent=1, default=str) if args.json else format_plan(res))
        return 0
    res = search_layouts(args.preset, args.stage, args.gpus, gpu_gib, **kw)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return 0
    print(format_plan(res[0]))
    print("\nall layouts (best first):")
    for p in res:
        print(f"  {'fits ' if p['fits'] else 'no   '} {p['total_gib']:7.1f} GiB  {_layout(p)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
