"""The per-GPU memory model (computed, not measured) for AnyFlow stage 1 and stage 2 on Wan2.1 1.3B / 14B and
Wan2.2 TI2V-5B.

What is counted, per GPU, in GiB (2^30 bytes):

* **base weights** -- one frozen copy shared by the generator, the fake score and the teacher (the real
  score is the base with no adapter active, i.e. the teacher is the base or merged into it). Exact
  parameter counts and dtypes come from a ``WanModel`` built on the meta device with ``bf16=True``
  (diffusers' fp32 modules -- time / delta embedders, adaLN tables, the cross-attention LayerNorm --
  stay fp32; the q / k RMSNorm weights are bf16).
  Tensor-parallel parameters (megatron ``tensor_model_parallel``) are divided by TP, the others
  (embedders, adaLN tables, head, row-parallel biases) are replicated on every rank.
* **LoRA adapters** (rank 256 on self-attention q/k/v/o, FFN, time and delta embedders; ``models.lora``
  layout): column-parallel linears keep A ``[groups*r, in]`` replicated and B ``[out/TP, r]`` sharded;
  row-parallel ones A ``[r, in/TP]`` sharded and B ``[out, r]`` replicated; plain linears both whole.
  A *trainable* adapter (generator; fake score in stage 2) costs 2 B (bf16 weight) + 4 B (fp32 grad
  buffer) + 12 B (fp32 master + Adam m, v) per parameter; the 12 B are divided by DP x CP with the
  distributed optimizer (``--no-dist-opt`` to keep them whole). The generator's EMA is one fp32 copy
  (4 B). ``--teacher-adapter`` adds a frozen bf16 teacher adapter (2 B) instead of a merged teacher.
* **merged no-grad LoRA** (``--lora-nograd-merge``, the trainer's default ``cache``): one merged copy
  ``W + s B A`` of every wrapped base weight (qkv, proj, fc1, fc2 in bf16 / TP; the time and delta
  embedders' linears in fp32, whole) per adapter that no-grad forwards use: the generator in stage 1
  (u_null, u_plus, u_minus); the generator (rollout prefix, critic rollout) and the fake score (DMD
  call) in stage 2 (+ a ``--teacher-adapter``). 2.2 GB per adapter at 1.3B, 19.7 GB / TP at 14B. Zero
  under FP8 (forced off) or ``off``; ``per-call`` keeps no copy but builds one weight-sized temporary
  (counted in transient).
* **activations** of every forward that keeps its graph, MEASURED-CALIBRATED: per layer
  ``b x (s x B_tok + B_fix)`` with ``s`` the tokens of one sample on the rank after the context-parallel
  split (`layer_saved_bytes_per_token`, `layer_saved_fixed_bytes`). What a Wan block saves in eager
  mode, read off the code and checked against ``measure/op_counter.py`` (``saved_tensors_hooks``, one
  count per storage) for every recompute setting in bf16 and fp32 by tests/test_memory_plan.py (exact
  on CPU at TP = 1; the TP / SP / Ulysses splits below are derived from the code, not measured). Per
  token, bf16 (``p`` = 2), hidden ``h``, FFN ``F``, ``n`` heads, LoRA rank ``r``, TP ``t``, ``to`` = ``t``
  under sequence parallelism else 1; LoRA training, frozen base (a frozen linear without an adapter
  saves nothing of its input):

  ==========================================================  =================================
  term (where it is saved)                                     bytes per token
  ==========================================================  =================================
  3 x ``F.layer_norm(x.float())``: fp32 input + mean + rstd    3 (4 h + 8) / to
  (adaLN of self-attn and FFN, affine LN of cross-attn)
  LoRA A GEMM inputs of qkv and fc1 (modulated norm outputs)   2 p h / to
  q / k RMSNorm (self): fp32 ``x.float()`` + rsqrt             2 x 4 h / t + 8  (fp32 runs: the
                                                               whole fused qkv, 12 h / t, + 8)
  q RMSNorm (cross): fp32 input + rsqrt                        4 h / t + 4
  self-attention kernel: q, k, v, output + fp32 lse            4 p h / t + 4 n / t
  (the output is also linear_proj's input: one storage)
  cross-attention kernel: q, output + lse                      2 p h / t + 4 n / t
  GELU input (fc1 output), fc2 input (GELU output)             2 p F / t
  LoRA A outputs (qkv 3 r, fc1 r gathered; proj, fc2 r / to)   p r (4 + 2 / to)
  Ulysses CP only: linear_proj input after the all-to-all      p h / t
  ==========================================================  =================================

  i.e. 40 h + 4 F + 12 r + 8 n + 36 bytes at TP = 1 in bf16 (1.3B: 100,484 B = 3.07 GiB per layer at
  32,760 tokens; of it 36,996 B fp32: the norm intermediates, 37 %). Recompute settings (the trainer's
  ``--recompute-granularity`` / ``--recompute-policy`` / ``--recompute-modules``):

  - ``full``: the block input only, p h / to (one layer's whole set is rematerialised in backward:
    transient);
  - ``selective`` + ``save-attention`` (the trainer's default policy): self-attention's q, k, v,
    output and lse + the block input, 4 p h / t + 4 n / t + p h / to (the rest is recomputed; transient
    as for full);
  - ``selective`` + ``modules core_attn``: drops the self lse and cross-attention's output and lse
    (the checkpoints keep their inputs q, k, v; linear_proj still saves the self-attention output);
  - ``selective`` + ``modules mlp``: drops the GELU / fc2 inputs and fc1's / fc2's LoRA A outputs.

  Fixed per layer and forward (``B_fix``, none / modules only): the LoRA weights cast to bf16 for the
  input gradient (A of qkv / proj / fc1 / fc2, B of proj / fc1 / fc2, the block-structured ``s B`` of
  qkv ``[3 h / t, 3 r]``: ~26 MB per layer at 14B TP = 4), the text k / v (2 x 512 x p h / t) and the
  modulation (32 h B per latent frame). Outside the blocks (not measured): 6 h / to bytes per token
  (the head's fp32 LayerNorm input and a residual copy). ``--compile`` is an ESTIMATE (inductor's
  saved set is not measured here and may differ): the fp32 norm inputs become bf16 (-12 h at TP = 1);
  the eager figure is the default. FP8 (``--fp8``, te backend) is planned with the same bf16 figures
  (TE's saved set is not measured; with full recompute only the transient depends on it) and rules out
  the save-attention policy (WanModel rejects it), as the model does.
* **transient**: with full recomputation or save-attention, one layer's rematerialised set (its
  no-recompute bytes less what was kept); the attention backward workspace (dq, dk, dv, do bf16 and an
  fp32 dq accumulator: 12 s b h / t bytes; with CP, the Ulysses all-to-all buffers add 12 s b h / t
  bytes); with a merged no-grad LoRA, the largest merge's fp32 ``s B A`` (+ its result per call).
* **reserve**: CUDA context, NCCL buffers and allocator fragmentation (``--reserve-gib``, default 5).

Steps and their forwards with grad, as ``training/`` runs them: stage 1 -- one (the conditional
forward; the null and +/- finite-difference forwards run without grad). Stage 2 -- the co-trained
stage-1 loss is backpropagated BEFORE the rollout (``stage2.Stage2._generator_loss``), so its graph is
never alive with the rollout's; the generator's rollout keeps up to 3 segments (``--grad-through
chain``, the reference) or 2 (``no_grad_prefix``); the DMD score calls run without grad; the critic step
keeps one fake-score forward, alive together with the next rollout only with ``--overlap-critic``
(side stream: 3 + 1). The peak is the largest of these.

**AnyFlow-FAR** (``--model far``, the causal model; docs/design/far.md 1.2, 1.6, 2, 4.3): token counts come from
`models.wan.far.FarLayout` at the clip's latent size and chunk partition (default the recipe's
(1, 3, 3, 3, 3, 3, 3, 2), cut to shorter clips), each FAR sequence padded to a multiple of CP x SP as the
model pads it, heads divisible by TP x CP (the FAR attention runs after the Ulysses exchange).

* Stage 1: the teacher-forcing forward over n chunks (compressed context, full-resolution targets and
  their clean copies: 21,840 tokens at n = 3 .. 31,980 at n = 7, 30,030 at n = 8 at 480p) keeps its graph
  for the longest n; the grouped attention attends a query group's several key ranges one by one and
  merges them by the log-sum-exp (`models.wan.range_attention`), so it saves what the bidirectional
  layer's kernel saves per token (q, k, v, output, lse) and no key / value copy; it adds only, at CP = 1
  without full recompute, the save-attention policy or a core-attention checkpoint, the concatenated
  attention output (the groups' own outputs are saved by the kernel). With ``--far-bidirectional-prob``
  > 0 the bidirectional branch (the whole clip, 32,760 tokens) has its own graph: ``training/stages.py``
  backpropagates the causal branch before the bidirectional forward (the reference's two backwards), so
  the larger of the two governs.
* Stage 2: the bidirectional plan (the rollout's chunk steps have the clip's 32,760 query tokens per
  segment; fixed per-forward bytes once per step call: chunks x segments) plus **the KV caches alive
  during the rollout**: every graph of a chunk step references the cache it read until the DMD backward,
  so the caches of all prefixes are alive at once (after chunks 0..6: 1,560 + 6,240 + ... + 14,430 =
  68,250 tokens at 480p) x layers x 2 (K, V) x hidden / (TP x CP) x 2 bytes (bf16), whatever the
  recompute setting: a step attends to the cache and its chunk as two key ranges merged by the lse, so
  it keeps no ``cat(cache, k / v)`` copy. Printed for inference: the largest single cache (14,430 tokens).

Not counted: text encoder and VAE (latents and text embeddings are precomputed), data-loader memory,
CUDA graphs. Tokens: ``frames`` video frames -> ``(frames - 1) / 4 + 1`` latent frames, ``H/8 x W/8``
latents, patch (1, 2, 2): 81 x 480 x 832 -> 21 x 60 x 104 -> 32,760 tokens (Wan2.2 TI2V-5B: H/16 x W/16
latents of the Wan2.2 VAE, 121 x 704 x 1280 -> 31 x 44 x 80 -> 27,280 tokens).

The CLI is ``tools/memory_plan.py``; `plan` / `search_layouts` / `headline` answer "does this fit" in code.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

GIB = float(1 << 30)
BF16 = 2
#: Usable memory of the cards the plan is made for (what ``nvidia-smi`` reports, in GiB).
H100_80GB_GIB = 79.6
H200_141GB_GIB = 139.0
TEXT_TOKENS = 512
PRESETS = ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
HEADLINE_PRESETS = ("wan2.1-1.3b", "wan2.1-14b")  # the default report


@functools.lru_cache(maxsize=None)
def vae_spatial(preset: str) -> int:
    """Spatial compression of the VAE whose latents ``preset`` predicts (`data.codecs`: the Wan2.1 VAE 8x,
    the Wan2.2 VAE of TI2V-5B 16x; 4x in time for both)."""
    from megatron_anyflow.data.codecs import CODECS, vae_codec_for_channels

    wan_config = _quiet_imports()[3]
    return CODECS[vae_codec_for_channels(wan_config(preset).out_channels)].spatial


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
        wrapped_sharded_bytes, wrapped_replicated_bytes: bytes of the base weights LoRA wraps (what one
            merged no-grad copy per adapter costs), TP-sharded / replicated; wrapped_max_*_numel: the
            largest of them as (elements, bytes per element) (a merge's temporary).
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
    wrapped_sharded_bytes: int = 0
    wrapped_replicated_bytes: int = 0
    wrapped_max_sharded: tuple = (0, 2)
    wrapped_max_replicated: tuple = (0, 4)

    def merge_temporary_bytes(self, tp: int, per_call: bool) -> float:
        """Largest temporary of merging one wrapped weight on one rank: its fp32 ``s B A`` (4 B per
        element) plus, per call, the merged result in the weight's dtype (in cache mode the result is the
        cached copy, counted apart)."""
        (ns, es), (nr, er) = self.wrapped_max_sharded, self.wrapped_max_replicated
        return max(ns / tp * (4 + (es if per_call else 0)), nr * (4 + (er if per_call else 0)))

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
    default_targets, _kind, _match, _, _ = _quiet_imports()
    ws = wr = 0
    ms, mr = (0, 2), (0, 4)
    for name, module in model.named_modules():
        if _match(name, default_targets):
            w = module.weight
            if getattr(w, "tensor_model_parallel", False):
                ws, ms = ws + w.numel() * w.element_size(), max(ms, (w.numel(), w.element_size()))
            else:
                wr, mr = wr + w.numel() * w.element_size(), max(mr, (w.numel(), w.element_size()))
    return ModelCounts(preset=preset, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                       heads=cfg.num_attention_heads, layers=cfg.num_layers, sharded_params=sp,
                       replicated_params=rp, sharded_bytes=sb, replicated_bytes=rb, lora_rank=lora_rank,
                       lora_sharded=ls, lora_replicated=lr, wrapped_sharded_bytes=ws, wrapped_replicated_bytes=wr,
                       wrapped_max_sharded=ms, wrapped_max_replicated=mr)


# ------------------------------------------------------------------------------------------------
# tokens and activations
# ------------------------------------------------------------------------------------------------
def latent_tokens(frames: int, height: int, width: int, spatial: int = 8) -> int:
    """Tokens of one sample: ``((frames - 1)/4 + 1) * (height/(2 s)) * (width/(2 s))`` with the VAE's spatial
    factor ``s`` (Wan2.1 VAE 4x8x8: s = 8; Wan2.2 VAE of TI2V-5B 4x16x16: s = 16) and patch 1x2x2.

    Raises:
        ValueError: ``frames`` not of the form 4n + 1, or height / width not multiples of 2 s.
    """
    m = 2 * spatial
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4n + 1 (Wan VAE), got {frames}")
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {m} (VAE {spatial}x, patch 2), got "
                         f"{height} x {width}")
    return ((frames - 1) // 4 + 1) * (height // m) * (width // m)


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECOMPUTE_POLICIES = ("save-attention", "modules")
RECOMPUTE_MODULES = ("core_attn", "mlp")


def _recompute_key(recompute: str, policy: str, modules: Sequence[str]):
    """Validate a recompute setting; returns ``(granularity, policy, frozenset(modules))``."""
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
    bad = sorted(set(modules) - set(RECOMPUTE_MODULES))
    if bad:
        raise ValueError(f"recompute modules must be among {RECOMPUTE_MODULES}, got {bad}")
    return recompute, policy, frozenset(modules)


def saved_terms_per_token(h: int, ffn: int, heads: int, lora_rank: int, tp: int = 1, sp: bool = True,
                          dtype: str = "bf16", recompute: str = "none", policy: str = "save-attention",
                          modules: Sequence[str] = ("core_attn",), compile: bool = False,
                          ulysses: bool = False) -> Dict[str, float]:
    """Bytes ONE Wan block keeps for backward per token of the rank's sequence (micro-batch 1), by term.

    Derived from what ``models/wan/layer.py`` and ``models/lora.py`` save in eager mode (autograd's
    saved tensors, one count per storage), checked against ``measure/op_counter.py`` at TP = 1 by
    tests/test_memory_plan.py for every setting below. ``p`` = bytes of the activation dtype, ``t`` = TP,
    ``to`` = ``t`` under sequence parallelism (tokens outside the TP region are split) else 1, ``n`` =
    heads, ``r`` = LoRA rank (LoRA on qkv, proj, fc1, fc2; frozen base, so a frozen linear without an
    adapter saves nothing of its input); see the module docstring for the list of terms.

    ``compile=True`` is an ESTIMATE, not measured here (inductor's min-cut partitioner chooses its own
    saved set): every fp32 intermediate of the norms is replaced by the ``p``-byte tensor it is computed
    from. The plan uses the eager figure unless asked.

    Raises:
        ValueError: unknown dtype or recompute setting.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    gran, policy, mods = _recompute_key(recompute, policy, modules)
    p = DTYPE_BYTES[dtype]
    t = tp
    to = tp if (sp and tp > 1) else 1
    if gran == "full":
        return {"block input (the checkpoint's only saved tensor)": p * h / to}
    attn = 4 * p * h / t + 4 * heads / t  # q, k, v, output (p bytes) + log-sum-exp (fp32 per head)
    if gran == "selective" and policy == "save-attention":
        return {"self-attention q, k, v, output + log-sum-exp (the policy's saves)": attn,
                "block input (kept by the checkpoint)": p * h / to}
    f32 = p if compile else 4  # bytes of a norm's saved input: fp32 copy in eager, p-byte input compiled
    terms = {
        # F.layer_norm(x.float()) x 3 (adaLN before self-attention and FFN, affine LN before cross-attn):
        # its fp32 input + mean + rstd (4 B each per token). In fp32 runs the input is x itself.
        "LayerNorm fp32 inputs + mean / rstd (x3)": 3 * (max(f32, p) * h + 8) / to,
        # LoRA's A GEMM saves its input (the modulated norm output) for A's gradient: qkv and fc1.
        "qkv / fc1 inputs (LoRA A GEMMs)": 2 * p * h / to,
        # HeadShardedRMSNorm: xf = x.float() (saved by pow and by the multiply) + rsqrt (4 B per token,
        # TP-replicated statistic). q and k are views of the fused qkv output: in fp32 runs xf IS that
        # view, so the whole qkv output (3 h / t) stays alive; in bf16 two fp32 copies (2 x 4 h / t).
        "q / k RMSNorm fp32 inputs + rstd (self-attention)":
            ((2 * max(f32, p) * h) if p < 4 else 3 * 4 * h) / t + 8,
        "q RMSNorm fp32 input + rstd (cross-attention)": max(f32, p) * h / t + 4,
        # scaled_dot_product_attention saves q, k (after norm / RoPE), v (contiguous copy), its output
        # (which is also linear_proj's input, one storage) and the fp32 log-sum-exp.
        "self-attention q, k, v, output + log-sum-exp": attn,
        # cross-attention: q (after its norm) and the output; the text k / v are fixed (per layer).
        "cross-attention q, output + log-sum-exp": 2 * p * h / t + 4 * heads / t,
        # GELU saves fc1's output; fc2's LoRA A GEMM saves GELU's output.
        "GELU input, fc2 input": 2 * p * ffn / t,
        # LoRA A outputs kept for B's gradient (addmm): qkv 3r and fc1 r on the gathered sequence,
        # proj / fc2 r on the reduce-scattered one (s / to).
        "LoRA A outputs": p * lora_rank * (4 + 2 / to),
    }
    if ulysses:  # the inverse all-to-all makes linear_proj's input a new tensor (saved by its LoRA A)
        terms["Ulysses: linear_proj input after the all-to-all"] = p * h / t
    if gran == "selective":  # policy "modules": megatron's checkpointed sub-modules
        if "core_attn" in mods:  # the checkpoint keeps its inputs; drops lse, and cross-attn's output
            terms["self-attention q, k, v, output + log-sum-exp"] -= 4 * heads / t
            terms["cross-attention q, output + log-sum-exp"] -= p * h / t + 4 * heads / t
        if "mlp" in mods:  # the checkpoint keeps fc1's input (already counted)
            terms["GELU input, fc2 input"] = 0.0
            terms["LoRA A outputs"] -= p * lora_rank * (1 + 1 / to)
    return terms


