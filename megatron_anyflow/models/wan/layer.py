"""One Wan2.1 DiT block on megatron-core, shared by the ``local`` and ``te`` backends.

Activation layout inside blocks is Megatron's ``[s, b, h]``; ``s`` is the rank's slice of the token
sequence under context parallelism (its CP chunk) and sequence parallelism (its TP slice of that
chunk). The block (diffusers `WanTransformerBlock`):

    shift, scale, gate, c_shift, c_scale, c_gate = scale_shift_table + e        (per frame, fp32)
    x = x + gate * SelfAttn(LN(x) * (1 + scale) + shift)                          (RoPE, qk RMSNorm)
    x = x + CrossAttn(LN_affine(x), text)                                         (qk RMSNorm)
    x = x + c_gate * FFN(LN(x) * (1 + c_scale) + c_shift)                         (GELU-tanh)

The modulation ``e`` is per sample and per latent frame (AnyFlow needs (t, r) per frame). It is
applied one frame-segment of the rank's tokens at a time with expanded views, so no per-token
``[s, b, 6h]`` tensor is materialised.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch.utils.checkpoint import CheckpointPolicy

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import WanConfig
from megatron_anyflow.models.wan.rope import apply_rotary, apply_rotary_te, te_fused_rope
from megatron_anyflow.parallel.context_parallel import (
    all_to_all_heads_to_sequence,
    all_to_all_sequence_to_heads,
    cp_world_size,
)
from megatron_anyflow.parallel.tensor_parallel import (
    all_reduce_sum_tp,
    copy_to_tp,
    gather_sequence_tp,
    reduce_from_tp,
    reduce_scatter_sequence_tp,
    tp_world_size,
)


# ----------------------------------------------------------------------------------------------
# Per-frame modulation over the rank's token slice
# ----------------------------------------------------------------------------------------------
@dataclass
class FrameSegments:
    """Which latent frame each run of the rank's local tokens belongs to.

    ``segments`` is a list of (frame index into the modulation tensors, number of tokens); it covers the
    local tokens in order. A single segment with frame 0 means the modulation is the same for every
    frame (the usual case) and is broadcast.
    """

    segments: List[Tuple[int, int]]

    @staticmethod
    def build(num_frames: int, tokens_per_frame: int, start: int, length: int, uniform: bool) -> "FrameSegments":
        if uniform:
            return FrameSegments([(0, length)])
        segs = []
        pos, end = start, start + length
        while pos < end:
            f = pos // tokens_per_frame
            stop = min(end, (f + 1) * tokens_per_frame)
            segs.append((f, stop - pos))
            pos = stop
        assert segs[-1][0] < num_frames
        return FrameSegments(segs)

    @staticmethod
    def from_runs(runs: List[Tuple[int, int]], start: int, length: int) -> "FrameSegments":
        """Segments of the local token range ``[start, start + length)`` of a sequence described by
        ``runs``, a list of (modulation row, token count) covering it in order (AnyFlow-FAR: frames of
        different token counts, clean copies with their own rows; `models.wan.far.FarLayout.frame_runs`)."""
        segs, pos, end = [], 0, start + length
        for row, n in runs:
            a, e = max(pos, start), min(pos + n, end)
            if e > a:
                if segs and segs[-1][0] == row:
                    segs[-1] = (row, segs[-1][1] + e - a)
                else:
                    segs.append((row, e - a))
            pos += n
            if pos >= end:
                break
        if sum(n for _, n in segs) != length:
            raise ValueError(f"token runs cover {pos} tokens; the local range is [{start}, {end})")
        return FrameSegments(segs)

    def apply(self, fn, tokens: Tuple[torch.Tensor, ...], frames: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``fn(*token_segs, *frame_rows)`` per segment, concatenated on dim 0.

        ``tokens``: tensors [s, b, ...] sliced by segment; ``frames``: tensors [F, b, h] indexed by the
        segment's frame (broadcast over its tokens).
        """
        if len(self.segments) == 1:
            f, _ = self.segments[0]
            return fn(*tokens, *[p[f] for p in frames])
        outs, off = [], 0
        for f, n in self.segments:
            outs.append(fn(*[x[off:off + n] for x in tokens], *[p[f] for p in frames]))
            off += n
        return torch.cat(outs, dim=0)


