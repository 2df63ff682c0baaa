"""AnyFlow time schedule: the shift, the (t, r) sampler, the loss weight w(t), inference grids.

Conventions used throughout ``megatron_anyflow.anyflow``:

* time ``t`` lies in ``[0, 1]``; ``t = 1`` is pure noise, ``t = 0`` is data;
  ``z_t = (1 - t) x + t eps`` and the instantaneous velocity is ``v = eps - x``;
* a flow map ``f(z_t, t, r) = z_t - (t - r) u(z_t, t, r)`` goes from ``t`` to ``r <= t``;
  ``u`` is the average velocity on ``[r, t]`` per unit of ``t`` in ``[0, 1]``;
* the network is fed times on the ``0..1000`` scale (:func:`to_model_scale`), **always float32**:
  bf16 timesteps are 4 apart near t = 600..1000 and break the +/- 5 finite difference of stage 1.

Sources: the paper (AnyFlow, Alg. 1 and Sec. 4.2.1 "Time Sampler", Fig. 10) and the public reference
implementation (NVlabs/AnyFlow: ``FlowMapDiscreteScheduler`` with ``weight_type='beta08'`` and the
stage-1 trainer's time sampler); see ``docs/design/anyflow.md`` 1.3.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "KIND_BOUNDARY",
    "KIND_R_ZERO",
    "KIND_FREE",
    "shift_time",
    "unshift_time",
    "TimeSamplerConfig",
    "split_counts",
    "sample_t_r",
    "loss_weight_grid",
    "loss_weight",
    "logit_normal_t",
    "flow_map_time_grid",
    "to_model_scale",
]

#: Scale of the timesteps fed to the network: ``T = 1000 * t``.
NUM_TRAIN_TIMESTEPS = 1000

#: ``kind`` codes returned by :func:`sample_t_r`.
KIND_BOUNDARY = 0  # r = t ("diffusion" / boundary samples, the adaptive-weight baseline)
KIND_R_ZERO = 1  # r = 0 (one-jump samples)
KIND_FREE = 2  # (t, r) kept as drawn

TensorOrFloat = Union[torch.Tensor, float]


def unshift_time(t: float, shift: float = 5.0) -> float:
    """The inverse of :func:`shift_time` for one time: ``x = t / (s - (s - 1) t)`` (float64, t in [0, 1])."""
    s = _check_shift(shift)
    return t / (s - (s - 1.0) * t)


def _check_shift(shift: float) -> float:
    try:
        shift = float(shift)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shift must be a positive number, got {shift!r}") from exc
    if not math.isfinite(shift) or shift <= 0.0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return shift


def shift_time(x: TensorOrFloat, shift: float = 5.0) -> TensorOrFloat:
    """Time shift ``s x / (1 + (s - 1) x)`` (Wan / SD3 "shift", s = 5 for Wan2.1 and AnyFlow).

    Maps ``[0, 1]`` onto ``[0, 1]`` monotonically with ``0 -> 0`` and ``1 -> 1`` (exactly, in floating
    point); ``s > 1`` pushes times toward the noise end ``t = 1``.

    Args:
        x: times in ``[0, 1]`` (not on the 0..1000 scale); a tensor of any shape/dtype, or a Python float.
        shift: ``s > 0``; ``s = 1`` is the identity.

    Returns:
        Same type as ``x`` (tensor: same shape and dtype; float: float).

    Raises:
        ValueError: ``shift`` is not a positive finite number.

    Source: reference ``FlowMapDiscreteScheduler.apply_shift`` / diffusers
    ``FlowMapEulerDiscreteScheduler.apply_shift``; docs/design/anyflow.md 1.3.
    """
    s = _check_shift(shift)
    if s == 1.0:
        return x.clone() if torch.is_tensor(x) else float(x)
    return s * x / (1 + (s - 1) * x)


@dataclass
class TimeSamplerConfig:
    """Configuration of the stage-1 (t, r) sampler and of the loss weight w(t).

    Attributes (reference defaults):
        shift: time shift ``s`` applied to both t and r after the split (5.0).
        boundary_fraction: fraction of the data-parallel micro-batch, by sample index, with ``r = t``
            (0.5; paper Sec. 4.2.1 "we sample 50% of the batch from the boundary cases").
        r_zero_fraction: fraction (the next sample indices) with ``r = 0`` (0.25, reference).
            The remaining ``1 - boundary_fraction - r_zero_fraction`` keep the drawn ``(t, r)``.
        loss_weight: ``"beta"`` (reference ``beta08``: Beta(a, b)-shaped w(t), paper Fig. 10) or
            ``"uniform"`` (w = 1).
        beta_a, beta_b: shape parameters of the Beta-shaped weight ``t^(a-1) (1-t)^(b-1)``
            (2.0 and 1.5, i.e. ``t (1 - t)^0.5``). Both must be ``>= 1`` so that the weight is finite on
            the closed grid ``[0, 1]``.
        time_range: ``(lo, hi)``, the times this run trains ((0, 1); one expert of a two-expert model:
            ``(b, 1)`` or ``(0, b)``, `models.wan.config.expert_time_range`). :func:`sample_t_r` then draws
            the full sampler's (t, r) conditioned on both lying in the range, and r = 0 samples jump to ``lo``.

    Raises:
        ValueError: on construction, for ``shift <= 0``, a fraction outside ``[0, 1]``, fractions summing
            to more than 1, an unknown ``loss_weight``, ``beta_a`` / ``beta_b`` < 1, or a ``time_range`` that
            is not ``0 <= lo < hi <= 1``.
    """

    shift: float = 5.0
    boundary_fraction: float = 0.5
    r_zero_fraction: float = 0.25
    loss_weight: str = "beta"
    beta_a: float = 2.0
    beta_b: float = 1.5
    time_range: Tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.shift = _check_shift(self.shift)
        try:
            lo, hi = (float(v) for v in self.time_range)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"time_range must be a pair (lo, hi), got {self.time_range!r}") from exc
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"time_range must satisfy 0 <= lo < hi <= 1, got {self.time_range!r}")
        self.time_range = (lo, hi)
        for name in ("boundary_fraction", "r_zero_fraction"):
            value = float(getattr(self, name))
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
            setattr(self, name, value)
        if self.boundary_fraction + self.r_zero_fraction > 1.0 + 1e-12:
            raise ValueError(
                "boundary_fraction + r_zero_fraction must be <= 1, got "
                f"{self.boundary_fraction} + {self.r_zero_fraction}"
            )
        if self.loss_weight not in ("beta", "uniform"):
            raise ValueError(f"loss_weight must be 'beta' or 'uniform', got {self.loss_weight!r}")
        for name in ("beta_a", "beta_b"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 1.0:
                raise ValueError(f"{name} must be a finite number >= 1 (finite weight on [0, 1]), got {value!r}")
            setattr(self, name, value)


def split_counts(num_samples: int, cfg: Optional[TimeSamplerConfig] = None) -> Tuple[int, int, int]:
    """Number of (boundary, r = 0, free) samples in a data-parallel micro-batch of ``num_samples``.

    ``n_boundary = floor(boundary_fraction * n)``, ``n_r_zero = floor(r_zero_fraction * n)``,
    ``n_free = n - n_boundary - n_r_zero``. The floor is taken as ``floor(fraction * n + 1e-9)`` so that a
    fraction like 0.29 with n = 100 gives 29 despite ``0.29 * 100 = 28.999...`` in binary floating point
    (exact for the default fractions 0.5 and 0.25). With n = 1 every sample is free.

    Raises:
        ValueError: ``num_samples`` is not an integer >= 1.
    """
    cfg = cfg if cfg is not None else TimeSamplerConfig()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    n_boundary = int(math.floor(cfg.boundary_fraction * num_samples + 1e-9))
    n_r_zero = int(math.floor(cfg.r_zero_fraction * num_samples + 1e-9))
    n_boundary = min(n_boundary, num_samples)
    n_r_zero = min(n_r_zero, num_samples - n_boundary)
    return n_boundary, n_r_zero, num_samples - n_boundary - n_r_zero


def sample_t_r(
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    cfg: Optional[TimeSamplerConfig] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the stage-1 flow-map times ``(t, r)`` for one data-parallel micro-batch (paper Alg. 1).

    Procedure (reference stage-1 trainer; paper Sec. 4.2.1, "Time Sampler"):

    1. ``u1, u2 ~ U(0, 1)`` float32, drawn as one ``[2, n]`` tensor from ``generator``;
       ``t = max(u1, u2)``, ``r = min(u1, u2)`` (so the unshifted t has density 2t, paper Fig. 10a).
    2. Split **by sample index** over the ``n = num_samples`` samples (see :func:`split_counts`):
       indices ``[0, n_b)`` get ``r = t`` (boundary, ``kind = 0``), the next ``n_r0`` indices get ``r = 0``
       (``kind = 1``), the rest keep the drawn pair (``kind = 2``).
    3. ``t = shift_time(t, s)``; boundary samples then take ``r = t`` exactly (bitwise), r = 0 stays 0,
       free samples take ``r = shift_time(r, s)``. Hence ``t >= r`` always.

    With ``cfg.time_range = (lo, hi)`` other than (0, 1) (one expert of a two-expert model), step 1 draws
    ``u1, u2 ~ U(a, c)`` with ``a, c = unshift_time(lo, s), unshift_time(hi, s)`` (float64, then float32):
    since u1, u2 are independent uniforms, this is exactly the full sampler conditioned on both shifted
    times lying in ``[lo, hi]``. r = 0 samples take ``r = lo`` (the jump to the range's end: the low
    expert's 0, the high expert's boundary), and t, r are clamped to the range against rounding.

    ``num_samples`` is the **global** data-parallel micro-batch (all samples processed together across
    the data-parallel group), not the per-rank batch: every rank calls this with the same generator state
    and takes its own rows, e.g. ``t[dp_rank * b_local:(dp_rank + 1) * b_local]``. With one sample per GPU
    and DP = 8 this puts boundary samples on ranks 0-3, r = 0 samples on ranks 4-5 and free samples on
    ranks 6-7; a per-rank split would give no boundary sample at all (docs/design/anyflow.md 6). TP / CP peers
    of one sample must take the same row.

    Args:
        num_samples: global data-parallel micro-batch size ``n >= 1``.
        generator: a ``torch.Generator`` (same seed / state on all ranks); ``None`` uses the global RNG
            (then all ranks must be seeded identically). The draw happens on the generator's device.
        cfg: :class:`TimeSamplerConfig` (defaults if ``None``).
        device: device of the returned tensors (default: the generator's device, CPU if none).

    Returns:
        ``(t, r, kind)``: ``t`` and ``r`` float32 ``[n]`` in ``[0, 1]`` (not on the 0..1000 scale; use
        :func:`to_model_scale` for the network), ``kind`` int64 ``[n]`` with values
        :data:`KIND_BOUNDARY` (0), :data:`KIND_R_ZERO` (1), :data:`KIND_FREE` (2).

    Raises:
        ValueError: ``num_samples`` < 1 or not an integer.
    """
    cfg = cfg if cfg is not None else TimeSamplerConfig()
    n_b, n_r0, _ = split_counts(num_samples, cfg)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((2, num_samples), generator=generator, device=gen_device, dtype=torch.float32)
    lo, hi = cfg.time_range
    restricted = (lo, hi) != (0.0, 1.0)
    if restricted:
        a, c = unshift_time(lo, cfg.shift), unshift_time(hi, cfg.shift)
        u = (a + (c - a) * u.double()).float()
    t_raw = torch.maximum(u[0], u[1])
    r_raw = torch.minimum(u[0], u[1])

    kind = torch.full((num_samples,), KIND_FREE, dtype=torch.long, device=gen_device)
    kind[:n_b] = KIND_BOUNDARY
    kind[n_b:n_b + n_r0] = KIND_R_ZERO

    t = shift_time(t_raw, cfg.shift)
    r = shift_time(r_raw, cfg.shift)
    r = torch.where(kind == KIND_BOUNDARY, t, r)
    r = torch.where(kind == KIND_R_ZERO, torch.full_like(r, lo), r)
    if restricted:
        t, r = t.clamp(lo, hi), r.clamp(lo, hi)

    out_device = torch.device(device) if device is not None else gen_device
    return (
        t.to(device=out_device, dtype=torch.float32),
        r.to(device=out_device, dtype=torch.float32),
        kind.to(out_device),
    )