def layer_saved_bytes_per_token(h: int, ffn: int, heads: int, lora_rank: int, tp: int = 1, sp: bool = True,
                                dtype: str = "bf16", recompute: str = "none", policy: str = "save-attention",
                                modules: Sequence[str] = ("core_attn",), compile: bool = False,
                                ulysses: bool = False) -> float:
    """Sum of `saved_terms_per_token`: the plan's per-token per-layer saved bytes (micro-batch 1)."""
    return sum(saved_terms_per_token(h, ffn, heads, lora_rank, tp, sp, dtype, recompute, policy, modules,
                                     compile, ulysses).values())


def layer_saved_fixed_bytes(h: int, ffn: int, heads: int, lora_rank: int, tp: int = 1, dtype: str = "bf16",
                            recompute: str = "none", policy: str = "save-attention",
                            modules: Sequence[str] = ("core_attn",), text_tokens: int = TEXT_TOKENS,
                            frames: int = 1) -> float:
    """Bytes ONE block keeps for backward that do not grow with the tokens (micro-batch 1, one forward):

    - LoRA weights cast to the activation dtype and saved for the input gradient: A of qkv (3 r h), proj
      (r h / t), fc1 (r h), fc2 (r F / t) and B of proj (h r), fc1 (F r / t), fc2 (h r), only when the
      activations are not fp32 (in fp32 they are the parameters); the block-structured ``s B`` of qkv
      ``[3 h / t, 3 r]`` always (it is built per call);
    - the text keys / values of cross-attention: 2 x ``text_tokens`` x p h / t;
    - the modulation (6 h fp32, one storage) and the two ``1 + scale`` (h fp32 each), per latent frame.

    ``full`` and ``save-attention`` recompute all of it (0); ``mlp`` drops fc1's / fc2's LoRA casts.
    """
    gran, policy, mods = _recompute_key(recompute, policy, modules)
    if gran == "full" or (gran == "selective" and policy == "save-attention"):
        return 0.0
    p = DTYPE_BYTES[dtype]
    t, r = tp, lora_rank
    low = p < 4
    qkv = (3 * r * h if low else 0) + 3 * h / t * 3 * r
    proj = (r * h / t + h * r) if low else 0
    mlp = (r * h + ffn * r / t + r * ffn / t + h * r) if low else 0
    if gran == "selective" and "mlp" in mods:
        mlp = 0
    return p * (qkv + proj + mlp) + 2 * text_tokens * p * h / t + frames * 4 * 8 * h


