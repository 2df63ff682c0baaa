"""PyTorch references for the AnyFlow stage-1 loss kernels.

Plain differentiable torch ops (autograd gives their gradient), float32 accumulation. The Triton
kernels in :mod:`flow_map_loss` and :mod:`adaptive_reweight` compute the same functions with the same
signatures; these references are the ground truth for their tests and the fallback when Triton or
CUDA is unavailable.

Formula sources (AnyFlow paper): eq. 4 (central finite-difference derivative), eq. 6 (guidance-fused
prediction), eq. 7 (adaptive loss reweighting), Algorithm 1 (forward flow-map training).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

__all__ = [
    "flow_map_target",
    "flow_map_loss_reference",
    "adaptive_reweight_reference",
]

_LATENT_DTYPES = (torch.float32, torch.bfloat16)
_LATENT_NAMES = ("u_cond", "u_null", "u_plus", "u_minus", "velocity")


# --------------------------------------------------------------------------------------------------
# Input validation (shared with the Triton wrappers)
# --------------------------------------------------------------------------------------------------
def _check_flow_map_inputs(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight,
                           guidance, fd_eps):
    """Validate the flow-map loss inputs; return ``(B, F, M)``. Raises ValueError on mismatch."""
    latents = (u_cond, u_null, u_plus, u_minus, velocity)
    for name, x in zip(_LATENT_NAMES, latents):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("dt", dt), ("frame_weight", frame_weight), ("sample_weight", sample_weight)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dt.dim() != 2:
        raise ValueError(f"dt must have shape [B, F], got {tuple(dt.shape)}")
    B, F = dt.shape
    if B == 0 or F == 0:
        raise ValueError(f"dt must have a non-empty shape [B, F], got {tuple(dt.shape)}")
    if u_cond.dim() < 3 or tuple(u_cond.shape[:2]) != (B, F):
        raise ValueError(
            f"u_cond must have shape [B, F, ...] with [B, F] = {(B, F)} taken from dt, "
            f"got {tuple(u_cond.shape)}")
    numel = u_cond.numel()
    if numel == 0:
        raise ValueError(f"u_cond is empty: shape {tuple(u_cond.shape)}")
    M = numel // (B * F)
    dtype = u_cond.dtype
    if dtype not in _LATENT_DTYPES:
        raise ValueError(f"u_cond dtype must be float32 or bfloat16, got {dtype}")
    for name, x in zip(_LATENT_NAMES[1:], latents[1:]):
        if tuple(x.shape) != tuple(u_cond.shape):
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match u_cond shape {tuple(u_cond.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"{name} dtype {x.dtype} does not match u_cond dtype {dtype} "
                             "(all five latent inputs must share one dtype)")
    if tuple(frame_weight.shape) != (B, F):
        raise ValueError(f"frame_weight must have shape [B, F] = {(B, F)}, got {tuple(frame_weight.shape)}")
    if tuple(sample_weight.shape) != (B,):
        raise ValueError(f"sample_weight must have shape [B] = {(B,)}, got {tuple(sample_weight.shape)}")
    for name, x in (("dt", dt), ("frame_weight", frame_weight), ("sample_weight", sample_weight)):
        if x.dtype != torch.float32:
            raise ValueError(f"{name} dtype must be float32, got {x.dtype}")
    device = u_cond.device
    for name, x in zip(_LATENT_NAMES[1:] + ("dt", "frame_weight", "sample_weight"),
                       latents[1:] + (dt, frame_weight, sample_weight)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, u_cond on {device}: all inputs must share a device")
    if not float(guidance) != 0.0:
        raise ValueError(f"guidance must be non-zero, got {guidance}")
    if not float(fd_eps) > 0.0:
        raise ValueError(f"fd_eps must be positive, got {fd_eps}")
    return B, F, M


def _check_reweight_inputs(per_sample_loss, is_boundary, boundary_mean):
    """Validate the adaptive-reweight inputs; return ``(B, boundary_mean_tensor)``."""
    if not isinstance(per_sample_loss, torch.Tensor) or per_sample_loss.dim() != 1:
        shape = tuple(per_sample_loss.shape) if isinstance(per_sample_loss, torch.Tensor) else type(per_sample_loss)
        raise ValueError(f"per_sample_loss must be a 1-d tensor [B], got {shape}")
    B = per_sample_loss.shape[0]
    if B == 0:
        raise ValueError("per_sample_loss is empty (B = 0)")
    if per_sample_loss.dtype != torch.float32:
        raise ValueError(f"per_sample_loss dtype must be float32, got {per_sample_loss.dtype}")
    if not isinstance(is_boundary, torch.Tensor) or tuple(is_boundary.shape) != (B,):
        shape = tuple(is_boundary.shape) if isinstance(is_boundary, torch.Tensor) else type(is_boundary)
        raise ValueError(f"is_boundary must be a tensor of shape [B] = {(B,)}, got {shape}")
    if is_boundary.dtype != torch.bool:
        raise ValueError(f"is_boundary dtype must be torch.bool, got {is_boundary.dtype}")
    if isinstance(boundary_mean, torch.Tensor):
        if boundary_mean.numel() != 1:
            raise ValueError(f"boundary_mean must be a 0-d (single-element) tensor, got {tuple(boundary_mean.shape)}")
        if boundary_mean.dtype != torch.float32:
            raise ValueError(f"boundary_mean dtype must be float32, got {boundary_mean.dtype}")
        boundary_mean = boundary_mean.reshape(())
    else:
        boundary_mean = torch.tensor(float(boundary_mean), dtype=torch.float32, device=per_sample_loss.device)
    for name, x in (("is_boundary", is_boundary), ("boundary_mean", boundary_mean)):
        if x.device != per_sample_loss.device:
            raise ValueError(f"{name} is on {x.device}, per_sample_loss on {per_sample_loss.device}")
    return B, boundary_mean


# --------------------------------------------------------------------------------------------------
# Kernel (a) reference: guidance-fused prediction, finite-difference target, weighted per-sample MSE
# --------------------------------------------------------------------------------------------------
def flow_map_target(u_cond, u_null, u_plus, u_minus, velocity, dt, guidance: float = 3.0,
                    fd_eps: float = 5.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Guidance-fused prediction ``u`` and finite-difference target ``u_tgt`` (AnyFlow Alg. 1).

    Args:
        u_cond: [B, F, ...] (e.g. [B, F, C, H, W] or [B, F, M]), float32 or bfloat16; conditional output.
        u_null: same shape/dtype; negative-prompt output (stop-gradient).
        u_plus, u_minus: same shape/dtype; conditional outputs at ``(z +/- v e/1000, t +/- e, r)``.
        velocity: same shape/dtype; ``eps - x``.
        dt: [B, F] float32, ``t - r`` on the 0..1000 timestep scale (per latent frame).
        guidance: CFG scale g (paper: 3).
        fd_eps: finite-difference step e in timestep units (paper/ref: 5).

    Returns:
        ``(u, u_tgt)``, both float32 with u_cond's shape:
        ``u = (u_cond - (1 - g) u_null) / g`` (eq. 6), ``du/dt = (u_plus - u_minus) / (2 e g)`` (eq. 4),
        ``u_tgt = velocity - dt * du/dt`` (Alg. 1). ``u`` is differentiable w.r.t. u_cond only;
        ``u_tgt`` is detached.

    Raises:
        ValueError: on mismatching shapes, dtypes or devices.
    """
    if isinstance(dt, torch.Tensor) and dt.dim() == 2:
        fw = torch.ones(dt.shape, dtype=torch.float32, device=dt.device)
        sw = fw[:, 0]
    else:
        fw = sw = dt  # the validation below reports the bad dt
    B, F, M = _check_flow_map_inputs(u_cond, u_null, u_plus, u_minus, velocity, dt, fw, sw, guidance, fd_eps)
    u, u_tgt = _target_3d(u_cond.reshape(B, F, M), u_null.reshape(B, F, M), u_plus.reshape(B, F, M),
                          u_minus.reshape(B, F, M), velocity.reshape(B, F, M), dt, guidance, fd_eps)
    return u.reshape(u_cond.shape), u_tgt.reshape(u_cond.shape)


