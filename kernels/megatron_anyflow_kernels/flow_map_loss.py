"""Fused Triton kernel for the AnyFlow stage-1 flow-map loss (paper eq. 4, 6; Alg. 1).

One pass over the five latent-sized inputs computes, per (sample, frame, chunk of M), the guidance-fused
prediction, the finite-difference target and the partial sum of the squared error, already multiplied
by that frame's loss coefficient; the per-sample loss is the (deterministic) torch sum of those
partials. The backward pass is one more pass that recomputes ``u - u_tgt`` from the saved inputs (no
full-size residual is stored) and writes the gradient w.r.t. ``u_cond`` in u_cond's dtype.

Triton is imported optionally: without it the package still imports and ``backend="auto"`` falls back
to the PyTorch reference in :mod:`reference`. With ``TRITON_INTERPRET=1`` in the environment (read at
launch time: the kernels are ``triton.jit``-ed lazily, per interpreter mode) ``backend="triton"`` also
runs on CPU tensors through the Triton interpreter, which is how the tests exercise it.
"""
from __future__ import annotations

import os

import torch

from .reference import _check_flow_map_inputs, flow_map_loss_reference

try:  # optional dependency
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["flow_map_loss", "HAS_TRITON"]

_BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------------
# Backend selection (shared with adaptive_reweight.py)
# --------------------------------------------------------------------------------------------------
def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` for tensors on ``device``; raise a clear error if Triton cannot run."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    # backend == "triton"
    if not HAS_TRITON:
        raise ImportError("backend='triton' was requested but triton is not importable; "
                          "install triton or use backend='torch' / 'auto'")
    if device.type != "cuda" and not _interpret_enabled():
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                           "before launching to run the Triton interpreter on CPU tensors")
    return True


class _LazyKernel:
    """``triton.jit`` applied on first launch, once per interpreter mode.

    ``triton.jit`` decides between the compiler and the interpreter when it decorates; deferring it
    makes ``TRITON_INTERPRET`` effective even when it is set after this module was imported.
    """

    def __init__(self, fn):
        self.fn = fn
        self._jitted = {}

    def __getitem__(self, grid):
        mode = _interpret_enabled()
        kernel = self._jitted.get(mode)
        if kernel is None:
            kernel = triton.jit(self.fn)
            self._jitted[mode] = kernel
        return kernel[grid]


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _block_config(M: int):
    """(BLOCK, num_warps) for rows of M elements."""
    block = min(4096, max(128, _next_pow2(M)))
    num_warps = 8 if block >= 4096 else 4
    return block, num_warps


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    # Reductions go through tl.reduce with triton's own sum combiner rather than tl.sum: tl.sum is itself
    # a @triton.jit function, fixed to compiled or interpreted when triton.language is imported, so with
    # TRITON_INTERPRET=1 set only after that import it cannot be called from an interpreted kernel.
    # tl.reduce is a builtin that the interpreter patches at launch time.
    _sum_combine = tl.standard._sum_combine

    def _flow_map_fwd_kernel(uc_ptr, un_ptr, up_ptr, um_ptr, v_ptr, dt_ptr, fw_ptr, sw_ptr, part_ptr,
                             F, M, n_chunks, one_minus_g, g, two_eps_g,
                             BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
        row = tl.program_id(0)  # = b * F + f
        chunk = tl.program_id(1)
        b = row // F
        # Frame coefficient w_b * fw_bf / (M * max(sum_f fw_bf, 1e-12)).
        f_offs = tl.arange(0, BLOCK_F)
        fw_all = tl.load(fw_ptr + b * F + f_offs, mask=f_offs < F, other=0.0)
        denom = tl.maximum(tl.reduce(fw_all, 0, _sum_combine), 1e-12)
        coef = tl.load(sw_ptr + b) * tl.load(fw_ptr + row) / (denom * M)
        dt = tl.load(dt_ptr + row)

        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        base = row.to(tl.int64) * M
        uc = tl.load(uc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        un = tl.load(un_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        um = tl.load(um_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        u = (uc - one_minus_g * un) / g
        u_tgt = v - dt * ((up - um) / two_eps_g)
        diff = tl.where(mask, u - u_tgt, 0.0)
        partial = tl.reduce(diff * diff, 0, _sum_combine)
        tl.store(part_ptr + row * n_chunks + chunk, partial * coef)

    def _flow_map_bwd_kernel(uc_ptr, un_ptr, up_ptr, um_ptr, v_ptr, dt_ptr, fw_ptr, sw_ptr, go_ptr,
                             grad_ptr, F, M, one_minus_g, g, two_eps_g,
                             BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        b = row // F
        f_offs = tl.arange(0, BLOCK_F)
        fw_all = tl.load(fw_ptr + b * F + f_offs, mask=f_offs < F, other=0.0)
        denom = tl.maximum(tl.reduce(fw_all, 0, _sum_combine), 1e-12)
        # d loss_b / d u = 2 w_b fw_bf (u - u_tgt) / (M denom);  d u / d u_cond = 1 / g.
        coef = 2.0 * tl.load(go_ptr + b) * tl.load(sw_ptr + b) * tl.load(fw_ptr + row) / (denom * M * g)
        dt = tl.load(dt_ptr + row)

        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        base = row.to(tl.int64) * M
        uc = tl.load(uc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        un = tl.load(un_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        um = tl.load(um_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        u = (uc - one_minus_g * un) / g
        u_tgt = v - dt * ((up - um) / two_eps_g)
        grad = coef * (u - u_tgt)
        tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    _fwd_kernel = _LazyKernel(_flow_map_fwd_kernel)
    _bwd_kernel = _LazyKernel(_flow_map_bwd_kernel)


def _scalars(guidance, fd_eps):
    g = float(guidance)
    return 1.0 - g, g, 2.0 * float(fd_eps) * g


class _FlowMapLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight,
                guidance, fd_eps):
        B, F, M = u_cond.shape
        block, num_warps = _block_config(M)
        n_chunks = triton.cdiv(M, block)
        partials = torch.empty(B, F * n_chunks, dtype=torch.float32, device=u_cond.device)
        one_minus_g, g, two_eps_g = _scalars(guidance, fd_eps)
        _fwd_kernel[(B * F, n_chunks)](
            u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight, partials,
            F, M, n_chunks, one_minus_g, g, two_eps_g,
            BLOCK=block, BLOCK_F=_next_pow2(F), num_warps=num_warps)
        ctx.save_for_backward(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight)
        ctx.guidance, ctx.fd_eps = guidance, fd_eps
        return partials.sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight = ctx.saved_tensors
        B, F, M = u_cond.shape
        block, num_warps = _block_config(M)
        n_chunks = triton.cdiv(M, block)
        grad_out = grad_out.to(torch.float32).contiguous()
        grad = torch.empty_like(u_cond)
        one_minus_g, g, two_eps_g = _scalars(ctx.guidance, ctx.fd_eps)
        _bwd_kernel[(B * F, n_chunks)](
            u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight, grad_out, grad,
            F, M, one_minus_g, g, two_eps_g,
            BLOCK=block, BLOCK_F=_next_pow2(F), num_warps=num_warps)
        return grad, None, None, None, None, None, None, None, None, None


def flow_map_loss(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight,
                  guidance: float = 3.0, fd_eps: float = 5.0, backend: str = "auto") -> torch.Tensor:
    """Fused AnyFlow stage-1 per-sample loss (paper eq. 4, 6; Alg. 1).

    Args:
        u_cond: [B, F, ...] viewable as [B, F, M] (e.g. [B, F, C, H, W], M = C*H*W), float32 or
            bfloat16: the conditional model output, the only input that receives a gradient.
        u_null: same shape/dtype, negative-prompt output (no grad).
        u_plus, u_minus: same shape/dtype, no-grad conditional outputs at ``(z +/- v e/1000, t +/- e, r)``.
        velocity: same shape/dtype, ``eps - x``.
        dt: [B, F] float32, ``t - r`` on the 0..1000 timestep scale (per latent frame).
        frame_weight: [B, F] float32, 1 for trained frames, 0 e.g. for a clean I2V condition frame.
        sample_weight: [B] float32, the loss weight w(t) per sample.
        guidance: CFG scale g (default 3). fd_eps: finite-difference step e in timestep units (default 5).
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports, else the torch reference),
            ``"triton"`` (forced; CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"`` (reference).

    Formula (float32 accumulation)::

        u      = (u_cond - (1 - g) u_null) / g                          # eq. 6
        du_dt  = (u_plus - u_minus) / (2 e g)                           # eq. 4
        u_tgt  = velocity - dt * du_dt                                  # Alg. 1, stop-gradient
        loss_b = w_b * sum_{f,m} fw_bf (u - u_tgt)^2 / (M * max(sum_f fw_bf, 1e-12))

    Returns:
        [B] float32 per-sample losses (0 for a sample whose frame weights are all 0). Backward gives
        ``d loss_b / d u_cond = 2 w_b fw_bf (u - u_tgt) / (g M sum_f fw_bf)`` in u_cond's dtype.

    Raises:
        ValueError: a shape, dtype or device mismatch (the message names the input), zero guidance,
            non-positive fd_eps, or an unknown backend.
        ImportError: backend="triton" without triton installed.
        RuntimeError: backend="triton" on CPU tensors without TRITON_INTERPRET=1.
    """
    B, F, M = _check_flow_map_inputs(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight,
                                     sample_weight, guidance, fd_eps)
    if not _use_triton(backend, u_cond.device):
        return flow_map_loss_reference(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight,
                                       sample_weight, guidance, fd_eps)
    # reshape() is a view for contiguous inputs; a non-contiguous input is copied once here.
    lat = [x.reshape(B, F, M).contiguous() for x in (u_cond, u_null, u_plus, u_minus, velocity)]
    lat[1:] = [x.detach() for x in lat[1:]]
    small = [x.detach().contiguous() for x in (dt, frame_weight, sample_weight)]
    return _FlowMapLossTriton.apply(*lat, *small, float(guidance), float(fd_eps))