def layer_activation_bytes(s: int, b: int, h: int, ffn: int, heads: int, tp: int, sp: bool = True,
                           recompute: str = "none", lora_rank: int = 256, text_tokens: int = TEXT_TOKENS,
                           policy: str = "save-attention", modules: Sequence[str] = ("core_attn",),
                           dtype: str = "bf16", compile: bool = False, ulysses: bool = False) -> float:
    """Bytes kept for backward by ONE Wan block at ``s`` tokens on the rank (after the CP split, before the
    SP split) and micro-batch ``b``: ``b`` x (s x `layer_saved_bytes_per_token` + `layer_saved_fixed_bytes`).

    Raises:
        ValueError: unknown ``recompute`` / ``policy`` / ``modules`` / ``dtype``.
    """
    per_token = layer_saved_bytes_per_token(h, ffn, heads, lora_rank, tp, sp, dtype, recompute, policy, modules,
                                            compile, ulysses)
    fixed = layer_saved_fixed_bytes(h, ffn, heads, lora_rank, tp, dtype, recompute, policy, modules, text_tokens)
    return b * (s * per_token + fixed)


# ------------------------------------------------------------------------------------------------
# AnyFlow-FAR token counts (FarLayout)
# ------------------------------------------------------------------------------------------------
MODELS = ("bidirectional", "far")


