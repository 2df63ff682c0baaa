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

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_anyflow.models.wan.config import WanConfig
from megatron_anyflow.models.wan.rope import apply_rotary
from megatron_anyflow.parallel.context_parallel import (
    all_to_all_heads_to_sequence,
    all_to_all_sequence_to_heads,
    cp_world_size,
)
from megatron_anyflow.parallel.tensor_parallel import all_reduce_sum_tp, tp_world_size


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

    ``config.recompute_granularity == "selective"`` with ``module`` in ``config.recompute_modules``
    (``"core_attn"``: attention scores / softmax; ``"mlp"``: the FFN with its [s, b, ffn] activation).
    """
    if (config.recompute_granularity == "selective" and module in (config.recompute_modules or ())
            and torch.is_grad_enabled()):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


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
    Numerics follow diffusers' `RMSNorm` (fp32 statistic, eps inside the root).

    Args:
        local_dim: channels on this rank (heads_local * head_dim).
        full_dim: channels over all ranks (heads * head_dim).
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
        ss = all_reduce_sum_tp(xf.pow(2).sum(-1, keepdim=True))
        y = xf * torch.rsqrt(ss / self.full_dim + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return y.to(self.weight.dtype) * self.weight
        return (y * self.weight).to(x.dtype)


class TorchCoreAttention(nn.Module):
    """Core attention of the local backend: PyTorch SDPA (or the explicit math form).

    Inputs q [sq, b, n, d], k / v [sk, b, n, d]; output [sq, b, n * d]. No mask (Wan is bidirectional).
    """

    def __init__(self, config: WanConfig, **_unused):
        super().__init__()
        self.impl = config.attention_impl

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
        if self.impl == "flash":
            try:
                from flash_attn import flash_attn_func
            except ImportError as err:
                raise ImportError("attention_impl='flash' needs the flash-attn package (GPU only); use 'sdpa'") from err
            out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))  # [b, s, n, d]
            b, s, n, d = out.shape
            return out.permute(1, 0, 2, 3).reshape(s, b, n * d)
        if self.impl == "math":
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
            out = torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


class TECoreAttention(nn.Module):
    """Core attention of the ``te`` backend: Transformer Engine's fused `DotProductAttention`.

    Same interface as `TorchCoreAttention`. Attention stays in bf16 under FP8 (FP8 attention gave
    visible artifacts in a Wan port, ANYFLOW.md section 6).

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
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attention_type="self")
        self.linear_proj = _row(submodules.linear_proj, config, h, h)
        cp = cp_world_size()
        self.ulysses = cp > 1 and not getattr(self.core_attention, "handles_context_parallel", False)
        if self.ulysses and self.heads_local % cp:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                             f"tensor-parallel size {tp_world_size()} x context-parallel size {cp} "
                             "(Ulysses context parallelism splits heads over TP x CP)")

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [s, b, h] local tokens; rope (cos, sin) [S / cp, 1, 1, d / 2] of this rank's CP chunk."""
        qkv, _ = self.linear_qkv(x)  # [S / cp, b, n_local * 3 * d] (whole CP chunk under SP)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.heads_local, 3, -1)
        q = self.q_layernorm(qkv[:, :, :, 0].reshape(s, b, -1)).view(s, b, self.heads_local, -1)
        k = self.k_layernorm(qkv[:, :, :, 1].reshape(s, b, -1)).view(s, b, self.heads_local, -1)
        v = qkv[:, :, :, 2]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if not self.ulysses:
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
        q = self.q_layernorm(q).view(s, b, self.heads_local, -1)
        kv = kv.view(l, b, self.heads_local, 2, -1)
        k = self.k_layernorm(kv[:, :, :, 0].reshape(l, b, -1)).view(l, b, self.heads_local, -1)
        v = kv[:, :, :, 1].contiguous()
        out = recompute_if(self.config, "core_attn", self.core_attention, q, k, v)
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
        segments: `FrameSegments` mapping local tokens to frames.
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

    def forward(self, x, e, text, rope, segments: FrameSegments):
        mod = (self.scale_shift_table[None] + e.float()).unbind(2)  # 6 x [F, b, h], fp32
        shift, scale, gate, c_shift, c_scale, c_gate = mod

        y = segments.apply(_modulate, (self._ln(x),), (shift, scale)).type_as(x)
        y = self.self_attention(y, rope)
        x = segments.apply(_gated_add, (x.float(), y), (gate,)).type_as(x)

        y = self.cross_attn_norm(x.float()).type_as(x) if self.cross_attn_norm is not None else x
        x = x + self.cross_attention(y, text)

        y = segments.apply(_modulate, (self._ln(x),), (c_shift, c_scale)).type_as(x)
        y = recompute_if(self.config, "mlp", self.mlp, y)
        x = segments.apply(_gated_add, (x.float(), y.float()), (c_gate,)).type_as(x)
        return x