def recompute_if(config: WanConfig, module: str, fn, *args):
    """Run ``fn(*args)``, recomputing it in backward under selective recomputation of ``module``.

    ``config.recompute_granularity == "selective"`` with ``recompute_policy == "modules"`` and ``module``
    in ``config.recompute_modules`` (``"core_attn"``: attention scores / softmax; ``"mlp"``: the FFN
    with its [s, b, ffn] activation). The replay runs in the adapter scope of this forward
    (`lora.bind_adapter_scope`). With FP8 the module is checkpointed by megatron-core's TE-aware
    ``te_checkpoint``, whose replay re-enters the FP8 context with the forward's scaling (the FFN's
    GEMMs are FP8; UNTESTED here: no Transformer Engine).
    """
    if (config.recompute_granularity == "selective" and config.recompute_policy == "modules"
            and module in (config.recompute_modules or ()) and torch.is_grad_enabled()):
        fn = L.bind_adapter_scope(fn)
        if config.fp8:
            from megatron.core import parallel_state
            from megatron.core.extensions.transformer_engine import te_checkpoint
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            return te_checkpoint(fn, False, get_cuda_rng_tracker, parallel_state.get_tensor_model_parallel_group(),
                                 *args)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _SaveRegion:
    """Whether the ops now running are self-attention's core (read by `save_attention_policy`).

    Set by `TorchCoreAttention` around its kernel call, both in the forward and in the recomputation
    replay, so the policy gives the same answer to both. ``observer``: a callable that is given every
    tensor the policy saves (``tools/count_layer_ops.py`` measures them with it).
    """

    active = False
    observer: Optional[Callable] = None


@contextlib.contextmanager
def _attention_region(enabled: bool):
    if not enabled:
        yield
        return
    prev, _SaveRegion.active = _SaveRegion.active, True
    try:
        yield
    finally:
        _SaveRegion.active = prev


@contextlib.contextmanager
def observe_selective_saves(fn: Callable):
    """Call ``fn(tensor)`` for every output `save_attention_policy` saves while the context is open."""
    prev, _SaveRegion.observer = _SaveRegion.observer, fn
    try:
        yield
    finally:
        _SaveRegion.observer = prev


def save_attention_policy(ctx, func, *args, **kwargs):
    """Selective-checkpoint policy that fits flash attention (``recompute_policy="save-attention"``).

    Saves every output of the ops inside self-attention's core (`TorchCoreAttention`): the q, k, v
    it is given (views of them: their storages stay alive), the attention output and its log-sum-exp
    (and the RNG state of the kernel, when it has one); everything else of the block (linears, LoRA,
    norms, RoPE, modulation, cross-attention, FFN) is recomputed in backward. Flash / cuDNN attention
    never stores the S x S scores, so attention's backward needs exactly what is saved, and the replay
    skips the most expensive op of the block (70 % of the FLOPs at Wan sizes).
    """
    if _SaveRegion.active:
        if not ctx.is_recompute and _SaveRegion.observer is not None:
            out = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else (ctx.op_output,)
            for t in out:
                if isinstance(t, torch.Tensor):
                    _SaveRegion.observer(t)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _gated_add(x, y, gate):
    return x + y * gate