def default_chunk_partition() -> tuple:
    """The recipe's chunk partition (``WanConfig.chunk_partition``: (1, 3, 3, 3, 3, 3, 3, 2), 21 latent frames)."""
    _quiet_imports()
    from megatron_anyflow.models.wan.config import WanConfig

    return tuple(WanConfig.__dataclass_fields__["chunk_partition"].default)


def fit_chunk_partition(chunk_partition: Sequence[int], latent_frames: int) -> tuple:
    """``chunk_partition`` cut to ``latent_frames``: whole chunks while they fit, the last one shortened
    (how the default partition is applied to clips shorter than 81 frames).

    Raises:
        ValueError: the partition covers fewer frames than the clip has.
    """
    out, left = [], latent_frames
    for c in chunk_partition:
        if left <= 0:
            break
        out.append(min(int(c), left))
        left -= out[-1]
    if left > 0:
        raise ValueError(f"chunk partition {list(chunk_partition)} covers {sum(chunk_partition)} latent frames; "
                         f"the clip has {latent_frames}")
    return tuple(out)


@functools.lru_cache(maxsize=64)
def far_layouts(chunk_partition: Sequence[int], lat_h: int, lat_w: int, pad_to: int = 1,
                long_context_prob: float = 0.5, min_chunks: int = 3) -> Dict[str, object]:
    """The FAR sequences of one sample (`FarLayout`, padded to ``pad_to`` = CP x SP as the model pads):
    ``teacher_forcing`` {n: layout} for the chunk counts stage 1 draws (n = 3 only when
    ``long_context_prob`` is 0), ``prefills`` [layout of chunks 0..j for j < len(cp) - 1] (the KV caches of
    a rollout), ``steps`` [chunk k's generation step layout; chunk 0 a plain forward]."""
    _quiet_imports()
    from megatron_anyflow.models.wan.far import FarLayout

    cp = tuple(chunk_partition)
    lo = min(min_chunks, len(cp))
    ns = range(lo, len(cp) + 1) if long_context_prob > 0 else (lo,)
    return {
        "teacher_forcing": {n: FarLayout.train(cp[:n], lat_h, lat_w, clean=True, pad_to=pad_to) for n in ns},
        "prefills": [FarLayout.prefill(cp[:j + 1], lat_h, lat_w, pad_to=pad_to) for j in range(len(cp) - 1)],
        "steps": [FarLayout.train(cp[:1], lat_h, lat_w, pad_to=pad_to)]
        + [FarLayout.step(cp[:k + 1], lat_h, lat_w, pad_to=pad_to) for k in range(1, len(cp))],
    }