def _target_3d(u_cond, u_null, u_plus, u_minus, velocity, dt, guidance, fd_eps):
    g = float(guidance)
    uc = u_cond.float()
    un = u_null.detach().float()
    up = u_plus.detach().float()
    um = u_minus.detach().float()
    vel = velocity.detach().float()
    u = (uc - (1.0 - g) * un) / g
    du_dt = (up - um) / (2.0 * float(fd_eps) * g)
    u_tgt = vel - dt.detach()[..., None] * du_dt
    return u, u_tgt.detach()


def flow_map_loss_reference(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight, sample_weight,
                            guidance: float = 3.0, fd_eps: float = 5.0) -> torch.Tensor:
    """Per-sample AnyFlow stage-1 loss in plain torch (reference of :func:`flow_map_loss`).

    Args:
        u_cond, u_null, u_plus, u_minus, velocity: [B, F, ...] viewable as [B, F, M] (M = C*H*W),
            float32 or bfloat16, all the same dtype; see :func:`flow_map_target`. Only u_cond gets a
            gradient; every other input is treated as a stop-gradient constant.
        dt: [B, F] float32, ``t - r`` on the 0..1000 timestep scale.
        frame_weight: [B, F] float32, 1 for trained frames, 0 e.g. for a clean I2V condition frame.
        sample_weight: [B] float32, the loss weight w(t) per sample.
        guidance: CFG scale g (eq. 6). fd_eps: finite-difference step e, timestep units (eq. 4).

    Returns:
        [B] float32: ``loss_b = w_b * sum_{f,m} fw_{bf} (u - u_tgt)^2 / (M * max(sum_f fw_{bf}, 1e-12))``,
        0 for a sample whose frame weights are all zero (paper eq. 4, 6; Alg. 1).

    Raises:
        ValueError: on mismatching shapes, dtypes or devices, non-positive fd_eps or zero guidance.
    """
    B, F, M = _check_flow_map_inputs(u_cond, u_null, u_plus, u_minus, velocity, dt, frame_weight,
                                     sample_weight, guidance, fd_eps)
    u, u_tgt = _target_3d(u_cond.reshape(B, F, M), u_null.reshape(B, F, M), u_plus.reshape(B, F, M),
                          u_minus.reshape(B, F, M), velocity.reshape(B, F, M), dt, guidance, fd_eps)
    per_frame = (u - u_tgt).square().mean(dim=-1)  # [B, F], float32
    fw = frame_weight.detach()
    denom = fw.sum(dim=-1).clamp_min(1e-12)
    return sample_weight.detach() * (fw * per_frame).sum(dim=-1) / denom


