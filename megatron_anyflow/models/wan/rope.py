"""3D rotary position embedding of Wan2.1 (complex RoPE, theta 1e4, head dims split t:h:w).

Layout and numerics follow diffusers' `AnyFlowRotaryPosEmbed` / `WanRotaryPosEmbed`: channel pairs
(2i, 2i+1) are one complex number; the first ``split[0] / 2`` complex channels rotate with the frame
index, the next ``split[1] / 2`` with the row, the last ``split[2] / 2`` with the column. Angles are
computed in float64 and the rotation is applied in float32.
"""

from __future__ import annotations

from typing import Tuple

import torch


def _axis_angles(dim: int, length: int, theta: float) -> torch.Tensor:
    """Angles [length, dim // 2] float64 of a 1D RoPE over ``dim`` channels (diffusers' rule)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    pos = torch.arange(length, dtype=torch.float64)
    return torch.outer(pos, inv_freq)


def rope_angles(grid: Tuple[int, int, int], split: Tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of every token of a (frames, rows, cols) token grid.

    Args:
        grid: (F, H, W) of the patched latent (tokens are ordered frame-major, then row, then col).
        split: head-dim channels per axis (t, h, w), e.g. (44, 42, 42); each must be even.
        theta: RoPE base.

    Returns:
        float64 tensor [F * H * W, head_dim // 2] of angles.

    Raises:
        ValueError: if a split entry is odd or a grid entry is not positive.
    """
    if any(s % 2 for s in split):
        raise ValueError(f"RoPE split {split} must be even per axis")
    if any(g <= 0 for g in grid):
        raise ValueError(f"RoPE grid {grid} must be positive")
    f, h, w = grid
    af = _axis_angles(split[0], f, theta)[:, None, None, :].expand(f, h, w, -1)
    ah = _axis_angles(split[1], h, theta)[None, :, None, :].expand(f, h, w, -1)
    aw = _axis_angles(split[2], w, theta)[None, None, :, :].expand(f, h, w, -1)
    return torch.cat([af, ah, aw], dim=-1).reshape(f * h * w, -1)


def rope_angles_at(positions: torch.Tensor, split: Tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of tokens at arbitrary (possibly fractional) (frame, row, col) positions.

    ``rope_angles(grid)`` is this at the integer grid. AnyFlow-FAR's compressed tokens sit at the centres
    of the full-resolution patches they pool (``2j + 0.5``): diffusers / the reference average-pool the
    complex exponentials and renormalise, which is exactly the rotation at the mean position because
    the pooled factor ``cos(theta / 2)`` is positive (docs/design/far.md 1.4).

    Args:
        positions: [L, 3] positions (any float dtype; used in float64).
        split, theta: as `rope_angles`.
    Returns:
        float64 [L, head_dim // 2].
    """
    if any(s % 2 for s in split):
        raise ValueError(f"RoPE split {split} must be even per axis")
    pos = positions.to(torch.float64)
    parts = []
    for axis, dim in enumerate(split):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
        parts.append(torch.outer(pos[:, axis], inv_freq))
    return torch.cat(parts, dim=-1)


def rope_tables(angles: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float32 [L, 1, 1, d // 2] on ``device`` from float64 angles [L, d // 2]."""
    cos = torch.cos(angles).to(torch.float32)[:, None, None, :].to(device)
    sin = torch.sin(angles).to(torch.float32)[:, None, None, :].to(device)
    return cos, sin


class RotaryCache:
    """cos / sin tables per (grid, device), float32 [S, 1, 1, head_dim // 2] for [s, b, n, d] inputs."""

    def __init__(self, split: Tuple[int, int, int], theta: float):
        self.split = tuple(split)
        self.theta = theta
        self._cache = {}

    def get(self, grid: Tuple[int, int, int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            ang = rope_angles(grid, self.split, self.theta)
            cos = torch.cos(ang).to(torch.float32)[:, None, None, :].to(device)
            sin = torch.sin(ang).to(torch.float32)[:, None, None, :].to(device)
            self._cache = {key: (cos, sin)}  # one grid at a time: training shapes rarely change
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` [S, b, n, d] by angles with cos / sin [S, 1, 1, d // 2].

    Computed in float32, returned in ``x.dtype``.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def te_fused_rope():
    """Transformer Engine's fused RoPE kernel (``apply_rotary_pos_emb``) if TE is installed and supports
    interleaved channel pairs (Wan's complex RoPE layout); None otherwise (callers use `apply_rotary`)."""
    try:
        try:
            from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
        except ImportError:
            from transformer_engine.pytorch.attention import apply_rotary_pos_emb
    except ImportError:
        return None
    import inspect

    params = inspect.signature(apply_rotary_pos_emb).parameters
    if "interleaved" not in params or "fused" not in params:
        return None
    return apply_rotary_pos_emb


def apply_rotary_te(fn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` through TE's fused kernel ``fn`` (from `te_fused_rope`): x [S, b, n, d] ("sbhd"),
    cos / sin [S, 1, 1, d // 2] float32. TE takes the angles per channel, repeated for each pair
    (interleaved layout); ``atan2`` recovers them in (-pi, pi], the same rotation to float32 rounding
    (TE evaluates cos / sin in float32: ~1e-7 relative, far below bf16's 4e-3)."""
    freqs = torch.atan2(sin, cos).repeat_interleave(2, dim=-1)
    return fn(x.contiguous(), freqs, tensor_format="sbhd", interleaved=True, fused=True)