def far_attention_extra_bytes(layout, h: int, tp: int, cp: int, recompute: str = "none",
                              policy: str = "save-attention", modules: Sequence[str] = ("core_attn",),
                              dtype: str = "bf16") -> float:
    """Bytes ONE block keeps for backward, on one rank, beyond the per-token terms, for the FAR grouped
    attention of ``layout`` (`models.wan.far.FarAttention`). A query group whose allowed keys are several
    ranges attends each range with its own kernel call and merges the outputs by the log-sum-exp
    (`models.wan.range_attention`): the ranges are views of the layer's k / v, so nothing key- or
    value-sized is added (before that merge, ``torch.cat`` copies of keys x 2 x p h / (TP x CP) were
    kept). Without CP the concatenated output of the groups is linear_proj's input while every group's
    output is saved by its kernel: one more p h / TP per token, unless full recompute, the
    save-attention policy or a core-attention checkpoint. Full recompute keeps none of it (one layer's
    worth is transient)."""
    gran, policy, mods = _recompute_key(recompute, policy, modules)
    if gran == "full":
        return 0.0
    p = DTYPE_BYTES[dtype]
    extra = 0.0
    if cp == 1 and (gran == "none" or (policy == "modules" and "core_attn" not in mods)):
        extra += layout.length * p * h / tp
    return extra


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
    recompute_policy: str = "save-attention"
    recompute_modules: tuple = ("core_attn",)
    grad_through: str = "chain"
    overlap_critic: bool = False
    lora_rank: int = 256
    teacher_adapter: bool = False
    lora_nograd_merge: str = "cache"
    fp8: bool = False
    compile: bool = False
    dist_opt: bool = True
    reserve_gib: float = 5.0
    gpu_gib: float = H100_80GB_GIB
    model: str = "bidirectional"
    chunk_partition: Optional[tuple] = None
    long_context_prob: float = 0.5
    far_bidirectional_prob: Optional[float] = None
    experts: int = 1

    def far_partition(self) -> tuple:
        """The FAR chunk partition of this clip: ``chunk_partition``, or the recipe's cut to the clip."""
        frames = (self.frames - 1) // 4 + 1
        if self.chunk_partition is None:
            return fit_chunk_partition(default_chunk_partition(), frames)
        return tuple(int(c) for c in self.chunk_partition)

    @property
    def bidirectional_prob(self) -> float:
        """FAR: the probability of the bidirectional branch (the trainer's default: 0.1 in stage 1, 0 in 2)."""
        if self.far_bidirectional_prob is not None:
            return self.far_bidirectional_prob
        return 0.1 if self.stage == 1 else 0.0

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
        if self.lora_nograd_merge not in ("cache", "per-call", "off"):
            raise ValueError(f"lora_nograd_merge must be 'cache', 'per-call' or 'off', got {self.lora_nograd_merge!r}")
        _recompute_key(self.recompute, self.recompute_policy, self.recompute_modules)
        if self.experts not in (1, 2):
            raise ValueError(f"experts must be 1 or 2 (Wan2.2 A14B), got {self.experts}")
        if self.experts == 2 and (self.stage != 2 or self.model != "bidirectional"):
            raise ValueError("experts=2 plans two-expert stage 2 (bidirectional): stage 1 trains one expert per run, "
                             "whose plan is the one-expert plan of the preset")
        if self.fp8 and self.recompute == "selective" and self.recompute_policy == "save-attention":
            raise ValueError("recompute policy 'save-attention' needs the local backend without FP8 (as WanModel "
                             "checks); with FP8 use recompute 'full' or --recompute-policy modules")
        latent_tokens(self.frames, self.height, self.width, vae_spatial(self.preset))  # validates the clip size
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "far":
            if counts.heads % (self.tp * self.cp):
                raise ValueError(f"--model far: TP x CP = {self.tp * self.cp} does not divide the {counts.heads} heads "
                                 f"of {self.preset} (the FAR attention runs after the Ulysses exchange over heads)")
            cp, frames = self.far_partition(), (self.frames - 1) // 4 + 1
            if not cp or any(c < 1 for c in cp):
                raise ValueError(f"chunk partition {list(cp)}: expected positive latent frame counts")
            if sum(cp) > frames or (self.stage == 2 and sum(cp) != frames):
                raise ValueError(f"chunk partition {list(cp)} sums to {sum(cp)} latent frames; the clip has {frames} "
                                 + ("(stage 2 rolls out whole clips: they must be equal)" if self.stage == 2 else
                                    "(stage 1 keeps the first sum(chunks) frames: at most the clip's)"))
            for name in ("long_context_prob", "bidirectional_prob"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    @property
    def recompute_label(self) -> str:
        if self.recompute != "selective":
            return self.recompute
        if self.recompute_policy == "save-attention":
            return "selective save-attention"
        return "selective " + "+".join(self.recompute_modules)


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
    tokens = latent_tokens(cfg.frames, cfg.height, cfg.width, vae_spatial(cfg.preset))
    s = math.ceil(tokens / (tp * cp)) * tp  # tokens on this CP rank (padded so SP divides)
    sp = cfg.sp and tp > 1
    t_out = tp if sp else 1
    ulysses = cp > 1 and a % (tp * cp) == 0

    # Two experts (Wan2.2 A14B stage 2): every weight-sized component twice (each expert's frozen base with its
    # generator and fake-score adapters, EMA and merged caches); the activations are one chain's, whichever
    # expert each forward runs, with one generator forward more (the shortcut split at the boundary).
    x = cfg.experts
    tag = f" x {x} experts" if x > 1 else ""
    comp: Dict[str, float] = {}
    comp[f"base weights (bf16, TP-sharded + replicated){tag}"] = x * (counts.sharded_bytes / tp
                                                                      + counts.replicated_bytes) / GIB
    lora_local = counts.lora_sharded / tp + counts.lora_replicated
    shard = dp * cp if cfg.dist_opt else 1
    per_trainable = lora_local * (2 + 4 + 12 / shard)
    n_train = x * (1 if cfg.stage == 1 else 2)
    comp[f"LoRA generator (bf16 + fp32 grad + fp32 master/Adam /{shard}){tag}"] = x * per_trainable / GIB
    if cfg.stage == 2:
        comp[f"LoRA fake score (bf16 + fp32 grad + fp32 master/Adam /{shard}){tag}"] = x * per_trainable / GIB
    comp[f"generator EMA (fp32){tag}"] = x * lora_local * 4 / GIB
    if cfg.teacher_adapter and cfg.stage == 2:
        comp[f"LoRA teacher (frozen bf16){tag}"] = x * lora_local * 2 / GIB

    # Merged no-grad LoRA (models/lora.py): one merged copy of every wrapped weight per adapter that
    # no-grad forwards use (stage 1: generator; stage 2: generator rollout prefix / critic rollout and
    # the fake score's DMD call; + a teacher adapter), kept across the step. Off under FP8.
    wrapped_local = counts.wrapped_sharded_bytes / tp + counts.wrapped_replicated_bytes
    merge = "off" if cfg.fp8 else cfg.lora_nograd_merge
    cached = (1 if cfg.stage == 1 else 2 + int(cfg.teacher_adapter)) if merge == "cache" else 0
    if cached:
        comp[f"merged no-grad LoRA weights (cache: {cached} adapter(s) x wrapped weights){tag}"] = (
            x * cached * wrapped_local / GIB)

    kw = dict(policy=cfg.recompute_policy, modules=cfg.recompute_modules, compile=cfg.compile, ulysses=ulysses)
    per_token = layer_saved_bytes_per_token(h, F, a, cfg.lora_rank, tp, sp, "bf16", cfg.recompute, **kw)
    fixed = layer_saved_fixed_bytes(h, F, a, cfg.lora_rank, tp, "bf16", cfg.recompute, cfg.recompute_policy,
                                    cfg.recompute_modules)

    def graph(s_rank: float, calls: int = 1, extra_per_layer: float = 0.0) -> float:
        """Bytes kept by forwards with grad over ``s_rank`` tokens of the rank in all (``calls`` forwards:
        their fixed per-forward bytes): every block, plus outside the blocks (not measured: the head's fp32
        LayerNorm input (4 h) and one residual copy)."""
        return L * b * (s_rank * per_token + calls * fixed + extra_per_layer) + b * s_rank * 6 * h / t_out

    stack = graph(s)  # == L * per_layer + outside, one bidirectional forward of the clip
    far_info = None
    transient_s = s
    if cfg.model == "far":
        far_info, act = _far_activations(cfg, counts, graph, t_out)
        comp.update(act)
        grad_forwards = far_info["grad_forwards"]
        transient_s = far_info["transient_tokens_per_rank"]
    elif cfg.stage == 1:
        grad_forwards = 1
        comp["activations: 1 forward with grad"] = stack / GIB
    else:
        # The co-trained stage-1 loss is backpropagated before the rollout (stage2._generator_loss): its
        # single graph is never alive with the rollout's. The critic step keeps one fake-score forward,
        # alive together with the next rollout only when --overlap-critic runs it on a side stream.
        # Two experts: the rollout splits the one shortcut that crosses the boundary into two calls, with grad
        # at worst (the suffix t_k+1 -> b -> 0, or the prefix under "chain"): one forward more.
        gen = (3 if cfg.grad_through == "chain" else 2) + (1 if x > 1 else 0)
        grad_forwards = gen + (1 if cfg.overlap_critic else 0)
        act_label = (f"activations: {gen} generator forwards with grad ({cfg.grad_through}"
                     + (", a shortcut split at the boundary" if x > 1 else "") + ")"
                     + (" + 1 critic (overlapped)" if cfg.overlap_critic else ""))
        comp[act_label] = grad_forwards * stack / GIB
    transient = BF16 * 12 / 2 * transient_s * b * h / tp  # attention backward workspace (12 s b h / t bytes)
    if cp > 1:
        transient += 12 * transient_s * b * h / tp
    if cfg.recompute == "full" or (cfg.recompute == "selective" and cfg.recompute_policy == "save-attention"):
        # backward rematerialises one layer at a time: its whole no-recompute set, less what was kept
        transient += (layer_activation_bytes(transient_s, b, h, F, a, tp, sp, "none", cfg.lora_rank,
                                             compile=cfg.compile, ulysses=ulysses)
                      - layer_activation_bytes(transient_s, b, h, F, a, tp, sp, cfg.recompute, cfg.lora_rank, **kw))
        if far_info is not None:  # ... with the grouped attention's copies of the longest FAR sequence
            transient += b * far_info["transient_far_extra_bytes"]
    if merge != "off":  # building one merged weight: its fp32 delta (+ the bf16 result when per-call)
        transient += counts.merge_temporary_bytes(tp, per_call=merge == "per-call")
    comp["transient: recomputed layer + attention workspace + merge"] = transient / GIB
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
        "recompute": cfg.recompute_label,
        "saved_bytes_per_token_per_layer": layer_saved_bytes_per_token(h, F, a, cfg.lora_rank, tp, sp, "bf16",
                                                                         cfg.recompute, **kw),
        "trainable_adapters": n_train,
        "params": {"base": counts.total_params, "lora_per_adapter": counts.lora_params},
        "model": cfg.model,
        "far": far_info,
    }