# ----------------------------------------------------------------------------------------------
# Norms and attention
# ----------------------------------------------------------------------------------------------
class HeadShardedRMSNorm(nn.Module):
    """RMSNorm over all heads' channels when each TP rank holds only some heads.

    The per-token sum of squares is summed over the TP group (one small collective) instead of gathering
    q or k. The weight is sharded like the heads (``partition_dim`` 0), so its gradient is local.
    Numerics follow diffusers' `RMSNorm` (fp32 statistic, eps inside the root; a bf16 weight multiplies
    the bf16-rounded normalised value, as diffusers does with its bf16 ``norm_q`` / ``norm_k``).

    Args:
        local_dim: channels on this rank (heads_local * head_dim).
        full_dim: channels over all ranks (heads * head_dim).

    Forward: x [..., heads_local, head_dim] (a strided view is fine: q / k straight out of the fused
    qkv, no copy) or [..., local_dim]; returns the same shape in x's dtype (the weight's, if it is
    lower precision).
    """

    def __init__(self, local_dim: int, full_dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.full_dim = full_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(local_dim, dtype=dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        dims = (-2, -1) if x.shape[-1] != self.weight.shape[0] else (-1,)
        w = self.weight.view(x.shape[-2:]) if len(dims) == 2 else self.weight
        ss = all_reduce_sum_tp(xf.pow(2).sum(dims, keepdim=True))
        y = xf * torch.rsqrt(ss / self.full_dim + self.eps)
        if w.dtype in (torch.float16, torch.bfloat16):
            return y.to(w.dtype) * w
        return (y * w).to(x.dtype)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_attention_impl(impl: str, device: torch.device) -> Tuple[str, str]:
    """The attention kernel ``impl`` runs on ``device``: ``(choice, why)``.

    ``auto``, in this order: ``cudnn`` on a CUDA device of compute capability >= 9.0 (Hopper) with
    cuDNN >= 9 (cuDNN fused attention, ~595 / 516 TFLOP/s fwd / bwd on H100 against ~370 / 322 for
    SDPA's default FlashAttention-2); ``fa3`` on Hopper when ``flash_attn_interface`` is installed;
    ``flash`` when ``flash-attn`` is installed (CUDA); otherwise ``sdpa`` (PyTorch's own priority; on
    CPU its flash-attention CPU kernel). An explicit choice is returned as is after checking it can run.

    Raises:
        ValueError: an unknown ``impl``, or ``cudnn`` / ``fa3`` / ``flash`` on a non-CUDA device.
        ImportError: ``fa3`` without ``flash_attn_interface`` or ``flash`` without ``flash-attn``,
            naming the package and the fallback.
    """
    from megatron_anyflow.models.wan.config import ATTENTION_IMPLS

    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    cuda = device.type == "cuda"
    cc = torch.cuda.get_device_capability(device) if cuda else None
    if impl == "auto":
        if not cuda:
            return "sdpa", f"auto on {device.type}: PyTorch SDPA"
        cudnn = torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
        if cc >= (9, 0) and cudnn:
            return "cudnn", f"auto on sm{cc[0]}{cc[1]}: cuDNN fused attention (cuDNN {torch.backends.cudnn.version()})"
        if cc >= (9, 0) and _have("flash_attn_interface"):
            return "fa3", f"auto on sm{cc[0]}{cc[1]}: FlashAttention-3 (cuDNN < 9)"
        if _have("flash_attn"):
            return "flash", f"auto on sm{cc[0]}{cc[1]}: flash-attn"
        return "sdpa", f"auto on sm{cc[0]}{cc[1]}: PyTorch SDPA (no cuDNN >= 9 on Hopper, no flash-attn)"
    if impl == "fa3" and not _have("flash_attn_interface"):
        raise ImportError("attention_impl='fa3' needs FlashAttention-3 (the flash_attn_interface module, built "
                          "from flash-attention's hopper/ directory); use 'cudnn' or 'auto' otherwise")
    if impl == "flash" and not _have("flash_attn"):
        raise ImportError("attention_impl='flash' needs the flash-attn package (GPU only); use 'sdpa' or 'auto'")
    if impl in ("cudnn", "fa3", "flash") and not cuda:
        raise ValueError(f"attention_impl={impl!r} needs a CUDA device; the inputs are on {device} "
                         "(use 'sdpa', 'math' or 'auto')")
    return impl, "requested"


class TorchCoreAttention(nn.Module):
    """Core attention of the local backend: the kernel ``config.attention_impl`` resolves to.

    Inputs q [sq, b, n, d], k / v [sk, b, n, d] (any strides with a contiguous last dim); output
    [sq, b, n * d]. No mask (Wan is bidirectional). The kernel is resolved on the first call from the
    inputs' device (`resolve_attention_impl`) and kept (``self.resolved``). Self-attention's kernel call
    is the region `save_attention_policy` saves.
    """

    def __init__(self, config: WanConfig, attention_type: str = "self", **_unused):
        super().__init__()
        self.impl = config.attention_impl
        self.attention_type = attention_type
        self.resolved: Optional[str] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.resolved is None:
            self.resolved = resolve_attention_impl(self.impl, q.device)[0]
        impl = self.resolved
        sq, b = q.shape[:2]
        with _attention_region(self.attention_type == "self"):
            if impl in ("flash", "fa3"):
                if impl == "fa3":
                    from flash_attn_interface import flash_attn_func
                else:
                    from flash_attn import flash_attn_func
                out = flash_attn_func(*(t.transpose(0, 1) for t in (q, k, v)))  # [b, s, n, d]
                if isinstance(out, tuple):  # some FA3 releases return (out, lse)
                    out = out[0]
                out = out.transpose(0, 1)  # [s, b, n, d]
            else:
                q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
                if impl == "math":
                    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
                    out = torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
                elif impl == "cudnn":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
                    with sdpa_kernel(order, set_priority=True):
                        out = F.scaled_dot_product_attention(q, k, v)
                else:
                    out = F.scaled_dot_product_attention(q, k, v)
                out = out.permute(2, 0, 1, 3)  # [s, b, n, d]
        return out.reshape(sq, b, -1)

    def forward_ranges(self, q: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor]) -> torch.Tensor:
        """Attention of q over the union of several key ranges, without concatenating them (FAR).

        q [sq, b, n, d]; keys / values: lists of [sk_i, b, n, d] (views of the whole sequence's k / v
        or the KV cache); returns [sq, b, n * d] as `forward` over the concatenated keys would. One
        range runs `forward` (the configured kernel). Several: `range_attention.multi_range_attention`
        (each range by PyTorch's flash kernel with its log-sum-exp, merged exactly; on CUDA its
        FlashAttention-2 / memory-efficient kernels whatever ``attention_impl`` is) or, for
        ``"math"``, the same merge in fp32 by explicit formulas. Inside the save-attention region,
        like `forward`: what is saved is q, the ranges (views, no new storage), output and lse.
        """
        if len(keys) == 1:
            return self.forward(q, keys[0], values[0])
        if self.resolved is None:
            self.resolved = resolve_attention_impl(self.impl, q.device)[0]
        sq, b = q.shape[:2]
        with _attention_region(self.attention_type == "self"):
            qq = q.permute(1, 2, 0, 3)  # [b, n, s, d]
            ks = [k.permute(1, 2, 0, 3) for k in keys]
            vs = [v.permute(1, 2, 0, 3) for v in values]
            if self.resolved == "math":
                out = _math_ranges(qq, ks, vs)
            else:
                from megatron_anyflow.models.wan.range_attention import multi_range_attention

                out = multi_range_attention(qq, ks, vs)[0]
            out = out.permute(2, 0, 1, 3)  # [s, b, n, d]
        return out.reshape(sq, b, -1)


def _math_ranges(q, keys, values):
    """``"math"`` over several key ranges: fp32 scores per range, one softmax normaliser (the merged
    log-sum-exp), the weighted values summed over ranges. [b, n, s, d] layout."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = [torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale for k in keys]
    lse = torch.logsumexp(torch.stack([s.logsumexp(-1) for s in scores]), dim=0).unsqueeze(-1)
    out = sum(torch.matmul(torch.exp(s - lse), v.float()) for s, v in zip(scores, values))
    return out.to(q.dtype)


class TECoreAttention(nn.Module):
    """Core attention of the ``te`` backend: Transformer Engine's fused `DotProductAttention`.

    Same interface as `TorchCoreAttention`. Attention stays in bf16 under FP8 (FP8 attention gave
    visible artifacts in a Wan port, docs/design/anyflow.md 6).

    Context parallelism (``config.context_parallel_size > 1``): self-attention uses TE's own CP
    attention (``cp_comm_type`` from the config: ``p2p`` ring by default, ``a2a``, ``a2a+p2p``) on the
    rank's CP chunk of q / k / v; ``handles_context_parallel`` is then True and `WanSelfAttention`
    skips its Ulysses exchange. With no mask the order of tokens inside the CP chunks does not matter
    (RoPE is applied before), so the contiguous chunks need no load-balancing reorder. Cross-attention
    is built with CP off: the text keys / values are whole on every CP rank.
    UNTESTED on CPU (no TE, no GPU here): the local backend's Ulysses path is what the CP tests check.

    Raises:
        ValueError: ``cp_comm_type="all_gather"`` (TE supports it for causal masks only), or, in
            forward, a CP chunk with an odd number of tokens (TE's CP kernels split chunks in two).
    """

    def __init__(self, config: WanConfig, layer_number: int = 1, attention_type: str = "self"):
        super().__init__()
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
        from megatron.core.transformer.enums import AttnMaskType

        self._no_mask = AttnMaskType.no_mask
        self.handles_context_parallel = False
        kwargs = {}
        if config.context_parallel_size > 1:
            if attention_type == "self":
                comm = config.cp_comm_type
                if isinstance(comm, list):  # one entry per layer (megatron's convention)
                    comm = comm[layer_number - 1]
                comm = comm or "p2p"
                if comm == "all_gather":
                    raise ValueError("cp_comm_type='all_gather' supports causal attention only in Transformer "
                                     "Engine; Wan attention is bidirectional: use 'p2p', 'a2a' or 'a2a+p2p'")
                kwargs["cp_comm_type"] = comm
                self.handles_context_parallel = True
            else:
                config = copy.copy(config)
                config.context_parallel_size = 1
        self.attn = TEDotProductAttention(
            config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.no_mask,
            attention_type=attention_type, **kwargs,
        )

    def forward(self, q, k, v):
        if self.handles_context_parallel and q.shape[0] % 2:
            raise ValueError(f"Transformer Engine context-parallel attention needs an even number of tokens "
                             f"per CP rank; got {q.shape[0]}")
        out = self.attn(q, k, v, attention_mask=None, attn_mask_type=self._no_mask)
        return out.reshape(q.shape[0], q.shape[1], -1)


@dataclass
class WanSelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


@dataclass
class WanCrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


@dataclass
class WanMLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


@dataclass
class WanLayerSubmodules:
    self_attention: Union[ModuleSpec, type] = None
    cross_attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class WanColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's column-parallel linear (same parameters, sharding and checkpoints) whose forward is
    one ``F.linear`` with the bias in the GEMM, behind the TP mapping of its input.

    megatron's forward adds the bias in a separate pass after its matmul and communicates with in-place
    ``torch.distributed`` calls inside a custom autograd function, which ``torch.compile`` cannot keep
    in a graph. Here: TP = 1 -> ``F.linear``; TP > 1 -> `gather_sequence_tp` (SP) or `copy_to_tp`
    (functional collectives, same gradients as megatron's mappings), then ``F.linear``. Configurations
    this does not cover (``skip_bias_add``, ``gather_output``) run megatron's forward.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.skip_bias_add or self.gather_output or runtime_gather_output:
            return super().forward(input_, weight, runtime_gather_output)
        w = self.weight if weight is None else weight
        if tp_world_size() > 1:
            input_ = gather_sequence_tp(input_) if self.sequence_parallel else copy_to_tp(input_)
        return F.linear(input_, w, self.bias), None


class WanRowParallelLinear(RowParallelLinear):
    """megatron-core's row-parallel linear with a traceable forward (see `WanColumnParallelLinear`):
    TP = 1 -> one ``F.linear`` with its bias; TP > 1 -> ``F.linear`` on the local input columns, then
    `reduce_scatter_sequence_tp` (SP) or `reduce_from_tp`, then the bias (added once, after the sum).
    ``skip_bias_add`` or a non-parallel input run megatron's forward."""

    def forward(self, input_):
        if self.skip_bias_add or not self.input_is_parallel:
            return super().forward(input_)
        if tp_world_size() == 1:
            return F.linear(input_, self.weight, self.bias), None
        y = F.linear(input_, self.weight)
        y = reduce_scatter_sequence_tp(y) if self.sequence_parallel else reduce_from_tp(y)
        return (y + self.bias if self.bias is not None else y), None


def _init_method(config: WanConfig):
    std = config.init_method_std
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _mark_partition(t: Optional[torch.Tensor], dim: int) -> None:
    # megatron-core only sets these while initialising weights (not with perform_initialization=False);
    # checkpoint sharding and conversion rely on them, so set them whatever the init path.
    if t is not None:
        t.tensor_model_parallel, t.partition_dim, t.partition_stride = True, dim, 1


def _column(spec, config, in_size, out_size):
    lin = build_module(spec, in_size, out_size, config=config, init_method=_init_method(config), bias=True,
                       gather_output=False, skip_bias_add=False, is_expert=False)
    _mark_partition(lin.weight, 0)
    _mark_partition(lin.bias, 0)
    return lin


def _row(spec, config, in_size, out_size):
    lin = build_module(spec, in_size, out_size, config=config, init_method=_init_method(config), bias=True,
                       input_is_parallel=True, skip_bias_add=False, is_expert=False)
    _mark_partition(lin.weight, 1)
    if lin.bias is not None:
        lin.bias.tensor_model_parallel = False
    return lin


def _heads_local(config: WanConfig) -> int:
    tp = tp_world_size()
    if config.num_attention_heads % tp != 0:
        raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by the "
                         f"tensor-parallel size {tp}")
    return config.num_attention_heads // tp


class WanSelfAttention(MegatronModule):
    """Self-attention with qk RMSNorm across all heads and 3D RoPE.

    ``linear_qkv`` is one column-parallel linear whose output rows are laid out head by head as
    (head, {q, k, v}, head_dim): a TP split by heads is then a contiguous slice (resharding in
    distributed checkpoints stays a plain split) and one sequence-parallel all-gather serves q, k and v.

    Context parallelism (Ulysses, local backend): after ``linear_qkv`` the rank holds its CP chunk of
    the sequence (s = S / cp tokens; gathered over TP under SP) for its n / tp heads. The qk RMSNorm
    (statistic all-reduced over TP) and RoPE (with the chunk's true positions) are applied there, then
    one all-to-all over the CP group exchanges q, k, v to the whole sequence for n / (tp * cp) heads;
    core attention; the inverse all-to-all returns [s, b, n / tp * d] for ``linear_proj``. A core
    attention with ``handles_context_parallel`` (TE's CP attention) gets the CP chunk directly.

    Raises:
        ValueError: the heads do not divide by TP (x CP on the Ulysses path).
    """

    def __init__(self, config: WanConfig, submodules: WanSelfAttentionSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        h, d = config.hidden_size, config.head_dim
        self.heads_local = _heads_local(config)
        self.linear_qkv = _column(submodules.linear_qkv, config, h, 3 * h)
        self.linear_qkv.lora_out_groups = (3, d)  # read by LoRA: output interleaved (head, group, d)
        self.q_layernorm = HeadShardedRMSNorm(self.heads_local * d, h, config.layernorm_epsilon)
        self.k_layernorm = HeadShardedRMSNorm(self.heads_local * d, h, config.layernorm_epsilon)
        # TE's fused RoPE on the te backend (None without TE or on the local backend: `apply_rotary`).
        self._te_rope = te_fused_rope() if config.backend == "te" else None
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attention_type="self")
        self.linear_proj = _row(submodules.linear_proj, config, h, h)
        cp = cp_world_size()
        self.layer_number = layer_number
        self.cp_handled_by_core = cp > 1 and getattr(self.core_attention, "handles_context_parallel", False)
        self.ulysses = cp > 1 and not self.cp_handled_by_core
        if self.ulysses and self.heads_local % cp:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                             f"tensor-parallel size {tp_world_size()} x context-parallel size {cp} "
                             "(Ulysses context parallelism splits heads over TP x CP)")

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], far=None) -> torch.Tensor:
        """x [s, b, h] local tokens; rope (cos, sin) [S / cp, 1, 1, d / 2] of this rank's CP chunk.
        ``far``: the `models.wan.far.FarAttention` of an AnyFlow-FAR forward (grouped attention over
        the whole sequence after the Ulysses exchange, KV-cache read / write); None: full attention."""
        qkv, _ = self.linear_qkv(x)  # [S / cp, b, n_local * 3 * d] (whole CP chunk under SP)
        s, b = qkv.shape[:2]
        # Views of the fused output (backward: one stack, not three zero-filled select_backward buffers).
        q, k, v = qkv.view(s, b, self.heads_local, 3, -1).unbind(3)  # [s, b, n_local, d] each
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = rope
        if self._te_rope is not None:  # te backend: TE's fused RoPE kernel (one pass per tensor)
            q, k = apply_rotary_te(self._te_rope, q, cos, sin), apply_rotary_te(self._te_rope, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if far is not None:
            if self.cp_handled_by_core:
                raise ValueError("AnyFlow-FAR attention cannot run through Transformer Engine's context-parallel "
                                 "attention (it has no block mask); use the local backend with context parallelism")
            if self.ulysses:
                q, k, v = all_to_all_heads_to_sequence(torch.stack([q, k, v.to(q.dtype)], dim=3)).unbind(3)
            ranges = getattr(self.core_attention, "forward_ranges", None)
            out = far.attend(functools.partial(recompute_if, self.config, "core_attn", self.core_attention),
                             q, k, v.to(q.dtype), self.layer_number - 1,
                             core_ranges=None if ranges is None else
                             functools.partial(recompute_if, self.config, "core_attn", ranges))
            if self.ulysses:
                out = out.view(out.shape[0], b, self.heads_local // cp_world_size(), -1)
                out = all_to_all_sequence_to_heads(out).reshape(s, b, -1)
        elif not self.ulysses:
            out = recompute_if(self.config, "core_attn", self.core_attention, q, k, v.contiguous())
        else:
            # [s, b, n_local, 3, d] -> [S, b, n_local / cp, 3, d]: one exchange for q, k and v.
            q, k, v = all_to_all_heads_to_sequence(torch.stack([q, k, v.to(q.dtype)], dim=3)).unbind(3)
            out = recompute_if(self.config, "core_attn", self.core_attention, q.contiguous(), k.contiguous(),
                                 v.contiguous())  # [S, b, n_l/cp * d]
            out = out.view(out.shape[0], b, self.heads_local // cp_world_size(), -1)
            out = all_to_all_sequence_to_heads(out).reshape(s, b, -1)  # [s, b, n_local * d]
        out, _ = self.linear_proj(out)
        return out


class WanCrossAttention(MegatronModule):
    """Cross-attention to the text states; keys / values are the whole text on every rank."""

    def __init__(self, config: WanConfig, submodules: WanCrossAttentionSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        h, d = config.hidden_size, config.head_dim
        self.heads_local = _heads_local(config)
        self.linear_q = _column(submodules.linear_q, config, h, h)
        self.linear_kv = _column(submodules.linear_kv, config, h, 2 * h)
        # Text states are replicated on every TP rank, never sequence-split: no SP gather on this input.
        self.linear_kv.sequence_parallel = False
        if tp_world_size() > 1:
            self.linear_kv.allreduce_dgrad = True
        self.linear_kv.lora_out_groups = (2, d)
        self.q_layernorm = HeadShardedRMSNorm(self.heads_local * d, h, config.layernorm_epsilon)
        self.k_layernorm = HeadShardedRMSNorm(self.heads_local * d, h, config.layernorm_epsilon)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attention_type="cross")
        self.linear_proj = _row(submodules.linear_proj, config, h, h)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q, _ = self.linear_q(x)
        kv, _ = self.linear_kv(text)
        s, b = q.shape[:2]
        l = kv.shape[0]
        q = self.q_layernorm(q.view(s, b, self.heads_local, -1))
        k, v = kv.view(l, b, self.heads_local, 2, -1).unbind(3)  # views of the fused k / v output
        k = self.k_layernorm(k)
        out = recompute_if(self.config, "core_attn", self.core_attention, q, k, v.contiguous())
        out, _ = self.linear_proj(out)
        return out


class WanMLP(MegatronModule):
    """GELU-tanh feed-forward: column-parallel fc1, row-parallel fc2."""

    def __init__(self, config: WanConfig, submodules: WanMLPSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        self.linear_fc1 = _column(submodules.linear_fc1, config, config.hidden_size, config.ffn_hidden_size)
        self.linear_fc2 = _row(submodules.linear_fc2, config, config.ffn_hidden_size, config.hidden_size)

    def forward(self, x):
        y, _ = self.linear_fc1(x)
        y, _ = self.linear_fc2(F.gelu(y, approximate="tanh"))
        return y


class WanLayer(MegatronModule):
    """One Wan2.1 DiT block (see the module docstring for the formula).

    Forward:
        x: [s, b, h] hidden states (``s`` = the rank's tokens under context / sequence parallelism).
        e: [F, b, 6, h] per-frame modulation from the time projection (F = 1 when uniform).
        text: [L, b, h] embedded text states (whole on every rank).
        rope: (cos, sin) [S / cp, 1, 1, d/2] for the rank's CP chunk of the sequence (the tokens
            self-attention's qkv holds; the whole sequence at CP = 1).
        segments: `FrameSegments` mapping local tokens to frames (modulation rows).
        far: the `models.wan.far.FarAttention` of an AnyFlow-FAR forward, or None (full attention).
    Returns [s, b, h] in x's dtype.
    """

    def __init__(self, config: WanConfig, submodules: WanLayerSubmodules, layer_number: int = 1):
        super().__init__(config=config)
        h = config.hidden_size
        self.layer_number = layer_number
        self.eps = config.layernorm_epsilon
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number)
        self.cross_attn_norm = (nn.LayerNorm(h, eps=self.eps, elementwise_affine=True, dtype=torch.float32)
                                if config.cross_attn_norm else None)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, h, dtype=torch.float32) / h ** 0.5)

    def _ln(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)

    def forward(self, x, e, text, rope, segments: FrameSegments, far=None):
        mod = (self.scale_shift_table[None] + e.float()).unbind(2)  # 6 x [F, b, h], fp32
        shift, scale, gate, c_shift, c_scale, c_gate = mod

        y = segments.apply(_modulate, (self._ln(x),), (shift, scale)).type_as(x)
        y = self.self_attention(y, rope, far) if far is not None else self.self_attention(y, rope)
        x = segments.apply(_gated_add, (x.float(), y), (gate,)).type_as(x)

        y = self.cross_attn_norm(x.float()).type_as(x) if self.cross_attn_norm is not None else x
        x = x + self.cross_attention(y, text)

        y = segments.apply(_modulate, (self._ln(x),), (c_shift, c_scale)).type_as(x)
        y = recompute_if(self.config, "mlp", self.mlp, y)
        x = segments.apply(_gated_add, (x.float(), y.float()), (c_gate,)).type_as(x)
        return x
