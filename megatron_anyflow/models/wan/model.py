"""The Wan2.1 / Wan2.2 DiT with AnyFlow's two-time conditioning, on megatron-core.

Equivalent to diffusers' `AnyFlowTransformer3DModel` (with the delta embedder) and
`WanTransformer3DModel` (without it, Wan2.1 and Wan2.2 configs, per-token timesteps included); tested
against both.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import WanConfig
from megatron_anyflow.models.wan.layer import FrameSegments, _modulate, save_attention_policy
from megatron_anyflow.models.wan.rope import RotaryCache, rope_angles_at, rope_tables
from megatron_anyflow.models.wan.specs import get_wan_layer_spec
from megatron_anyflow.parallel.context_parallel import (
    check_sequence_split,
    cp_rank,
    cp_world_size,
    gather_from_context_parallel_region,
    local_token_range,
    reduce_grad_over_context_parallel,
    split_to_context_parallel_region,
)
from megatron_anyflow.parallel.tensor_parallel import mark_sequence_parallel, tp_rank, tp_world_size


def checkpoint_block(config: WanConfig, block: nn.Module, x, e, text, rope, segments, layer: int = 0, far=None):
    """Run ``block`` with its activations recomputed in backward, as ``config`` asks.

    - ``recompute_granularity="full"``: the whole block is recomputed (non-reentrant
      `torch.utils.checkpoint`). With FP8 (te backend) megatron-core's TE-aware checkpoint
      (``te_checkpoint`` over ``transformer_engine.pytorch.distributed.checkpoint``) is used instead: the
      recomputation re-enters ``fp8_autocast`` with the forward's scaling factors and does not update
      the amax history twice (a plain checkpoint would replay the GEMMs outside the FP8 context).
    - ``"selective"`` with ``recompute_policy="save-attention"``: one selective checkpoint of the block
      (`torch.utils.checkpoint.create_selective_checkpoint_contexts` with
      `layer.save_attention_policy`): self-attention's q, k, v, output and log-sum-exp are kept,
      everything else is recomputed.

    The replay runs in the adapter scope of this forward (`lora.bind_adapter_scope`), so an adapter set
    globally between forward and backward does not change it.
    """
    fn = L.bind_adapter_scope(block)
    if far is not None:  # AnyFlow-FAR: the attention plan is a constant of the region
        fn = functools.partial(_call_far_block, fn, far)
    if config.recompute_granularity == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        ctx = functools.partial(create_selective_checkpoint_contexts, save_attention_policy)
        return torch.utils.checkpoint.checkpoint(fn, x, e, text, rope, segments, use_reentrant=False, context_fn=ctx)
    if config.fp8:  # UNTESTED here (no Transformer Engine on CPU)
        from megatron.core import parallel_state
        from megatron.core.extensions.transformer_engine import te_checkpoint
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        def run(x, e, text):  # tensors needing gradients are arguments; the rest is captured
            return fn(x, e, text, rope, segments)

        return te_checkpoint(run, False, get_cuda_rng_tracker, parallel_state.get_tensor_model_parallel_group(),
                             x, e, text)
    return torch.utils.checkpoint.checkpoint(fn, x, e, text, rope, segments, use_reentrant=False)


def _call_far_block(fn, far, x, e, text, rope, segments):
    return fn(x, e, text, rope, segments, far)


def _per_frame_times(x, name: str, b: int, f: int, device) -> torch.Tensor:
    """A time input (number, [b] or [b, f]) as float32 [b, f] on ``device``.

    Raises:
        ValueError: another shape (named, with the expected ones).
    """
    x = torch.as_tensor(x, device=device)
    if x.dim() == 0:
        x = x.expand(b)
    if x.dim() == 1:
        x = x[:, None].expand(b, f)
    if tuple(x.shape) != (b, f):
        raise ValueError(f"{name} must be [b] or [b, f] = [{b}] or [{b}, {f}]; got {tuple(x.shape)}")
    return x.float()


def _per_token_times(x, name: str, b: int, seq: int, device) -> torch.Tensor:
    """A per-token time input [b, seq] as float32 on ``device`` (diffusers Wan2.2's ``timestep`` layout:
    the patch tokens frame-major, row-major within a frame)."""
    x = torch.as_tensor(x, device=device)
    if tuple(x.shape) != (b, seq):
        raise ValueError(f"{name} must be [b], [b, f] or per token [b, S] = [{b}, {seq}]; got {tuple(x.shape)}")
    return x.float()


def token_time_runs(t: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """Run-length encoding of per-token times: the modulation rows of a per-token forward.

    Args:
        t, r: [b, S] float32 times per token (0..1000).
    Returns:
        ``(t_rows, r_rows, runs)``: [b, n] times of the n maximal runs of consecutive tokens whose (t, r)
        agree in every sample, and ``runs`` = [(row, tokens)] covering the S tokens in order (the input of
        `layer.FrameSegments.from_runs`). Wan2.2 TI2V's per-token timesteps (the image frame at 0, the
        rest at t) give one run per differing frame; uniform times give one run; arbitrary per-token
        times give up to S runs (correct, one modulation segment each).
    """
    seq = t.shape[1]
    tr = torch.stack([t, r])  # [2, b, S]
    change = (tr[:, :, 1:] != tr[:, :, :-1]).flatten(0, 1).any(0)  # [S - 1]
    starts = [0] + (torch.nonzero(change).flatten() + 1).tolist()
    ends = starts[1:] + [seq]
    idx = torch.tensor(starts, device=t.device)
    return t[:, idx], r[:, idx], [(i, e - s) for i, (s, e) in enumerate(zip(starts, ends))]


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep projection, diffusers `Timesteps(dim, flip_sin_to_cos=True, shift=0)`.

    Args:
        t: [n] timesteps on the 0..1000 scale; computed in float32 whatever the input dtype (bf16
            timesteps are 4 apart near 1000 and break stage 1's finite difference).
    Returns:
        [n, dim] float32, ``cat(cos, sin)``.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """``linear_2(silu(linear_1(sinusoid)))``, diffusers `TimestepEmbedding` (freq_dim -> hidden)."""

    def __init__(self, freq_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TextEmbedder(nn.Module):
    """``linear_2(gelu_tanh(linear_1(text)))``, diffusers `PixArtAlphaTextProjection`."""

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    """Time (and AnyFlow delta-time) and text embedders.

    AnyFlow interpolated timestep conditioning (paper sec. 4.2.1; ref ``delta_embedder``):
    ``emb = (1 - g) emb_t(t) + g emb_r(r)``, g = 0.25, computed as ``emb_t + g (emb_r - emb_t)`` so that
    with ``delta_embedder`` a copy of ``time_embedder`` and t = r the result is exactly ``emb_t(t)``.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        h = config.hidden_size
        self.freq_dim = config.freq_dim
        self.gate = config.delta_gate
        self.deltatime_type = config.deltatime_type
        self.time_embedder = TimestepEmbedder(config.freq_dim, h)
        self.delta_embedder = TimestepEmbedder(config.freq_dim, h) if config.delta_embedder else None
        self.time_proj = nn.Linear(h, 6 * h)
        self.text_embedder = TextEmbedder(config.text_dim, h)

    def reset_delta_embedder(self) -> None:
        """Initialise the delta embedder as a copy of the time embedder (AnyFlow stage-1 start)."""
        if self.delta_embedder is None:
            raise ValueError("this model has no delta embedder (WanConfig.delta_embedder=False)")
        self.delta_embedder.load_state_dict(self.time_embedder.state_dict())

    def time_embedding(self, t: torch.Tensor, r: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Fused time embedding [n, h] in ``dtype`` from t, r [n] on the 0..1000 scale (float32)."""
        emb_dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(timestep_sinusoid(t, self.freq_dim).to(emb_dtype)).to(dtype)
        if self.delta_embedder is None:
            return temb
        d = r if self.deltatime_type == "r" else t - r
        demb = self.delta_embedder(timestep_sinusoid(d, self.freq_dim).to(emb_dtype)).to(dtype)
        return temb + self.gate * (demb - temb)


class WanModel(MegatronModule):
    """Wan2.1 / Wan2.2 DiT predicting AnyFlow's average velocity ``u(z_t, t, r)``.

    Inputs:
        latents: [b, f, c, H, W] (frame-major latents, AnyFlow / diffusers layout); H, W divisible by
            the patch size, f by the temporal patch.
        t: [b], [b, f] (per frame) or [b, S] (per token, S = f/pt * H/ph * W/pw patch tokens frame-major,
            diffusers Wan2.2's ``timestep``) source time on the 0..1000 scale (float32 kept into the
            sinusoid). A [b, f] input is read per frame whenever f == S is ambiguous (then the two agree
            unless pt > 1).
        r: like t (per frame or per token; mixed with t, the per-frame one is expanded to tokens) target
            time on the 0..1000 scale; ignored (may be None) without the delta embedder; None means r = t.
        text: [b, L, text_dim] text-encoder states.
    Returns:
        u: [b, f, c_out, H, W] in the model dtype; flow map ``f(z_t, t, r) = z_t - (t - r)/1000 * u``.

    Parallelism: the S tokens (frame-major) are split into contiguous chunks over the context-parallel
    group (CP rank c keeps [c S / cp, (c + 1) S / cp)), and each chunk over the tensor-parallel group
    when ``config.sequence_parallel`` (CP outer, TP inner). Self-attention exchanges heads for the
    sequence over CP (Ulysses all-to-all, or TE's CP attention); cross-attention keys / values (text)
    are whole on every rank; RoPE and the per-frame modulation use each token's global position. The
    output is gathered whole on every rank (backward: split, the loss being replicated), so after
    backward every parameter gradient is a partial sum over CP ranks: call
    `parallel.tensor_parallel.finalize_model_grads` (SP sum over TP, sum over CP, mean over DP).
    Gradients with respect to the inputs come out whole. Per-frame timesteps give per-frame modulation;
    per-token timesteps give one modulation row per run of equal (t, r) tokens (`token_time_runs`), so
    Wan2.2 TI2V's image-frame-at-0 layout costs what per-frame times cost.

    Raises:
        ValueError: bad input shapes (naming the shape and what was expected); a token count that does
            not divide by the context-parallel size (x the tensor-parallel size under sequence
            parallelism), naming the count, the grid and the sizes; at construction, a
            ``config.context_parallel_size`` different from the initialised context-parallel group, or
            heads not divisible by TP (x CP).
    """

    def __init__(self, config: WanConfig, layer_spec: Optional[ModuleSpec] = None):
        super().__init__(config=config)
        self.config: WanConfig = config
        if config.context_parallel_size != cp_world_size():
            raise ValueError(f"WanConfig.context_parallel_size={config.context_parallel_size} but the initialised "
                             f"context-parallel group has {cp_world_size()} rank(s); set both to the same size "
                             "(initialize_parallel(..., context_parallel_size=N))")
        if (config.recompute_granularity == "selective" and config.recompute_policy == "save-attention"
                and (config.backend != "local" or config.fp8)):
            raise ValueError(f"recompute_policy='save-attention' needs backend='local' without FP8 (got backend="
                             f"{config.backend!r}, fp8={config.fp8!r}): Transformer Engine's fused attention is "
                             "not an op the selective checkpoint can save; use recompute_granularity='full' "
                             "(FP8-aware) or recompute_policy='modules'")
        h = config.hidden_size
        p = config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_channels, h, kernel_size=p, stride=p)
        if config.far:
            # AnyFlow-FAR's compressed-context embedding, initialised by trilinear interpolation of the
            # patch embedding (docs/design/far.md 1.1; trained fully, not with LoRA). Replicated over TP and applied
            # before the CP / SP split, like patch_embedding.
            cps = config.compressed_patch_size
            self.far_patch_embedding = nn.Conv3d(config.in_channels, h, kernel_size=cps, stride=cps)
            self.reset_far_patch_embedding()
        self.condition_embedder = ConditionEmbedder(config)
        spec = layer_spec if layer_spec is not None else get_wan_layer_spec(config.backend)
        self.blocks = nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)]
        )
        self.proj_out = nn.Linear(h, config.out_channels * math.prod(p))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, h) / h ** 0.5)
        self.rope = RotaryCache(config.rope_split, config.rope_theta)
        if config.params_dtype != torch.float32:
            self._cast_low_precision(config.params_dtype)
        if config.sequence_parallel and tp_world_size() > 1:
            # Replicated parameters used on the rank's token slice only: their gradients are partial
            # sums over TP ranks (allreduce_sequence_parallel_grads sums them).
            ce = self.condition_embedder
            mark_sequence_parallel(ce.time_embedder.parameters())
            mark_sequence_parallel(ce.time_proj.parameters())
            if ce.delta_embedder is not None:
                mark_sequence_parallel(ce.delta_embedder.parameters())
            mark_sequence_parallel([self.scale_shift_table, *self.proj_out.parameters()])
            for blk in self.blocks:
                mark_sequence_parallel([blk.scale_shift_table])
                if blk.cross_attn_norm is not None:
                    mark_sequence_parallel(blk.cross_attn_norm.parameters())

    def reset_far_patch_embedding(self) -> None:
        """``far_patch_embedding`` := trilinear interpolation of ``patch_embedding`` (bias copied), the
        initialisation of diffusers' `AnyFlowFARTransformer3DModel` and the reference ``setup_far_model``.

        Raises:
            ValueError: the model is not a FAR model.
        """
        from megatron_anyflow.models.wan.far import trilinear_far_patch_init

        if not self.config.far:
            raise ValueError("this model has no far_patch_embedding (WanConfig.far=False)")
        with torch.no_grad():
            w = trilinear_far_patch_init(self.patch_embedding.weight.float(), self.config.compressed_patch_size)
            self.far_patch_embedding.weight.copy_(w.to(self.far_patch_embedding.weight.dtype))
            self.far_patch_embedding.bias.copy_(self.patch_embedding.bias)

    def _cast_low_precision(self, dtype):
        """Cast to ``dtype`` but keep diffusers' fp32 modules (time embedders, adaLN tables, the affine
        cross-attention norm)."""
        keep = {id(p) for m in (self.condition_embedder.time_embedder, self.condition_embedder.delta_embedder)
                if m is not None for p in m.parameters()}
        keep.add(id(self.scale_shift_table))
        for blk in self.blocks:
            keep.add(id(blk.scale_shift_table))
            if blk.cross_attn_norm is not None:
                keep.update(id(p) for p in blk.cross_attn_norm.parameters())
            # q / k RMSNorm weights follow the model dtype, as diffusers' norm_q / norm_k (not in its
            # _keep_in_fp32_modules): a bf16 weight keeps the three q / k norm products in bf16.
        for p in self.parameters():
            if id(p) not in keep:
                p.data = p.data.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, latents, t, r, text):
        cfg = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be [b, f, c, H, W]; got shape {tuple(latents.shape)}")
        b, f, c, H, W = latents.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels; the model expects in_channels={cfg.in_channels}")
        if f % pt or H % ph or W % pw:
            raise ValueError(f"latent shape (f={f}, H={H}, W={W}) is not divisible by patch_size {cfg.patch_size}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must be [b={b}, L, text_dim={cfg.text_dim}]; got {tuple(text.shape)}")
        seq = (f // pt) * (H // ph) * (W // pw)

        def times(x, name):
            if x is None:
                return None
            if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == seq and x.shape[1] != f:
                return _per_token_times(x, name, b, seq, latents.device)
            try:
                return _per_frame_times(x, name, b, f, latents.device)
            except ValueError:
                raise ValueError(f"{name} must be [b], [b, f] or per token [b, S] = [{b}], [{b}, {f}] or "
                                 f"[{b}, {seq}]; got {tuple(torch.as_tensor(x).shape)}") from None

        return [times(x, name) for name, x in (("t", t), ("r", r))]

    def _per_token_time_rows(self, t, r, f, grid, start, length):
        """Per-token forward: (t_rows [b, n], r_rows [b, n], `FrameSegments` of the local tokens
        [start, start + length)) from t, r [b, S] or [b, f] (a per-frame one expanded to its tokens)."""
        pt = self.config.patch_size[0]
        hw = grid[1] * grid[2]
        t, r = (x[:, ::pt].repeat_interleave(hw, dim=1) if x.shape[1] == f else x for x in (t, r))
        t_rows, r_rows, runs = token_time_runs(t, r)
        return t_rows, r_rows, FrameSegments.from_runs(runs, start, length)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, r: Optional[torch.Tensor], text: torch.Tensor,
                adapter=L._UNSET, *, chunk_partition: Optional[Sequence[int]] = None,
                clean_latents: Optional[torch.Tensor] = None, clean_t: Optional[torch.Tensor] = None,
                kv_cache=None, dense_mask: bool = False):
        """See the class docstring. ``adapter``: the LoRA adapter this call runs (a name, or None for the
        frozen base alone); omitted, the one `lora.set_active_adapter` selected. Recomputed blocks replay
        with the same adapter, whatever is selected when backward runs.

        AnyFlow-FAR (``config.far``; docs/design/far.md 1; `models.wan.far`), selected by ``chunk_partition``:

        - training / teacher forcing (``kv_cache`` None): ``latents`` [b, F, c, H, W] are the chunks
          ``chunk_partition`` (sum = F); t, r [b] or [b, F] per frame (context frames t = r = 0).
          ``clean_latents`` [b, Ff, c, H, W]: clean copies of the full-resolution (last
          ``min(n, full_chunk_limit)``) chunks, at ``clean_t`` [b] / [b, Ff] (default 0; used for t and r).
          Returns u of the full-resolution chunks, [b, Ff, c, H, W].
        - generation step (``kv_cache`` a `FarKVCache` of ``chunk_partition[:-1]``): ``latents`` are the
          last chunk only, [b, chunk_partition[-1], c, H, W]; returns its u.
        - ``dense_mask``: the masked-SDPA reference attention instead of the grouped one (tests).

        Without ``chunk_partition`` a FAR model runs the bidirectional forward of the same weights.

        Raises:
            KeyError: ``adapter`` is not defined on the model's LoRA linears.
            ValueError: FAR arguments on a non-FAR model, inconsistent chunk / cache / shape arguments.
        """
        if adapter is L._UNSET:
            adapter = L.default_adapter(self)
        with L.adapter_scope(adapter):
            if chunk_partition is None:
                if clean_latents is not None or kv_cache is not None:
                    raise ValueError("clean_latents / kv_cache are AnyFlow-FAR arguments: pass chunk_partition")
                return self._forward(latents, t, r, text)
            return self._forward_far(latents, t, r, text, chunk_partition, clean_latents, clean_t, kv_cache,
                                     dense_mask)

    @torch.no_grad()
    def prefill(self, latents: torch.Tensor, text: torch.Tensor, chunk_partition: Sequence[int],
                adapter=L._UNSET, dense_mask: bool = False):
        """Encode the clean prefix into a new KV cache (AnyFlow-FAR, docs/design/far.md 1.6), without gradient.

        Args:
            latents: [b, sum(chunk_partition), c, H, W] clean latents of chunks 0..j (generated or given).
            text: [b, L, text_dim].
            chunk_partition: cp[:j+1].
        Returns:
            `FarKVCache` of chunk_partition: every layer's post-RoPE K and V of the prefix, encoded at
            t = r = 0 with the last ``full_chunk_limit - 1`` chunks full resolution, older ones compressed,
            block-causal (the reference re-encodes the whole prefix after every chunk; so do we).
        """
        if adapter is L._UNSET:
            adapter = L.default_adapter(self)
        b, f = latents.shape[:2]
        zeros = torch.zeros(b, f, device=latents.device)
        with L.adapter_scope(adapter):
            return self._forward_far(latents, zeros, zeros, text, chunk_partition, None, None, None, dense_mask,
                                     prefill=True)

    def _forward(self, latents, t, r, text):
        cfg = self.config
        # Inputs are replicated over CP but each CP rank back-propagates only its tokens' share: sum
        # their gradients over CP (no-op unless they require grad).
        latents, text = reduce_grad_over_context_parallel(latents), reduce_grad_over_context_parallel(text)
        t, r = (reduce_grad_over_context_parallel(v) if isinstance(v, torch.Tensor) else v for v in (t, r))
        t, r = self._check_inputs(latents, t, r, text)
        if r is None:
            r = t
        b, f, _, H, W = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, H // ph, W // pw)
        tokens_per_frame = grid[1] * grid[2]
        seq = grid[0] * tokens_per_frame
        dtype = self.dtype

        # Patch embedding -> [S, b, h]
        x = self.patch_embedding(latents.permute(0, 2, 1, 3, 4).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).permute(2, 0, 1).contiguous().to(dtype)

        # Context / sequence parallelism: this rank keeps a contiguous slice of the tokens (its CP chunk,
        # further split over TP under SP; CP outer, TP inner).
        tp, cp = tp_world_size(), cp_world_size()
        sp = cfg.sequence_parallel and tp > 1
        sp_tp = tp if sp else 1
        check_sequence_split(seq, grid, cp, sp_tp)
        start, length = local_token_range(seq, cp, cp_rank(), sp_tp, tp_rank() if sp else 0)

        if t.shape[1] != f or r.shape[1] != f:
            # Per-token times (diffusers Wan2.2): one modulation row per run of equal (t, r) tokens.
            t_f, r_f, segments = self._per_token_time_rows(t, r, f, grid, start, length)
        else:
            # Per-(patched-)frame times; collapse to one frame when all frames agree (the usual case).
            t_f, r_f = t[:, ::pt], r[:, ::pt]
            uniform = bool((t_f == t_f[:, :1]).all() and (r_f == r_f[:, :1]).all())
            if uniform:
                t_f, r_f = t_f[:, :1], r_f[:, :1]
            segments = FrameSegments.build(grid[0], tokens_per_frame, start, length, uniform)
        nf = t_f.shape[1]
        temb = self.condition_embedder.time_embedding(t_f.reshape(-1), r_f.reshape(-1), dtype)  # [b*nf, h]
        e = self.condition_embedder.time_proj(F.silu(temb))  # [b*nf, 6h]
        temb = temb.view(b, nf, -1).transpose(0, 1)  # [nf, b, h]
        e = e.view(b, nf, 6, -1).transpose(0, 1)  # [nf, b, 6, h]
        txt = self.condition_embedder.text_embedder(text.to(self.condition_embedder.text_embedder.linear_1.weight.dtype))
        txt = txt.to(dtype).transpose(0, 1).contiguous()  # [L, b, h]

        x = split_to_context_parallel_region(x, 0)  # [S / cp, b, h]
        if sp:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [S / (cp tp), b, h]
        # RoPE for the CP chunk: what self-attention's qkv holds (whole chunk, gathered over TP under SP).
        rope = tuple(split_to_context_parallel_region(c, 0) for c in self.rope.get(grid, x.device))

        for i, blk in enumerate(self.blocks):
            # FP8 (te backend): TE autocast per block; megatron keeps the first / last layers in bf16 on request.
            with get_fp8_context(cfg, i):
                if self._recompute(i):
                    x = checkpoint_block(cfg, blk, x, e, txt, rope, segments, layer=i)
                else:
                    x = blk(x, e, txt, rope, segments)

        # Output head with its own modulation, on the local tokens.
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None, :].float()).unbind(2)
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=cfg.layernorm_epsilon)
        y = segments.apply(_modulate, (y,), (shift, scale)).type_as(x)
        y = self.proj_out(y.to(self.proj_out.weight.dtype))  # [s, b, c_out * prod(p)]
        if sp:
            # The loss is computed identically on every TP rank: the output gradient is replicated, so
            # the gather's backward must split, not reduce-scatter (that would scale grads by TP).
            y = tensor_parallel.gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        # Same over CP: the gather's backward keeps this rank's slice of the replicated output gradient.
        y = gather_from_context_parallel_region(y, 0)  # [S, b, c_out * prod(p)]
        return self._unpatchify(y, b, grid)

    # ------------------------------------------------------------------------------------------
    def _far_times(self, x, name, b, f, default=None):
        if x is None:
            if default is None:
                raise ValueError(f"{name} is required")
            x = default
        return _per_frame_times(x, name, b, f, self.patch_embedding.weight.device)

    def _forward_far(self, latents, t, r, text, chunk_partition, clean_latents, clean_t, kv_cache, dense_mask,
                     prefill: bool = False):
        from megatron_anyflow.models.wan.far import CLEAN, FarAttention, FarKVCache, FarLayout, check_chunk_partition

        cfg = self.config
        if not cfg.far:
            raise ValueError(f"chunk_partition={list(chunk_partition)} given to a bidirectional model "
                             "(WanConfig.far=False): build the model with far=True (--model far)")
        cp = check_chunk_partition(chunk_partition)
        latents, text = reduce_grad_over_context_parallel(latents), reduce_grad_over_context_parallel(text)
        if clean_latents is not None:
            clean_latents = reduce_grad_over_context_parallel(clean_latents)
        if latents.dim() != 5 or latents.shape[2] != cfg.in_channels:
            raise ValueError(f"latents must be [b, f, c={cfg.in_channels}, H, W]; got {tuple(latents.shape)}")
        b, f, _, H, W = latents.shape
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must be [b={b}, L, text_dim={cfg.text_dim}]; got {tuple(text.shape)}")
        tp, cpw = tp_world_size(), cp_world_size()
        sp = cfg.sequence_parallel and tp > 1
        sp_tp = tp if sp else 1
        geo = dict(height=H, width=W, patch_size=cfg.patch_size, compressed_patch_size=cfg.compressed_patch_size,
                   full_chunk_limit=cfg.full_chunk_limit, pad_to=cpw * sp_tp)
        if kv_cache is not None:
            if clean_latents is not None or clean_t is not None:
                raise ValueError("clean_latents / clean_t are teacher-forcing inputs; a generation step (kv_cache "
                                 "given) takes the current chunk only")
            if not isinstance(kv_cache, FarKVCache):
                raise ValueError(f"kv_cache must be a FarKVCache (from WanModel.prefill); got {type(kv_cache).__name__}")
            if tuple(kv_cache.chunk_partition) != cp[:-1]:
                raise ValueError(f"the KV cache holds chunks {list(kv_cache.chunk_partition)}; a step of chunk "
                                 f"{len(cp) - 1} with chunk_partition={list(cp)} needs {list(cp[:-1])}")
            if (kv_cache.height, kv_cache.width) != (H, W) and kv_cache.layers:
                raise ValueError(f"the KV cache was built for latents {kv_cache.height}x{kv_cache.width}; got {H}x{W}")
            if f != cp[-1]:
                raise ValueError(f"a generation step takes the current chunk only: {cp[-1]} frames, got {f}")
            if not cp[:-1]:
                layout = FarLayout.train(cp, **geo)  # chunk 0 of a T2V: nothing cached, plain forward
                kv_cache = None
            else:
                layout = FarLayout.step(cp, **geo)
        elif prefill:
            layout = FarLayout.prefill(cp, **geo)
        else:
            layout = FarLayout.train(cp, clean=clean_latents is not None, **geo)
        if kv_cache is None and f != sum(cp):
            raise ValueError(f"latents have {f} frames; chunk_partition={list(cp)} sums to {sum(cp)}")
        t = self._far_times(t, "t", b, f)
        r = self._far_times(r, "r", b, f, default=t)
        ff = sum(s.frames for s in layout.of_kind(CLEAN))
        if layout.clean:
            if tuple(clean_latents.shape) != (b, ff, *latents.shape[2:]):
                raise ValueError(f"clean_latents must be the clean copies of the {ff} full-resolution frames, "
                                 f"[{b}, {ff}, {cfg.in_channels}, {H}, {W}]; got {tuple(clean_latents.shape)}")
            ct = self._far_times(clean_t, "clean_t", b, ff, default=torch.zeros(b, device=latents.device))
            t, r = torch.cat([t, ct], 1), torch.cat([r, ct], 1)
        dtype = self.dtype

        # Tokens: [compressed frames | full frames | clean copies | padding], each embedding on its frames.
        def embed(conv, v):
            y = conv(v.permute(0, 2, 1, 3, 4).to(conv.weight.dtype))
            return y.flatten(2).permute(2, 0, 1)

        fc = sum(s.frames for s in layout.segments if s.compressed)
        parts = []
        if fc:
            parts.append(embed(self.far_patch_embedding, latents[:, :fc]))
        parts.append(embed(self.patch_embedding, latents[:, fc:]))
        if layout.clean:
            parts.append(embed(self.patch_embedding, clean_latents))
        x = torch.cat(parts).to(dtype)
        if layout.pad:
            x = torch.cat([x, x.new_zeros(layout.pad, b, x.shape[-1])])
        seq = layout.length

        temb = self.condition_embedder.time_embedding(t.reshape(-1), r.reshape(-1), dtype)  # [b*R, h]
        e = self.condition_embedder.time_proj(F.silu(temb))
        nrow = t.shape[1]
        temb = temb.view(b, nrow, -1).transpose(0, 1)
        e = e.view(b, nrow, 6, -1).transpose(0, 1)
        txt = self.condition_embedder.text_embedder(text.to(self.condition_embedder.text_embedder.linear_1.weight.dtype))
        txt = txt.to(dtype).transpose(0, 1).contiguous()

        start, length = local_token_range(seq, cpw, cp_rank(), sp_tp, tp_rank() if sp else 0)
        x = split_to_context_parallel_region(x.contiguous(), 0)
        if sp:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        segments = FrameSegments.from_runs(layout.frame_runs(), start, length)
        rope = rope_tables(rope_angles_at(layout.rope_positions(), cfg.rope_split, cfg.rope_theta), x.device)
        rope = tuple(split_to_context_parallel_region(c, 0) for c in rope)
        far = FarAttention(layout, kv_cache, impl="dense" if dense_mask else cfg.far_attention)

        for i, blk in enumerate(self.blocks):
            with get_fp8_context(cfg, i):
                if self._recompute(i):
                    x = checkpoint_block(cfg, blk, x, e, txt, rope, segments, layer=i, far=far)
                else:
                    x = blk(x, e, txt, rope, segments, far)
        if prefill:
            return far.new_cache(H, W)

        shift, scale = (self.scale_shift_table[None] + temb[:, :, None, :].float()).unbind(2)
        y = F.layer_norm(x.float(), (x.shape[-1],), eps=cfg.layernorm_epsilon)
        y = segments.apply(_modulate, (y,), (shift, scale)).type_as(x)
        y = self.proj_out(y.to(self.proj_out.weight.dtype))
        if sp:
            y = tensor_parallel.gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        y = gather_from_context_parallel_region(y, 0)  # [L, b, c_out * prod(p)]
        o0, o1 = layout.output_range
        return self._unpatchify(y[o0:o1], b, (layout.output_frames, *layout.full_grid))

    def _recompute(self, i: int) -> bool:
        """Whether block ``i`` is checkpointed as a whole (`checkpoint_block`): full recomputation
        (megatron's methods: ``uniform`` = every block, ``block`` = the first ``recompute_num_layers``
        blocks) or the selective ``save-attention`` policy (every block)."""
        cfg = self.config
        if not torch.is_grad_enabled():
            return False
        if cfg.recompute_granularity == "selective":
            return cfg.recompute_policy == "save-attention"
        if cfg.recompute_granularity != "full":
            return False
        if cfg.recompute_method == "block":
            return i < (cfg.recompute_num_layers or 0)
        return True

    def compile_blocks(self, fullgraph: bool = False, **kwargs) -> None:
        """Regional compilation: ``torch.compile`` each transformer block in place (``nn.Module.compile``,
        so parameter names and checkpoints are unchanged). All blocks share one compiled graph (same
        code, same shapes); the first call traces. ``fullgraph=True`` fails on a graph break instead of
        splitting (the blocks trace whole at TP = 1 with LoRA; tests/test_compile.py)."""
        for blk in self.blocks:
            blk.compile(fullgraph=fullgraph, **kwargs)

    def describe_kernels(self, device: Optional[torch.device] = None) -> str:
        """One line naming the attention kernel the blocks will run on ``device`` (start-up log)."""
        cfg = self.config
        if cfg.backend == "te":
            return "attention: Transformer Engine fused attention (te backend)"
        from megatron_anyflow.models.wan.layer import resolve_attention_impl

        device = device or next(self.parameters()).device
        choice, why = resolve_attention_impl(cfg.attention_impl, device)
        return f"attention: {choice} (--attention-impl {cfg.attention_impl}; {why})"

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core distributed-checkpoint view of the model (see `parallel.sharding`).

        Raises:
            ValueError: ``sharded_offsets`` given (there is no pipeline parallelism to offset by).
        """
        from megatron_anyflow.parallel.sharding import module_sharded_state_dict

        if sharded_offsets:
            raise ValueError("pipeline-parallel sharded_offsets are not supported (no pipeline parallelism)")
        return module_sharded_state_dict(self, prefix)

    def _unpatchify(self, y: torch.Tensor, b: int, grid: Tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        fq, hq, wq = grid
        c = self.config.out_channels
        y = y.transpose(0, 1).reshape(b, fq, hq, wq, pt, ph, pw, c)
        y = y.permute(0, 1, 4, 7, 2, 5, 3, 6)  # b, fq, pt, c, hq, ph, wq, pw
        return y.reshape(b, fq * pt, c, hq * ph, wq * pw)