def _kv_bytes_per_token(counts: ModelCounts, tp: int, cp: int) -> float:
    """KV-cache bytes per cached token on one rank: layers x 2 (K, V) x hidden / (TP x CP) x 2 (bf16)."""
    return counts.layers * 2 * counts.hidden / (tp * cp) * BF16


def _far_activations(cfg: PlanConfig, counts: ModelCounts, graph, t_out: int):
    """AnyFlow-FAR activations of `plan` (module docstring): ``(far info dict, {component: GiB})``."""
    h = counts.hidden
    tp, cp, b = cfg.tp, cfg.cp, cfg.micro_batch
    sp_tp = tp if (cfg.sp and tp > 1) else 1
    pad_to = cp * sp_tp
    chunks = cfg.far_partition()
    sf = vae_spatial(cfg.preset)
    lat_h, lat_w = cfg.height // sf, cfg.width // sf
    lays = far_layouts(chunks, lat_h, lat_w, pad_to, cfg.long_context_prob)
    rkw = dict(recompute=cfg.recompute, policy=cfg.recompute_policy, modules=cfg.recompute_modules)
    bi_tokens = sum(chunks) * (lat_h // 2) * (lat_w // 2)  # the bidirectional forward of the (cut) clip
    s_bi = math.ceil(bi_tokens / (tp * cp)) * tp
    bi_on = cfg.bidirectional_prob > 0
    tf = {n: graph(lay.length // cp, 1, far_attention_extra_bytes(lay, h, tp, cp, **rkw))
          for n, lay in lays["teacher_forcing"].items()}
    n_max = max(tf, key=lambda n: (tf[n], n))
    lay_max = lays["teacher_forcing"][n_max]
    pad_note = f", padded {lay_max.length}" if lay_max.pad else ""
    tf_label = f"activations: FAR teacher forcing n={n_max} ({lay_max.valid_length} tokens{pad_note}), with grad"
    bi_bytes = graph(s_bi) if bi_on else 0.0
    bi_label = f"activations: bidirectional branch ({bi_tokens} tokens), its own backward"
    kv_tok = _kv_bytes_per_token(counts, tp, cp)
    prefill_tokens = [lay.valid_length for lay in lays["prefills"]]
    info = {
        "chunk_partition": list(chunks), "pad_to": pad_to,
        "teacher_forcing_tokens": {n: lay.valid_length for n, lay in lays["teacher_forcing"].items()},
        "teacher_forcing_padded_tokens": {n: lay.length for n, lay in lays["teacher_forcing"].items()},
        "teacher_forcing_gib": {n: v / GIB for n, v in tf.items()},
        "longest_n": n_max, "bidirectional_tokens": bi_tokens, "bidirectional_prob": cfg.bidirectional_prob,
        "prefill_tokens": prefill_tokens, "step_query_tokens": [lay.valid_length for lay in lays["steps"]],
        "inference_cache_tokens": max(prefill_tokens, default=0),
        "inference_cache_gib_per_sample": max(prefill_tokens, default=0) * kv_tok / GIB,
        "transient_far_extra_bytes": (far_attention_extra_bytes(lay_max, h, tp, cp)
                                      - far_attention_extra_bytes(lay_max, h, tp, cp, **rkw)),
    }
    comp: Dict[str, float] = {}
    if cfg.stage == 1:
        # the causal graph is freed (backward) before the bidirectional forward: the larger one governs
        if bi_on and bi_bytes > tf[n_max]:
            comp[bi_label] = bi_bytes / GIB
        else:
            comp[tf_label] = tf[n_max] / GIB
        info.update(grad_forwards=1 + int(bi_on),
                    transient_tokens_per_rank=max(lay_max.length // cp, s_bi if bi_on else 0))
        return info, comp
    # stage 2: the rollout keeps `gen` step calls with grad per chunk (their graphs until the DMD
    # backward), each referencing the KV cache it read; the co-trained FAR stage-1 loss is backpropagated
    # before the rollout (its graph is never alive with the rollout's).
    gen = 3 if cfg.grad_through == "chain" else 2
    steps = lays["steps"]
    rollout = graph(gen * sum(lay.length // cp for lay in steps), gen * len(steps))
    if cfg.overlap_critic:
        rollout += graph(s_bi)
    alive = sum(prefill_tokens)
    # the step calls read the caches as key ranges (no cat copy): each cache is alive once, whatever
    # the recompute setting
    kv_label = f"KV caches alive during the rollout: {alive} tokens (K, V; bf16)"
    kv_tokens = alive
    kv = b * kv_tokens * kv_tok
    cotrain = tf[n_max] + bi_bytes
    # transient: the DMD backward rematerialises one layer of a step call at a time; its attention reads
    # the cache in place (no cat copy), so nothing cache-sized is added
    info.update(kv_tokens_alive=kv_tokens, kv_gib=kv / GIB, rollout_gib=rollout / GIB, cotrain_gib=cotrain / GIB,
                grad_forwards=gen + (1 if cfg.overlap_critic else 0), transient_tokens_per_rank=s_bi,
                transient_far_extra_bytes=0.0)
    if cotrain > rollout + kv:  # a short clip / tiny model: the co-training graph is the larger
        comp[tf_label.replace("teacher forcing", "co-training")] = tf[n_max] / GIB
        if bi_on:
            comp[bi_label] = bi_bytes / GIB
        return info, comp
    comp[(f"activations: {gen} segments x {len(steps)} chunks with grad ({cfg.grad_through})"
          + (" + 1 critic (overlapped)" if cfg.overlap_critic else ""))] = rollout / GIB
    comp[kv_label] = kv / GIB
    return info, comp


RECOMPUTE_ORDER = ("none", "selective", "full")


def _searchable(recompute: str, kw: dict) -> dict:
    """``kw`` for a searched ``recompute``: selective under FP8 uses the ``modules`` policy (the
    save-attention policy needs the local backend without FP8)."""
    if recompute == "selective" and kw.get("fp8") and kw.get("recompute_policy", "save-attention") == "save-attention":
        return dict(kw, recompute_policy="modules")
    return kw


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
            if kw.get("model") == "far" and counts.heads % (tp * cp):  # FAR: Ulysses only
                continue
            for rc in RECOMPUTE_ORDER:
                cfg = PlanConfig(preset=preset, stage=stage, tp=tp, cp=cp, dp=gpus // (tp * cp), recompute=rc,
                                 gpu_gib=gpu_gib, **_searchable(rc, kw))
                out.append(plan(cfg))
    out.sort(key=lambda p: (not p["fits"], RECOMPUTE_ORDER.index(p["config"]["recompute"]),
                            -p["config"]["dp"], p["total_gib"]))
    return out


def search_clip(preset: str, stage: int, gpu_gib: float = H200_141GB_GIB,
                frames_options: Sequence[int] = (81, 61, 49, 33, 17), **kw) -> List[Dict[str, object]]:
    """One GPU (TP = CP = DP = 1): for each clip length and recomputation, the plan; longest fitting clip
    with least recomputation first."""
    out = []
    for fr in frames_options:
        for rc in RECOMPUTE_ORDER:
            out.append(plan(PlanConfig(preset=preset, stage=stage, tp=1, cp=1, dp=1, frames=fr, recompute=rc,
                                       gpu_gib=gpu_gib, **_searchable(rc, kw))))
    out.sort(key=lambda p: (not p["fits"], -p["config"]["frames"],
                            RECOMPUTE_ORDER.index(p["config"]["recompute"])))
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def format_layout(p) -> str:
    c = p["config"]
    return (f"{c['preset']}{' AnyFlow-FAR' if c.get('model') == 'far' else ''} stage {c['stage']}: TP={c['tp']} CP={c['cp']} DP={c['dp']} SP={c['sp'] and c['tp'] > 1} "
            f"{c['frames']}x{c['height']}x{c['width']} ({p['tokens']} tokens, {p['tokens_per_rank']}/CP rank) "
            f"b={c['micro_batch']} recompute={p['recompute']}" + (" fp8" if c["fp8"] else "")
            + (" compile (estimate)" if c["compile"] else "")
            + f"; saved {p['saved_bytes_per_token_per_layer']:.0f} B/token/layer")


def format_far(p) -> List[str]:
    """The FAR token lines of a plan (``--model far``)."""
    f, c = p["far"], p["config"]
    tf = f["teacher_forcing_tokens"]
    pad = f["teacher_forcing_padded_tokens"]
    padded = {n: pad[n] for n in tf if pad[n] != tf[n]}
    lines = [f"  AnyFlow-FAR, chunks {tuple(f['chunk_partition'])}, sequences padded to a multiple of CP x SP = "
             f"{f['pad_to']}:",
             "    teacher forcing tokens (FarLayout, clean copies): " + ", ".join(f"n={n}: {v}" for n, v in tf.items())
             + (" (padded: " + ", ".join(f"n={n}: {v}" for n, v in padded.items()) + ")" if padded else "")
             + f"; longest graph n={f['longest_n']}",
             f"    bidirectional branch: {f['bidirectional_tokens']} tokens, probability {f['bidirectional_prob']:g}"
             + (" (its own backward after the causal one's: the larger graph governs)"
                if c["stage"] == 1 and f["bidirectional_prob"] > 0 else ""),
             "    KV cache prefills after chunks 0..{}: {} = {} tokens".format(
                 len(f["prefill_tokens"]) - 1, " + ".join(map(str, f["prefill_tokens"])), sum(f["prefill_tokens"]))]
    if c["stage"] == 2:
        lines.append(f"    rollout: chunk steps of {', '.join(map(str, f['step_query_tokens']))} query tokens, "
                     f"{p['grad_forwards']} segment(s) with grad each; the cache of chunks < k is read by chunk k")
        lines.append(f"    KV caches alive during the rollout: {f['kv_tokens_alive']} tokens = {f['kv_gib']:.2f} GiB/GPU "
                     f"(layers x 2 (K, V) x hidden / (TP x CP) x 2 B x micro-batch)")
    lines.append(f"    inference: largest KV cache {f['inference_cache_tokens']} tokens = "
                 f"{f['inference_cache_gib_per_sample']:.2f} GiB per sample per GPU (not in the training total)")
    return lines


def format_plan(p) -> str:
    lines = [format_layout(p)] + (format_far(p) if p.get("far") else []) + [f"  {'component':68s} {'GiB/GPU':>9s}"]
    for k, v in p["components"].items():
        lines.append(f"  {k:68s} {v:9.2f}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':68s} {p['total_gib']:9.2f}   -> {verdict} in {p['config']['gpu_gib']} GiB")
    return "\n".join(lines)


def _row(p) -> Dict[str, object]:
    c = p["config"]
    return {"tp": c["tp"], "cp": c["cp"], "dp": c["dp"], "frames": c["frames"], "tokens": p["tokens"],
            "recompute": p["recompute"], "total_gib": round(p["total_gib"], 2), "fits": p["fits"]}


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

    for preset in HEADLINE_PRESETS:
        for stage in (1, 2):
            lay = search_layouts(preset, stage, 8, H100_80GB_GIB, frames=frames, **kw)
            clip = search_clip(preset, stage, H200_141GB_GIB, **kw)
            res[f"{preset}/stage{stage}/8x80GB"] = {
                "best": lay[0], "table": least_per(lay, lambda c: (c["tp"], c["cp"], c["dp"]))}
            res[f"{preset}/stage{stage}/1x141GB"] = {
                "best": clip[0], "table": sorted(least_per(clip, lambda c: c["frames"]), key=lambda r: -r["frames"])}
    return res


def format_rows(rows) -> str:
    out = [f"    {'TP':>3s} {'CP':>3s} {'DP':>3s} {'frames':>6s} {'tokens':>7s} {'recompute':>24s} {'GiB':>8s}"]
    for r in rows:
        out.append(f"    {r['tp']:3d} {r['cp']:3d} {r['dp']:3d} {r['frames']:6d} {r['tokens']:7d} "
                   f"{r['recompute']:>24s} {r['total_gib']:8.1f}  {'fits' if r['fits'] else 'does not fit'}")
    return "\n".join(out)
