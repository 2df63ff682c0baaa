"""Triton kernel for AnyFlow adaptive loss reweighting (paper eq. 7).

A single small program over the local batch computes the detached scales and the reweighted mean loss
in the same launch. ``boundary_mean`` is read from device memory, so a value all-reduced over the
data-parallel group by the caller never has to be synced to the host.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

from .flow_map_loss import HAS_TRITON, _LazyKernel, _next_pow2, _use_triton
from .reference import _check_reweight_inputs, adaptive_reweight_reference

if HAS_TRITON:
    import triton.language as tl

    from .flow_map_loss import _sum_combine

__all__ = ["adaptive_reweight"]

_MAX_BLOCK_B = 1024

if HAS_TRITON:

    def _adaptive_reweight_kernel(loss_ptr, bnd_ptr, bm_ptr, scales_ptr, out_ptr, B, inv_B, eps,
                                  BLOCK_B: tl.constexpr, N_BLOCKS: tl.constexpr):
        bm = tl.load(bm_ptr)
        acc = tl.full([BLOCK_B], 0.0, tl.float32)  # builtin; tl.zeros is a jit function
        for i in tl.static_range(N_BLOCKS):
            offs = i * BLOCK_B + tl.arange(0, BLOCK_B)
            mask = offs < B
            loss = tl.load(loss_ptr + offs, mask=mask, other=0.0)
            bnd = tl.load(bnd_ptr + offs, mask=mask, other=0)
            scale = tl.where(bnd != 0, 1.0, bm / (loss + eps))
            tl.store(scales_ptr + offs, scale, mask=mask)
            acc += tl.where(mask, scale * loss, 0.0)
        tl.store(out_ptr, tl.reduce(acc, 0, _sum_combine) * inv_B)

    _kernel = _LazyKernel(_adaptive_reweight_kernel)


class _AdaptiveReweightTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, per_sample_loss, is_boundary_u8, boundary_mean, eps):
        B = per_sample_loss.shape[0]
        block = min(_MAX_BLOCK_B, max(16, _next_pow2(B)))
        n_blocks = -(-B // block)
        scales = torch.empty_like(per_sample_loss)
        out = torch.empty((), dtype=torch.float32, device=per_sample_loss.device)
        _kernel[(1,)](per_sample_loss, is_boundary_u8, boundary_mean, scales, out, B, 1.0 / B, float(eps),
                      BLOCK_B=block, N_BLOCKS=n_blocks, num_warps=4)
        ctx.save_for_backward(scales)
        ctx.mark_non_differentiable(scales)
        return out, scales

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_scales):
        (scales,) = ctx.saved_tensors
        return scales * (grad_out / scales.shape[0]), None, None, None


def adaptive_reweight(per_sample_loss: torch.Tensor, is_boundary: torch.Tensor,
                      boundary_mean: Union[torch.Tensor, float], eps: float = 1e-5,
                      backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive loss reweighting of AnyFlow stage 1 (paper eq. 7), fused in one Triton launch.

    Args:
        per_sample_loss: [B] float32, e.g. the output of :func:`flow_map_loss`.
        is_boundary: [B] bool, True for boundary samples (r == t).
        boundary_mean: 0-d float32 tensor on the same device (a Python number is also accepted): the
            mean loss of the boundary samples, gathered over the data-parallel group by the caller.
        eps: the constant c of eq. 7 (default 1e-5).
        backend: ``"auto"`` / ``"triton"`` / ``"torch"``, as for :func:`flow_map_loss`.

    Returns:
        ``(loss, scales)``: ``scales`` [B] float32, no grad: 1 for boundary samples,
        ``boundary_mean / (per_sample_loss_i + eps)`` otherwise; ``loss`` 0-d float32
        ``= sum_i scales_i * per_sample_loss_i / B`` with ``d loss / d per_sample_loss_i = scales_i / B``.

    Raises:
        ValueError: bad shape/dtype/device (per_sample_loss not [B] float32, is_boundary not [B] bool,
            boundary_mean not a single float32 value) or an unknown backend.
        ImportError: backend="triton" without triton. RuntimeError: backend="triton" on CPU tensors
            without TRITON_INTERPRET=1.
    """
    B, bm = _check_reweight_inputs(per_sample_loss, is_boundary, boundary_mean)
    if not _use_triton(backend, per_sample_loss.device):
        return adaptive_reweight_reference(per_sample_loss, is_boundary, bm, eps)
    return _AdaptiveReweightTriton.apply(per_sample_loss.contiguous(),
                                         is_boundary.contiguous().view(torch.uint8),
                                         bm.detach().contiguous(), float(eps))