# --------------------------------------------------------------------------------------------------
# Kernel (b) reference: adaptive loss reweighting
# --------------------------------------------------------------------------------------------------
def adaptive_reweight_reference(per_sample_loss: torch.Tensor, is_boundary: torch.Tensor,
                                boundary_mean: Union[torch.Tensor, float], eps: float = 1e-5
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive loss reweighting (AnyFlow paper eq. 7) in plain torch.

    Args:
        per_sample_loss: [B] float32 per-sample losses of the local batch.
        is_boundary: [B] bool, True where r == t (boundary / diffusion samples).
        boundary_mean: 0-d float32 tensor (or a Python number), the mean boundary loss gathered over
            the data-parallel group by the caller (NaN/0 if there is none; the caller's concern).
        eps: the constant c in eq. 7.

    Returns:
        ``(loss, scales)``: ``scales_i = 1`` for boundary samples and
        ``boundary_mean / (per_sample_loss_i + eps)`` otherwise, computed without grad ([B] float32);
        ``loss = sum_i scales_i * per_sample_loss_i / B`` (0-d float32), so that
        ``d loss / d per_sample_loss_i = scales_i / B``.

    Raises:
        ValueError: on a bad shape, dtype or device.
    """
    B, bm = _check_reweight_inputs(per_sample_loss, is_boundary, boundary_mean)
    with torch.no_grad():
        scales = torch.where(is_boundary, torch.ones_like(per_sample_loss),
                             bm.detach() / (per_sample_loss.detach() + eps))
    loss = (scales * per_sample_loss).sum() / B
    return loss, scales
