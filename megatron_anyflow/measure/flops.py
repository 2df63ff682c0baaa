"""Model FLOPs of the Wan DiT and of each AnyFlow training step (docs/design/anyflow.md 7).

One forward of one sample, S video tokens, C text tokens, hidden h, FFN width F, L layers
(a multiply-add counts 2 FLOPs):

    self-attention   2 S h (3h)  [q, k, v]  + 4 S^2 h  [scores and values]  + 2 S h h  [out]
    cross-attention  2 S h h     [q]        + 4 C h h  [k, v of the text]   + 4 S C h [scores, values] + 2 S h h [out]
    MLP              4 S h F
    embeddings       2 S (c p) h [patch] + 2 C (d_text h + h h) [text] + 2 S h (c_out p) [head]
                     + per frame: 2 (256 h + h h) x (1 or 2 time embedders) + 2 h (6h) [time projection]

Backward of a forward with grad costs 2x its forward (data and weight gradients; the convention for
model FLOPs, also for a frozen base with LoRA, whose weight-gradient GEMMs are skipped: the hardware
then does less than the model-FLOP count says). So a forward with grad counts 3x, a no-grad forward 1x:

    teacher step     3 F_fwd                                   (1 forward with grad)
    stage-1 step     3 F_fwd + 3 F_fwd                         (cond with grad; null, plus, minus)
    stage-2 step     generator: segments with grad x 3 + real score 2 (cond, uncond) + fake 1 (+ stage-1 co-training 6)
                     critic: rollout segments x 1 + fake score with grad 3

Hardware FLOPs (`pass_hardware_flops`, `step_hardware_flops`) count what the GPU executes instead:
the frozen base gets dgrad only (no wgrad) and only where its input needs a gradient; the LoRA GEMMs
are counted (forward always when the adapter runs unmerged; both grads of the trainable adapter);
attention backward is 2.5x its forward (flash / cuDNN / FA3 kernels recompute the scores: PyTorch's
``sdpa_backward_flop_count``). Stage 2 is credited with each iteration's own rollout draw
(`rollout_segments`, `stage2_iteration_flops`), not the expectation.

AnyFlow-FAR (the causal model, docs/design/far.md; `models.wan.far.FarLayout`): the same per-token formula over the
layout's tokens (compressed context, full-resolution chunks, clean copies; padding counted by the hardware
figures only), with self-attention ``4 P h`` where P = the allowed (query, key) pairs summed over
`FarLayout.attention_groups` (block-sparse: what the grouped attention runs; a cached generation step
attends ``q x (cache + q)``), the compressed frames embedded by ``far_patch_embedding`` (1 x 4 x 4
patches), no head in a KV-cache prefill, one time-embedder row per modulation row (`far_pass_shape`).
A step (`far_step_flops`, `far_step_hardware_flops`), per sample:

    FAR stage 1      6 F_tf(n)  [+ 3 F_bi + (1 if guidance != 1) F_bi: the bidirectional branch]
    FAR stage 2      generator: 3 x seg x sum_k F_step(k) + sum_j F_prefill(j) + real score 2 F_bi + fake 1 F_bi
                     (+ FAR stage-1 co-training 6 F_tf(n)); critic: seg x sum_k F_step(k) + sum_j F_prefill(j)
                     (sequential; none pipelined) + fake score with grad 3 F_bi

with F_tf(n) the teacher-forcing forward over the first n chunks, F_step(k) chunk k's generation step
against the cache of chunks < k (chunk 0: a plain forward), F_prefill(j) the no-grad re-encoding of
chunks 0..j, F_bi the bidirectional forward of the whole clip, seg = `rollout_segments(N, k)`.
Forward-equivalents of FAR steps are in units of F_bi.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from megatron_anyflow.models.wan.config import WanConfig


@dataclass(frozen=True)
class PassShape:
    """The token counts of one model call on one sample: all the FLOP formulas need.

    Attributes:
        tokens: tokens through the blocks (self- and cross-attention queries, every linear), padding
            included.
        self_pairs: (query, key) pairs of self-attention: ``S^2`` for the bidirectional model; the
            allowed pairs of the FAR layout's attention groups (block-sparse); ``q x (cache + q)`` for a
            cached generation step.
        patch: ``(module, tokens, in_features)`` per patch embedding (``patch_embedding``: ``c x 1 x 2 x 2``;
            FAR's compressed frames ``far_patch_embedding``: ``c x 1 x 4 x 4``).
        head_tokens: tokens through the output head (0: a KV-cache prefill stops after the last block).
        time_rows: rows through the time embedders (1 when every frame shares (t, r)).
        frozen_kv_pairs: the part of ``self_pairs`` whose keys / values need no gradient: a cached
            generation step's queries against the KV cache (its K / V are detached). The grouped FAR
            attention attends the cache as its own key range, so explicit-matmul attention
            (``"math"``) skips their dk / dv; flash kernels compute them anyway.
    """

    tokens: int
    self_pairs: int
    patch: Tuple[Tuple[str, int, int], ...]
    head_tokens: int
    time_rows: int = 1
    frozen_kv_pairs: int = 0


def bidirectional_shape(cfg: WanConfig, frames: int, height: int, width: int,
                        per_frame_time: bool = False) -> PassShape:
    """`PassShape` of the bidirectional forward at latent size (frames, height, width)."""
    pt, ph, pw = cfg.patch_size
    S = (frames // pt) * (height // ph) * (width // pw)
    return PassShape(S, S * S, (("patch_embedding", S, cfg.in_channels * pt * ph * pw),), S,
                     (frames // pt) if per_frame_time else 1)


def shape_forward_flops(cfg: WanConfig, shape: PassShape, text_len: int = 512) -> float:
    """Model FLOPs of one forward of one sample of `PassShape` ``shape`` (module docstring)."""
    S, P = shape.tokens, shape.self_pairs
    C, h, F, L = text_len, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    p = math.prod(cfg.patch_size)
    self_attn = 2 * S * h * 3 * h + 4 * P * h + 2 * S * h * h
    cross_attn = 2 * S * h * h + 4 * C * h * h + 4 * S * C * h + 2 * S * h * h
    mlp = 4 * S * h * F
    embedders = 2 if cfg.delta_embedder else 1
    emb = (sum(2 * n * fan_in * h for _, n, fan_in in shape.patch) + 2 * C * (cfg.text_dim * h + h * h)
           + 2 * shape.head_tokens * h * cfg.out_channels * p
           + shape.time_rows * (embedders * 2 * (cfg.freq_dim * h + h * h) + 2 * h * 6 * h))
    return float(L * (self_attn + cross_attn + mlp) + emb)


def forward_flops(cfg: WanConfig, frames: int, height: int, width: int, text_len: int = 512,
                  per_frame_time: bool = False) -> float:
    """FLOPs of one forward of one sample at latent size (frames, height, width) (see module docstring)."""
    return shape_forward_flops(cfg, bidirectional_shape(cfg, frames, height, width, per_frame_time), text_len)


def tokens(cfg: WanConfig, frames: int, height: int, width: int) -> int:
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


@dataclass
class StepFlops:
    """Forward-equivalents per sample of one training step, and their FLOPs."""

    forward_equivalents: float
    flops_per_sample: float


def step_flops(cfg: WanConfig, stage: str, frames: int, height: int, width: int, text_len: int = 512,
               rollout_grad_segments: float = 3.0, rollout_segments: float = 3.0, cotrain: bool = True) -> StepFlops:
    """Model FLOPs per sample of a ``teacher``, ``stage1``, ``stage2_generator`` or ``stage2_critic`` step.

    ``rollout_grad_segments`` / ``rollout_segments``: generator calls of the backward simulation with
    gradient (generator step) and without (critic step); at most 3, fewer when k = 0 or k = N - 1
    (expected value over k ~ U{0..N-1}: 3 - 2/N).
    """
    f = forward_flops(cfg, frames, height, width, text_len)
    eq = {
        "teacher": 3.0,
        "stage1": 6.0,
        "stage2_generator": 3.0 * rollout_grad_segments + 3.0 + (6.0 if cotrain else 0.0),
        "stage2_critic": rollout_segments + 3.0,
    }
    if stage not in eq:
        raise ValueError(f"stage {stage!r}; expected one of {sorted(eq)}")
    return StepFlops(eq[stage], eq[stage] * f)


def expected_segments(num_steps_choices) -> float:
    """Expected generator calls of one flow-map backward simulation, N uniform over the choices and
    k ~ U{0..N-1}: 3 - 2/N (N >= 2), 1 for N = 1."""
    vals = [1.0 if n == 1 else 3.0 - 2.0 / n for n in num_steps_choices]
    return sum(vals) / len(vals)


def mfu(tflops_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved model TFLOP/s per GPU over the measured bf16 matmul rate."""
    return tflops_per_gpu / peak_tflops if peak_tflops > 0 and math.isfinite(peak_tflops) else float("nan")


# --------------------------------------------------------------------------------------------------
# hardware FLOPs
# --------------------------------------------------------------------------------------------------
#: attention backward / forward FLOPs of the kernel that runs: fused kernels (flash, cuDNN, FA3, SDPA's
#: flash / efficient) recompute the scores (5 GEMMs for the forward's 2); explicit-matmul attention
#: (``attention_impl="math"``) runs 4 GEMMs, fewer where q or k / v needs no gradient.
ATTENTION_KERNELS = ("flash", "math")


def _lora_targets_default() -> Tuple[str, ...]:
    from megatron_anyflow.models.lora import DEFAULT_TARGETS

    return tuple(DEFAULT_TARGETS)


class _Pass:
    """Accumulates the FLOPs of one forward (and its backward) linear by linear, tracking which
    activations need a gradient (autograd runs a backward GEMM only for those)."""

    def __init__(self, targets: Sequence[str], rank: int, lora: bool, grad: bool):
        self.targets, self.rank, self.lora, self.grad = tuple(targets), rank, lora, grad
        self.fwd = self.bwd = 0.0

    def linear(self, path: str, M: int, d_in: int, d_out: int, in_grad: bool, groups: int = 1,
               trainable: bool = False) -> bool:
        """y = x W^T (+ s B A x); returns whether y needs a gradient. ``trainable``: W itself is trained
        (a full parameter, e.g. FAR's ``far_patch_embedding``): its wgrad is counted."""
        self.fwd += 2.0 * M * d_in * d_out
        if trainable and self.grad:
            self.bwd += 2.0 * M * d_in * d_out
        lora = self.lora and self.rank > 0 and any(fnmatch.fnmatchcase(path, t) for t in self.targets)
        in_grad = in_grad and self.grad
        if lora:
            gr = groups * self.rank  # A: [g r, in]; B as one block-structured [out, g r] matrix (models/lora.py)
            self.fwd += 2.0 * M * gr * (d_in + d_out)
        if in_grad:
            self.bwd += 2.0 * M * d_in * d_out  # frozen base: dgrad only
        if lora and self.grad:  # the trainable adapter: wgrad of B, dgrad to A(x), wgrad of A, dgrad of x
            self.bwd += 2.0 * M * gr * d_out * 2 + 2.0 * M * gr * d_in * (2 if in_grad else 1)
        return in_grad or (lora and self.grad) or (trainable and self.grad)

    def attention(self, pairs: int, h: int, q_grad: bool, kv_grad: bool, kernel: str) -> bool:
        """softmax(q k^T) v over ``pairs`` (query, key) pairs (all sequences), width h (all heads):
        forward 2 GEMMs of 2 pairs h each."""
        gemm = 2.0 * pairs * h
        self.fwd += 2 * gemm
        if not self.grad or not (q_grad or kv_grad):
            return False
        if kernel == "flash":
            self.bwd += 5 * gemm
        else:  # math: dP = dO v^T, then dq = dS k, dk = dS^T q, dv = P^T dO as needed
            self.bwd += gemm * (1 + q_grad + 2 * kv_grad)
        return True


def pass_hardware_flops(cfg: WanConfig, frames: int, height: int, width: int, text_len: int = 512, *,
                        grad: bool, lora_rank: int = 0, lora_targets: Optional[Sequence[str]] = None,
                        lora: bool = True, input_requires_grad: bool = False, attention: str = "flash",
                        per_frame_time: bool = False, batch: int = 1) -> float:
    """Hardware FLOPs of one model call on ``batch`` samples: its forward, plus its backward when ``grad``.

    A call with ``grad`` trains the adapter it runs (``lora_targets``, rank ``lora_rank``; the base is
    frozen). Counted: every GEMM of the forward (base linears, the patch convolution, attention,
    the LoRA A and B GEMMs when ``lora``: the adapter runs unmerged; a fused q/k/v or k/v linear has a
    block-structured ``[out, groups r]`` B, which the GPU multiplies zeros and all); in the backward,
    the base linears' dgrad where the input needs a gradient (``input_requires_grad``: the latents do,
    e.g. a chained rollout segment; the text never does, so the cross-attention k / v GEMMs have no
    backward; the first block's input needs one only through a trained time embedder's modulation),
    both grads of the trained adapter (A's dgrad only where its input needs one), and attention backward
    at 2.5x its forward (``attention="flash"``: fused kernels, which compute dq, dk and dv whatever is
    needed) or the explicit-matmul count (``"math"``: 4 GEMMs, dq alone for cross-attention on the
    text). Elementwise work, norms, softmax and the optimiser are not counted.
    """
    return shape_hardware_flops(cfg, bidirectional_shape(cfg, frames, height, width, per_frame_time), text_len,
                                grad=grad, lora_rank=lora_rank, lora_targets=lora_targets, lora=lora,
                                input_requires_grad=input_requires_grad, attention=attention, batch=batch)


def shape_hardware_flops(cfg: WanConfig, shape: PassShape, text_len: int = 512, *, grad: bool, lora_rank: int = 0,
                         lora_targets: Optional[Sequence[str]] = None, lora: bool = True,
                         input_requires_grad: bool = False, attention: str = "flash", batch: int = 1,
                         trainable: Sequence[str] = ()) -> float:
    """`pass_hardware_flops` of a call of `PassShape` ``shape`` (bidirectional or FAR). ``trainable``: full
    parameters the call trains besides the adapter (FAR's generator: ``far_patch_embedding``), whose
    wgrad is counted."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention {attention!r}; expected one of {ATTENTION_KERNELS}")
    targets = _lora_targets_default() if lora_targets is None else tuple(lora_targets)
    S, C, h, Fw, L = batch * shape.tokens, batch * text_len, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    p = math.prod(cfg.patch_size)
    n_time = batch * shape.time_rows
    P = _Pass(targets, lora_rank, lora, grad)
    # embeddings: patch (a convolution over whole patches = a GEMM), text, time (+ delta) embedders
    x = input_requires_grad
    for name, n, fan_in in shape.patch:
        x = P.linear(name, batch * n, fan_in, h, input_requires_grad, trainable=name in trainable) or x
    t1 = P.linear("condition_embedder.text_embedder.linear_1", C, cfg.text_dim, h, False)
    txt = P.linear("condition_embedder.text_embedder.linear_2", C, h, h, t1)
    mod = False
    for emb in ("time_embedder", "delta_embedder") if cfg.delta_embedder else ("time_embedder",):
        e1 = P.linear(f"condition_embedder.{emb}.linear_1", n_time, cfg.freq_dim, h, False)
        mod = P.linear(f"condition_embedder.{emb}.linear_2", n_time, h, h, e1) or mod
    temb = mod
    mod = P.linear("condition_embedder.time_proj", n_time, h, 6 * h, temb)
    for i in range(L):
        b = f"blocks.{i}"
        qkv = P.linear(f"{b}.self_attention.linear_qkv", S, h, 3 * h, x or mod, groups=3)
        fz = batch * shape.frozen_kv_pairs
        a = P.attention(batch * shape.self_pairs - fz, h, qkv, qkv, attention)
        if fz:  # queries against the detached KV cache: no dk / dv for "math"
            a = P.attention(fz, h, qkv, qkv and attention != "math", attention) or a
        x = P.linear(f"{b}.self_attention.linear_proj", S, h, h, a) or x or mod
        q = P.linear(f"{b}.cross_attention.linear_q", S, h, h, x)
        kv = P.linear(f"{b}.cross_attention.linear_kv", C, h, 2 * h, txt, groups=2)
        a = P.attention(batch * shape.tokens * text_len, h, q, kv, attention)
        x = P.linear(f"{b}.cross_attention.linear_proj", S, h, h, a) or x
        f1 = P.linear(f"{b}.mlp.linear_fc1", S, h, Fw, x or mod)
        x = P.linear(f"{b}.mlp.linear_fc2", S, Fw, h, f1) or x or mod
    P.linear("proj_out", batch * shape.head_tokens, h, cfg.out_channels * p, x or temb)
    return P.fwd + P.bwd


def rollout_segments(N: int, k: int) -> int:
    """Generator calls of one flow-map backward simulation with plan (N, k): 1 + (k > 0) + (k < N - 1)."""
    return 1 + (k > 0) + (k < N - 1)


@dataclass
class StepHardwareFlops:
    """Hardware FLOPs per sample of one training step, by role."""

    generator: float
    critic: float

    @property
    def total(self) -> float:
        return self.generator + self.critic


def step_hardware_flops(cfg: WanConfig, stage: str, frames: int, height: int, width: int, text_len: int = 512, *,
                        lora_rank: int, lora_targets: Optional[Sequence[str]] = None, rollout_grad_segments: int = 3,
                        rollout_segments: int = 3, cotrain: bool = True, merged_nograd: bool = False,
                        attention: str = "flash") -> StepHardwareFlops:
    """Hardware FLOPs per sample of a ``teacher``, ``stage1`` or ``stage2`` (generator + critic) step.

    The calls are those of `step_flops`: teacher 1 with grad; stage 1 cond with grad + null, plus, minus
    without; stage 2 generator: ``rollout_grad_segments`` with grad (the first from noise, the others on a
    latent that needs a gradient: chained) + real score cond / uncond (base, no adapter) + fake score +
    stage-1 co-training; critic: ``rollout_segments`` no-grad generator calls + fake score with grad.
    ``merged_nograd``: no-grad calls with an adapter run a merged weight (no LoRA GEMMs).
    """
    kw = dict(lora_rank=lora_rank, lora_targets=lora_targets, attention=attention)
    shape = (cfg, frames, height, width, text_len)
    g = pass_hardware_flops(*shape, grad=True, **kw)
    g_chain = pass_hardware_flops(*shape, grad=True, input_requires_grad=True, **kw)
    n = pass_hardware_flops(*shape, grad=False, lora=not merged_nograd, **kw)
    base = pass_hardware_flops(*shape, grad=False, lora=False, **kw)
    if stage == "teacher":
        return StepHardwareFlops(g, 0.0)
    if stage == "stage1":
        return StepHardwareFlops(g + 3 * n, 0.0)
    if stage != "stage2":
        raise ValueError(f"stage {stage!r}; expected teacher, stage1 or stage2")
    rollout = (g + (rollout_grad_segments - 1) * g_chain) if rollout_grad_segments > 0 else 0.0
    gen = rollout + 2 * base + n + ((g + 3 * n) if cotrain else 0.0)
    return StepHardwareFlops(gen, rollout_segments * n + g)


def stage2_iteration_flops(cfg: WanConfig, plans: Iterable[Tuple[int, int]], frames: int, height: int, width: int,
                           text_len: int = 512, *, schedule: str = "sequential", cotrain: bool = True,
                           lora_rank: int = 0, lora_targets: Optional[Sequence[str]] = None,
                           merged_nograd: bool = False, attention: str = "flash") -> List[Tuple[float, float]]:
    """(model FLOPs, hardware FLOPs) per sample of each stage-2 iteration, from its drawn plan (N, k).

    Each iteration is credited with its own rollout: ``rollout_segments(N, k)`` generator calls with
    grad in the generator step, and as many without in the critic step (``sequential``: the critic's own
    rollout with the same plan) or none (``pipelined``: the critic reuses the generator's rollout).
    """
    out = []
    for N, k in plans:
        seg = rollout_segments(N, k)
        crit = seg if schedule == "sequential" else 0
        m = (step_flops(cfg, "stage2_generator", frames, height, width, text_len, rollout_grad_segments=seg,
                        cotrain=cotrain).flops_per_sample
             + step_flops(cfg, "stage2_critic", frames, height, width, text_len, rollout_segments=crit).flops_per_sample)
        hw = step_hardware_flops(cfg, "stage2", frames, height, width, text_len, lora_rank=lora_rank,
                                 lora_targets=lora_targets, rollout_grad_segments=seg, rollout_segments=crit,
                                 cotrain=cotrain, merged_nograd=merged_nograd, attention=attention).total
        out.append((m, hw))
    return out


# --------------------------------------------------------------------------------------------------
# AnyFlow-FAR (the causal model)
# --------------------------------------------------------------------------------------------------
def far_attention_pairs(layout, cache_tokens: int = 0) -> int:
    """(query, key) pairs the FAR self-attention computes for `FarLayout` ``layout``: the sum over its
    attention groups of queries x keys (block-sparse; == ``layout.dense_mask().sum()``), plus, for a
    generation step, the queries against the ``cache_tokens`` cached keys."""
    pairs = sum((q1 - q0) * sum(e - a for a, e in ranges) for q0, q1, ranges in layout.attention_groups())
    if layout.mode == "step":
        pairs += layout.valid_length * cache_tokens
    return pairs


def far_pass_shape(cfg: WanConfig, layout, cache_tokens: int = 0, dense: bool = False) -> PassShape:
    """`PassShape` of a FAR call with `FarLayout` ``layout`` (padding, if the layout has any, goes through
    the blocks and the head). ``cache_tokens``: the KV cache a ``"step"`` reads. ``dense``: attention
    over all ``L^2`` pairs (a dense masked kernel) instead of the allowed ones."""
    from megatron_anyflow.models.wan.far import PAD

    pt, ph, pw = cfg.patch_size
    cpt, cph, cpw = cfg.compressed_patch_size
    comp = sum(s.length for s in layout.segments if s.compressed)
    full = sum(s.length for s in layout.segments if not s.compressed and s.kind != PAD)
    patch = [("patch_embedding", full, cfg.in_channels * pt * ph * pw)]
    if comp:
        patch.insert(0, ("far_patch_embedding", comp, cfg.in_channels * cpt * cph * cpw))
    L = layout.length
    pairs = L * (L + (cache_tokens if layout.mode == "step" else 0)) if dense else far_attention_pairs(layout,
                                                                                                   cache_tokens)
    frozen = layout.valid_length * cache_tokens if layout.mode == "step" else 0
    return PassShape(L, pairs, tuple(patch), 0 if layout.mode == "prefill" else L, layout.num_rows, frozen)


@dataclass(frozen=True)
class FarShapes:
    """The FAR calls of one sample at one latent size and chunk partition ``cp``: teacher forcing over the
    first n chunks (``teacher_forcing[n]``), the bidirectional whole clip (``bidirectional``), chunk k's
    generation step (``steps[k]``; chunk 0 is a plain forward) and the prefill of chunks 0..j
    (``prefills[j]``, j < len(cp) - 1)."""

    chunk_partition: Tuple[int, ...]
    teacher_forcing: dict
    bidirectional: PassShape
    steps: Tuple[PassShape, ...]
    prefills: Tuple[PassShape, ...]


def far_shapes(cfg: WanConfig, height: int, width: int, chunk_partition: Optional[Sequence[int]] = None,
               pad_to: int = 1, dense: bool = False, min_chunks: int = 3) -> FarShapes:
    """The `FarShapes` of ``cfg`` (``chunk_partition`` defaults to the config's) at latent height x width;
    ``pad_to``: the CP x SP multiple the model pads every FAR sequence to (hardware FLOPs; model FLOPs
    use 1)."""
    from megatron_anyflow.models.wan.far import FarLayout

    cp = tuple(chunk_partition or cfg.chunk_partition)
    geo = dict(height=height, width=width, patch_size=cfg.patch_size, compressed_patch_size=cfg.compressed_patch_size,
               full_chunk_limit=cfg.full_chunk_limit, pad_to=pad_to)
    tf = {n: far_pass_shape(cfg, FarLayout.train(cp[:n], clean=True, **geo), dense=dense)
          for n in range(min(min_chunks, len(cp)), len(cp) + 1)}
    prefill_layouts = [FarLayout.prefill(cp[:j + 1], **geo) for j in range(len(cp) - 1)]
    steps = [far_pass_shape(cfg, FarLayout.train(cp[:1], **geo), dense=dense)]
    steps += [far_pass_shape(cfg, FarLayout.step(cp[:k + 1], **geo), prefill_layouts[k - 1].valid_length, dense)
              for k in range(1, len(cp))]
    prefills = tuple(far_pass_shape(cfg, lay, dense=dense) for lay in prefill_layouts)
    bi = bidirectional_shape(cfg, sum(cp), height, width)
    return FarShapes(cp, tf, bi, tuple(steps), prefills)


def far_step_flops(cfg: WanConfig, step: str, height: int, width: int, text_len: int = 512, *,
                   num_chunks: Optional[int] = None, bidirectional: bool = False, guidance: float = 3.0,
                   rollout_grad_segments: float = 3.0, rollout_segments: float = 3.0, cotrain: bool = True,
                   chunk_partition: Optional[Sequence[int]] = None, dense: bool = False) -> StepFlops:
    """Model FLOPs per sample of an AnyFlow-FAR ``stage1``, ``stage2_generator`` or ``stage2_critic`` step
    (module docstring); forward-equivalents in units of one bidirectional forward of the whole clip.

    ``num_chunks``: the iteration's teacher-forcing chunk count n (stage 1; stage 2's co-training), default
    all chunks; ``bidirectional``: the iteration runs stage 1's bidirectional branch (``guidance`` != 1
    adds its no-grad null forward); ``rollout_grad_segments`` / ``rollout_segments``: generator calls per
    chunk with grad (generator step) / without (critic step; 0 = the pipelined schedule, no critic
    rollout and no prefills). ``dense``: attention over all L^2 pairs (a dense masked kernel).
    """
    sh = far_shapes(cfg, height, width, chunk_partition, dense=dense)
    f = lambda s: shape_forward_flops(cfg, s, text_len)  # noqa: E731
    bi = f(sh.bidirectional)
    n = len(sh.chunk_partition) if num_chunks is None else num_chunks
    if n not in sh.teacher_forcing:
        raise ValueError(f"num_chunks={n}; expected one of {sorted(sh.teacher_forcing)}")
    tf = 6.0 * f(sh.teacher_forcing[n]) + ((3.0 + (guidance != 1.0)) * bi if bidirectional else 0.0)
    steps, prefills = sum(f(s) for s in sh.steps), sum(f(s) for s in sh.prefills)
    if step == "stage1":
        total = tf
    elif step == "stage2_generator":
        total = 3.0 * rollout_grad_segments * steps + prefills + 3.0 * bi + (tf if cotrain else 0.0)
    elif step == "stage2_critic":
        total = rollout_segments * steps + (prefills if rollout_segments else 0.0) + 3.0 * bi
    else:
        raise ValueError(f"FAR step {step!r}; expected stage1, stage2_generator or stage2_critic")
    return StepFlops(total / bi, total)


def far_step_hardware_flops(cfg: WanConfig, step: str, height: int, width: int, text_len: int = 512, *,
                            lora_rank: int, lora_targets: Optional[Sequence[str]] = None,
                            num_chunks: Optional[int] = None, bidirectional: bool = False, guidance: float = 3.0,
                            rollout_grad_segments: int = 3, rollout_segments: int = 3, cotrain: bool = True,
                            merged_nograd: bool = False, attention: str = "flash", pad_to: int = 1,
                            chunk_partition: Optional[Sequence[int]] = None) -> StepHardwareFlops:
    """Hardware FLOPs per sample of an AnyFlow-FAR ``stage1`` or ``stage2`` step (the calls of
    `far_step_flops`, counted as `step_hardware_flops` counts them; the generator's calls also train
    ``far_patch_embedding``, a full parameter). ``pad_to``: CP x SP, the multiple the FAR sequences
    are padded to (pad tokens run through every linear)."""
    sh = far_shapes(cfg, height, width, chunk_partition, pad_to=pad_to)
    kw = dict(lora_rank=lora_rank, lora_targets=lora_targets, attention=attention)
    trained = ("far_patch_embedding",)

    def g(s, chain=False):  # a generator call with grad
        return shape_hardware_flops(cfg, s, text_len, grad=True, input_requires_grad=chain, trainable=trained, **kw)

    def nograd(s, lora=not merged_nograd):
        return shape_hardware_flops(cfg, s, text_len, grad=False, lora=lora, **kw)

    n = len(sh.chunk_partition) if num_chunks is None else num_chunks
    if n not in sh.teacher_forcing:
        raise ValueError(f"num_chunks={n}; expected one of {sorted(sh.teacher_forcing)}")
    tf_shape, bi = sh.teacher_forcing[n], sh.bidirectional
    bi_branch = 0.0
    if bidirectional:
        bi_branch = shape_hardware_flops(cfg, bi, text_len, grad=True, **kw) + (nograd(bi) if guidance != 1.0 else 0.0)
    s1 = g(tf_shape) + 3 * nograd(tf_shape) + bi_branch
    if step == "stage1":
        return StepHardwareFlops(s1, 0.0)
    if step != "stage2":
        raise ValueError(f"FAR step {step!r}; expected stage1 or stage2")
    prefills = sum(nograd(s) for s in sh.prefills)
    rollout = (sum(g(s) + (rollout_grad_segments - 1) * g(s, chain=True) for s in sh.steps) + prefills
               if rollout_grad_segments > 0 else 0.0)
    # real score: the frozen base (no adapter), cond + uncond; fake score: no grad, its adapter
    gen = rollout + 2 * nograd(bi, lora=False) + nograd(bi) + (s1 if cotrain else 0.0)
    critic_rollout = (rollout_segments * sum(nograd(s) for s in sh.steps) + prefills) if rollout_segments else 0.0
    return StepHardwareFlops(gen, critic_rollout + shape_hardware_flops(cfg, bi, text_len, grad=True, **kw))


def far_inference_flops(cfg: WanConfig, height: int, width: int, num_steps: int, text_len: int = 512,
                        chunk_partition: Optional[Sequence[int]] = None) -> float:
    """Model FLOPs of one FAR text-to-video sample with ``num_steps`` steps per chunk: every chunk's steps
    plus the prefills between chunks (docs/design/far.md 3)."""
    sh = far_shapes(cfg, height, width, chunk_partition)
    return float(num_steps * sum(shape_forward_flops(cfg, s, text_len) for s in sh.steps)
                 + sum(shape_forward_flops(cfg, s, text_len) for s in sh.prefills))