@functools.lru_cache(maxsize=16)
def _weight_grid_cached(shift: float, mode: str, a: float, b: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # Reference: FlowMapDiscreteScheduler(num_train_timesteps=1000, shift=s).set_timesteps(1000) builds the
    # descending grid shift(linspace(1, 0, 1001)) in float64; we store it ascending.
    grid = shift_time(torch.linspace(0.0, 1.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64), shift)
    if mode == "uniform":
        weights = torch.ones_like(grid)
    else:
        y = grid.pow(a - 1.0) * (1.0 - grid).clamp_min(0.0).pow(b - 1.0)
        total = y.sum()
        if not torch.isfinite(total) or total <= 0:
            raise ValueError(f"Beta({a}, {b}) weight is degenerate on the timestep grid")
        weights = y * (NUM_TRAIN_TIMESTEPS / total)
    return grid, weights


def loss_weight_grid(cfg: Optional[TimeSamplerConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 1001-point time grid and the weight on it that :func:`loss_weight` looks up.

    ``grid = shift_time(linspace(0, 1, 1001), cfg.shift)`` (ascending, float64, in ``[0, 1]``);
    for ``"beta"``: ``y = grid^(a-1) (1 - grid)^(b-1)``, ``weights = y * 1000 / sum(y)`` (so the 1001
    values sum to 1000); for ``"uniform"``: ones (sum 1001, as in the reference).

    Returns:
        ``(grid, weights)``: two float64 CPU tensors ``[1001]`` (copies; safe to modify).

    Source: reference ``FlowMapDiscreteScheduler.set_train_weight('beta08')`` (there ``t ** 1.0 *
    (1 - t) ** 0.5`` on the grid ``shift(linspace(1, 0, 1001))``, i.e. a = 2, b = 1.5); paper Fig. 10.
    """
    cfg = cfg if cfg is not None else TimeSamplerConfig()
    grid, weights = _weight_grid_cached(cfg.shift, cfg.loss_weight, cfg.beta_a, cfg.beta_b)
    return grid.clone(), weights.clone()


def loss_weight(t: torch.Tensor, cfg: Optional[TimeSamplerConfig] = None) -> torch.Tensor:
    """Per-sample loss weight ``w(t)`` of stage 1 (reference ``beta08``; paper Fig. 10, Beta(2, 1.5)).

    ``w(t)`` is the value of :func:`loss_weight_grid` at the grid point nearest to ``t`` (nearest in
    ``|grid - t|``, computed in float64; on an exact tie the larger grid time wins, as the reference's
    ``argmin`` over its descending grid does). Times outside ``[0, 1]`` take the end values. ``"uniform"``
    gives ones. At the defaults the weight is ``t (1 - t)^0.5`` normalised so its 1001 grid values
    (shift-5 grid) sum to 1000: it vanishes at t = 0 and t = 1 and peaks near t = 2/3.

    Args:
        t: times in ``[0, 1]`` (NOT the 0..1000 scale), any shape and floating dtype, e.g. the ``t`` of
            :func:`sample_t_r`.
        cfg: :class:`TimeSamplerConfig` (``shift``, ``loss_weight``, ``beta_a``, ``beta_b`` are used).

    Returns:
        float32 tensor with the shape and device of ``t``.

    Raises:
        ValueError: ``t`` is not a floating-point tensor.

    Source: reference ``FlowMapDiscreteScheduler.get_train_weight`` (argmin of ``|timesteps - T|`` on the
    0..1000 scale, which is the same nearest point as on the [0, 1] scale).
    """
    cfg = cfg if cfg is not None else TimeSamplerConfig()
    if not torch.is_tensor(t) or not t.is_floating_point():
        raise ValueError("t must be a floating-point tensor of times in [0, 1]")
    if cfg.loss_weight == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    grid, weights = _weight_grid_cached(cfg.shift, cfg.loss_weight, cfg.beta_a, cfg.beta_b)
    grid = grid.to(t.device)
    weights = weights.to(t.device)
    flat = t.detach().reshape(-1).to(torch.float64)
    hi = torch.searchsorted(grid, flat).clamp(1, grid.numel() - 1)  # grid[hi-1] < flat <= grid[hi]
    lo = hi - 1
    pick_hi = (grid[hi] - flat) <= (flat - grid[lo])  # tie -> the larger time (reference behaviour)
    idx = torch.where(pick_hi, hi, lo)
    return weights[idx].reshape(t.shape).to(torch.float32)


def logit_normal_t(
    n: int,
    generator: Optional[torch.Generator] = None,
    shift: float = 5.0,
    mean: float = 0.0,
    std: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Flow-matching (teacher / critic) times: ``shift_time(sigmoid(mean + std * N(0, 1)), shift)``.

    Used by the stage-2 critic's plain flow-matching loss (docs/design/anyflow.md 1.4: logit-normal t,
    shift 5; SD3 / Wan pretraining time density).

    Args:
        n: number of samples >= 1.
        generator: ``torch.Generator`` (draw happens on its device) or ``None`` (global RNG).
        shift: ``s > 0``.
        mean, std: of the normal before the sigmoid; ``std > 0``.
        device: device of the result (default: the generator's device, CPU if none).

    Returns:
        float32 ``[n]`` in ``(0, 1)`` (time in [0, 1], not the 0..1000 scale).

    Raises:
        ValueError: ``n`` < 1, ``shift <= 0`` or ``std <= 0``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    shift = _check_shift(shift)
    if not (float(std) > 0.0):
        raise ValueError(f"std must be > 0, got {std!r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn((n,), generator=generator, device=gen_device, dtype=torch.float32)
    t = shift_time(torch.sigmoid(float(mean) + float(std) * eps.to(torch.float64)), shift)
    out_device = torch.device(device) if device is not None else gen_device
    return t.to(device=out_device, dtype=torch.float32)


def flow_map_time_grid(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """Inference / backward-simulation time grid ``shift_time(linspace(1, 0, N + 1), shift)``.

    Args:
        num_steps: number of flow-map (or Euler) steps ``N >= 1``.
        shift: ``s > 0``.

    Returns:
        float64 CPU tensor ``[N + 1]`` of times in ``[0, 1]``, strictly decreasing, ``grid[0] == 1`` and
        ``grid[-1] == 0`` exactly. Step ``i`` goes from ``grid[i]`` to ``grid[i + 1]``. Feed the network
        ``to_model_scale(grid[i])`` (float32 on 0..1000); use the float64 differences for the update.

    Raises:
        ValueError: ``num_steps`` is not an integer >= 1, or ``shift <= 0``.

    Source: docs/design/anyflow.md 1.5 (inference); equals diffusers ``FlowMapEulerDiscreteScheduler(shift=s)
    .set_timesteps(N).sigmas`` (checked in tests/test_sampler.py).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    shift = _check_shift(shift)
    grid = shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    grid[0] = 1.0
    grid[-1] = 0.0
    return grid


def two_expert_time_grid(num_steps: int, shift: float, boundary: float) -> torch.Tensor:
    """The inference grid of a two-expert model (Wan2.2 A14B): no step crosses the expert boundary ``b``.

    ``grid = flow_map_time_grid(N, shift)`` with the interior point nearest ``b`` moved onto ``b`` ("snap",
    ``N >= 2``; an any-step flow map takes any grid, so the N steps stay N evaluations); for ``N = 1``
    the one jump is split at ``b``: ``[1, b, 0]`` (two evaluations). Each step then lies in one expert's
    range, ``[b, 1]`` (high noise) or ``[0, b]`` (low noise), and :func:`~megatron_anyflow.anyflow.sampler.
    route_experts` hands it to that expert. The nearest interior point's neighbours bracket ``b``, so the grid
    stays strictly decreasing.

    Args:
        num_steps: ``N >= 1``.
        shift: ``s > 0``.
        boundary: ``b`` in ``(0, 1)``, the time on the [0, 1] scale at which the experts switch (diffusers'
            ``boundary_ratio``: 0.875 for T2V-A14B, 0.9 for I2V-A14B).

    Returns:
        float64 CPU tensor ``[N + 1]`` (``[3]`` for ``N = 1``), ``grid[0] == 1``, ``grid[-1] == 0``, containing
        ``b`` exactly.

    Raises:
        ValueError: bad ``num_steps`` / ``shift`` (as :func:`flow_map_time_grid`), ``boundary`` not in (0, 1).

    Source: docs/design/anyflow.md 2.1 (the choice, from benchmarks/two_expert_routing.py: with each expert's
    exact flow map, snapping is exact at N evaluations where routing a crossing jump by t or r is not).
    """
    grid = flow_map_time_grid(num_steps, shift)
    try:
        b = float(boundary)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"boundary must be a number in (0, 1), got {boundary!r}") from exc
    if not 0.0 < b < 1.0:
        raise ValueError(f"boundary must lie in (0, 1) (the [0, 1] time at which the experts switch), got {boundary!r}")
    if num_steps == 1:
        return torch.tensor([1.0, b, 0.0], dtype=torch.float64)
    i = 1 + int(torch.argmin((grid[1:-1] - b).abs()))
    grid[i] = b
    return grid


def to_model_scale(t: TensorOrFloat) -> torch.Tensor:
    """Convert times in ``[0, 1]`` to the network's ``0..1000`` scale, as **float32**.

    The product is formed in float64 and rounded once to float32 (for float32 input this equals the
    float32 product). Never cast the result to bf16 (docs/design/anyflow.md 6).

    Args:
        t: tensor (any shape, floating or integer dtype) or Python number, times in [0, 1].

    Returns:
        float32 tensor of the shape of ``t`` (0-d for a number), on ``t``'s device.
    """
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64)
    return (t.to(torch.float64) * NUM_TRAIN_TIMESTEPS).to(torch.float32)
