"""AnyFlow stage 2: on-policy flow-map distillation (backward simulation + DMD + critic), as functions.

Everything here works on *model callables* ``model(z, T, R, text) -> out`` (the trainer decides which
LoRA adapter of the shared base each callable runs, e.g. ``lambda *a: run_with(use_adapter(m, "gen"))``):

* ``z`` latents ``[b, f, c, h, w]``; ``T``, ``R`` **float32** ``[b, f]`` on the 0..1000 scale (one time per
  sample and latent frame, never bf16: ``docs/design/anyflow.md`` 6); ``text`` ``[b, L, d]``;
* the **generator** (student flow map) returns the average velocity ``u`` on ``[r, t]`` per unit of t in
  ``[0, 1]``: ``f(z_t, t, r) = z_t - (t - r) u(z_t, t, r)``;
* the **real score** (frozen teacher) and the **fake score** (critic) are single-time networks, called
  with ``R = T``; they return a velocity ``v`` whose x0-prediction is ``x0 = z - t v``.

Times ``t`` in ``[0, 1]`` (``t = 1`` noise, ``t = 0`` data), ``z_t = (1 - t) x + t eps``, ``v = eps - x``.
All frames of a sample share one time (text-to-video), except image-to-video condition frames
(:class:`FrameCondition`, Wan2.2 TI2V): held at their clean latents with ``t = 0`` in every call (the
generator's ``r`` stays the step's, as diffusers' ``AnyFlowPipeline`` and ``tools/generate.py`` sample; the
single-time scores get ``t = r = 0``), and out of the DMD and critic losses (per-sample means over the other
frames). Without a condition every function is the text-to-video one, bitwise.

Pieces (paper Alg. 2, Sec. 4.2.2, eq. 5; docs/design/anyflow.md 1.4):

* :func:`sample_simulation_plan`: the inference budget ``N`` and gradient step ``k`` (same on all ranks);
* :func:`flow_map_backward_simulation`: AnyFlow's three-segment rollout ``1 -> t_k -> t_{k+1} -> 0``;
* :func:`consistency_backward_simulation`: the rCM / Self-Forcing rollout (baseline, for comparison);
* :func:`dmd_loss`: distribution-matching loss on the rollout sample (reverse-KL gradient, eq. 5, with
  the DMD2 / Self-Forcing normalisation used by the reference implementation);
* :func:`critic_loss`: the fake score's flow-matching loss on generated samples;
* :func:`generator_loss`: rollout + DMD (+ the caller's stage-1 co-training loss).

A training iteration of the reference (the trainer wires it; generator and critic alternate 1:1, each
with its own AdamW, betas (0.0, 0.999), lr 2e-6, clip 1.0, EMA 0.99 after 200 steps)::

    plan = sample_simulation_plan(shared_gen, cfg)             # same on every rank
    loss_g, _ = generator_loss(gen, real, fake, noise, text, neg, plan, cfg, tau_gen,
                               rollout_generator=gen_rng, stage1=stage1_loss_value)
    loss_g.backward(); step(generator adapter)
    with torch.no_grad():
        x0, _ = backward_simulation(gen, noise2, text, plan2, cfg, generator=gen_rng)
    loss_c, _ = critic_loss(fake, x0, text, critic_rng, cfg); loss_c.backward(); step(fake adapter)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from .objective import frame_mean
from .timesteps import flow_map_time_grid, logit_normal_t, shift_time, to_model_scale, two_expert_time_grid

__all__ = [
    "DistillConfig",
    "FrameCondition",
    "SimulationPlan",
    "sample_simulation_plan",
    "flow_map_backward_simulation",
    "consistency_backward_simulation",
    "backward_simulation",
    "real_score_velocity",
    "dmd_loss",
    "critic_loss",
    "generator_loss",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

SIMULATIONS = ("flow_map", "consistency")
#: ``"chain"``: every rollout segment keeps its graph (reference; paper Alg. 2 "With Grad" on all three).
#: ``"no_grad_prefix"``: the first segment ``1 -> t_k`` runs under ``no_grad`` (see
#: :func:`flow_map_backward_simulation`).
GRAD_THROUGH = ("chain", "no_grad_prefix")
#: ``"dmd"``: ``v = v_c + g (v_c - v_u)`` (DMD / CausVid / Self-Forcing ``real_guidance_scale``;
#: ``docs/design/anyflow.md`` 1.4); ``"cfg"``: ``v = v_u + g (v_c - v_u)`` (classifier-free
#: guidance as in the Wan sampler). ``g_dmd = g_cfg - 1``.
GUIDANCE_CONVENTIONS = ("dmd", "cfg")


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(value) or value < 0.0 or (value == 0.0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, "
                         f"got {value!r}")
    return value


@dataclass
class DistillConfig:
    """Stage-2 hyper-parameters (reference defaults; docs/design/anyflow.md 1.4, paper Alg. 2).

    Attributes:
        num_steps_choices: inference budgets ``N`` the rollout simulates, drawn uniformly ((2, 4, 8, 16, 50)).
        shift: time shift of the rollout grid ``shift(linspace(1, 0, N + 1))`` (5.0).
        real_guidance: CFG scale of the real score, in the convention ``real_guidance_convention``
            (3.0 with ``"dmd"``: ``v = v_c + 3 (v_c - v_u)``, ``docs/design/anyflow.md`` 1.4;
            this is ``4`` in the usual ``v_u + g (v_c - v_u)`` convention).
        real_guidance_convention: ``"dmd"`` (default) or ``"cfg"``, see :func:`real_score_velocity`.
            No guidance is ``real_guidance = 0`` with ``"dmd"`` and ``1`` with ``"cfg"``; then the
            unconditional call is skipped.
        simulation: ``"flow_map"`` (AnyFlow, :func:`flow_map_backward_simulation`) or ``"consistency"``
            (rCM / Self-Forcing baseline, :func:`consistency_backward_simulation`).
        grad_through: ``"chain"`` (reference: gradients through all three segments) or
            ``"no_grad_prefix"`` (first segment without graph; lower memory). Flow-map simulation only.
        dmd_tau_shift: shift of the DMD re-noising time ``tau = shift(U(0, 1))`` (5.0).
        critic_time_shift: shift of the critic's logit-normal flow-matching time (5.0).
        cotrain_stage1: add the stage-1 forward flow-map loss to the generator loss (True).
        stage1_weight: weight of that loss in the sum (1.0).
        generator_lr, critic_lr: AdamW learning rates (2e-6 each).
        betas: AdamW betas for both optimisers ((0.0, 0.999)).
        clip_grad: gradient-norm clip (1.0).
        ema_decay, ema_start: generator EMA decay and first iteration with EMA (0.99, 200).
        critic_updates_per_generator: critic steps per generator step (1; 1:1 alternation).
        boundary: a two-expert model's boundary ``b`` in (0, 1) on the [0, 1] time scale (Wan2.2 A14B), or
            None (one model). The rollout grid is then `timesteps.two_expert_time_grid`'s (``b`` snapped onto
            the grid for ``N >= 2``), and a rollout segment that crosses ``b`` is split there, so every
            generator call lies in one expert's range (:func:`flow_map_backward_simulation`).

    Raises:
        ValueError: on construction, for an empty / non-positive ``num_steps_choices``, a non-positive
            shift, an unknown ``simulation`` / ``grad_through`` / ``real_guidance_convention``, a
            non-finite guidance, negative learning rates, betas outside ``[0, 1)``, ``ema_decay``
            outside ``[0, 1]``, ``critic_updates_per_generator < 1``, a ``boundary`` outside (0, 1), or a
            ``boundary`` with the consistency simulation (its re-noised jumps to 0 cross ``b`` by design).
    """

    num_steps_choices: Tuple[int, ...] = (2, 4, 8, 16, 50)
    shift: float = 5.0
    real_guidance: float = 3.0
    real_guidance_convention: str = "dmd"
    simulation: str = "flow_map"
    grad_through: str = "chain"
    dmd_tau_shift: float = 5.0
    critic_time_shift: float = 5.0
    cotrain_stage1: bool = True
    stage1_weight: float = 1.0
    generator_lr: float = 2e-6
    critic_lr: float = 2e-6
    betas: Tuple[float, float] = (0.0, 0.999)
    clip_grad: float = 1.0
    ema_decay: float = 0.99
    ema_start: int = 200
    critic_updates_per_generator: int = 1
    boundary: Optional[float] = None

    def __post_init__(self) -> None:
        choices = tuple(self.num_steps_choices)
        if not choices or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in choices):
            raise ValueError(f"num_steps_choices must be a non-empty sequence of ints >= 1, got {choices!r}")
        self.num_steps_choices = choices
        for name in ("shift", "dmd_tau_shift", "critic_time_shift"):
            setattr(self, name, _check_positive(name, getattr(self, name)))
        g = float(self.real_guidance)
        if not math.isfinite(g):
            raise ValueError(f"real_guidance must be finite, got {self.real_guidance!r}")
        self.real_guidance = g
        if self.real_guidance_convention not in GUIDANCE_CONVENTIONS:
            raise ValueError(f"real_guidance_convention must be one of {GUIDANCE_CONVENTIONS}, "
                             f"got {self.real_guidance_convention!r}")
        if self.simulation not in SIMULATIONS:
            raise ValueError(f"simulation must be one of {SIMULATIONS}, got {self.simulation!r}")
        if self.grad_through not in GRAD_THROUGH:
            hint = (" ('middle' is not offered: the last segment must carry the gradient back to the middle "
                    "one and keeps its own parameter gradient; use 'no_grad_prefix')"
                    if self.grad_through == "middle" else "")
            raise ValueError(f"grad_through must be one of {GRAD_THROUGH}, got {self.grad_through!r}{hint}")
        for name in ("generator_lr", "critic_lr", "clip_grad", "stage1_weight"):
            setattr(self, name, _check_positive(name, getattr(self, name), allow_zero=True))
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        if not (0.0 <= float(self.ema_decay) <= 1.0):
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if int(self.ema_start) < 0:
            raise ValueError(f"ema_start must be >= 0, got {self.ema_start!r}")
        if int(self.critic_updates_per_generator) < 1:
            raise ValueError(f"critic_updates_per_generator must be >= 1, got {self.critic_updates_per_generator!r}")
        if self.boundary is not None:
            b = float(self.boundary)
            if not 0.0 < b < 1.0:
                raise ValueError(f"boundary must lie in (0, 1) (a two-expert model's boundary_ratio), got {self.boundary!r}")
            if self.simulation != "flow_map":
                raise ValueError(f"simulation={self.simulation!r} with a two-expert boundary: the consistency rollout "
                                 "jumps to 0 from every grid point, across the boundary; use simulation='flow_map'")
            self.boundary = b

    @property
    def guidance_is_identity(self) -> bool:
        """True when the real score needs no unconditional call (dmd g = 0, or cfg g = 1)."""
        return self.real_guidance == (0.0 if self.real_guidance_convention == "dmd" else 1.0)


@dataclass(frozen=True)
class SimulationPlan:
    """One rollout's step budget and gradient step.

    Attributes:
        N: number of inference steps simulated (``>= 1``).
        k: gradient step index in ``[0, N - 1]``; the target transition is ``times[k] -> times[k + 1]``.
        times: float64 CPU ``[N + 1]`` grid ``shift(linspace(1, 0, N + 1))`` from 1 to 0 (in ``[0, 1]``); with a
            ``boundary`` and ``N >= 2``, `timesteps.two_expert_time_grid`'s (the point nearest ``b`` moved onto it).
        boundary: a two-expert model's ``b`` (None: one model); rollout segments that cross it are split there.
    """

    N: int
    k: int
    times: torch.Tensor
    boundary: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.N, bool) or not isinstance(self.N, int) or self.N < 1:
            raise ValueError(f"N must be an int >= 1, got {self.N!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not (0 <= self.k < self.N):
            raise ValueError(f"k must be an int in [0, N - 1] = [0, {self.N - 1}], got {self.k!r}")
        if not torch.is_tensor(self.times) or tuple(self.times.shape) != (self.N + 1,):
            raise ValueError(f"times must be a tensor [N + 1] = [{self.N + 1}]")

    @classmethod
    def make(cls, N: int, k: int, shift: float = 5.0, boundary: Optional[float] = None) -> "SimulationPlan":
        """Plan for a given ``(N, k)`` on the grid ``flow_map_time_grid(N, shift)`` (two-expert: snapped onto
        ``boundary``, see :func:`rollout_grid`)."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N must be an int >= 1, got {N!r}")
        return cls(N=N, k=k, times=rollout_grid(N, shift, boundary), boundary=boundary)

    @property
    def t_k(self) -> float:
        return float(self.times[self.k])

    @property
    def t_next(self) -> float:
        return float(self.times[self.k + 1])


def rollout_grid(N: int, shift: float, boundary: Optional[float] = None) -> torch.Tensor:
    """The ``N``-step grid a rollout simulates: ``flow_map_time_grid(N, shift)``; for a two-expert model and
    ``N >= 2`` the grid point nearest ``boundary`` is moved onto it (`timesteps.two_expert_time_grid`, the
    grid the two-expert sampler uses, so stage 2 trains the transitions the sampler runs). For ``N = 1`` the
    grid stays ``[1, 0]``: its one segment is split at ``boundary`` by the rollout, as the sampler splits it.
    Float64 CPU ``[N + 1]``."""
    if boundary is None or N == 1:
        return flow_map_time_grid(N, shift)
    return two_expert_time_grid(N, shift, boundary)


def sample_simulation_plan(generator: Optional[torch.Generator], cfg: Optional[DistillConfig] = None) -> SimulationPlan:
    """Draw ``N`` uniformly from ``cfg.num_steps_choices`` and ``k ~ U{0, ..., N - 1}`` (paper Alg. 2).

    Draw order (CPU, int64): ``i = randint(len(choices))``, then ``k = randint(N)``. Pass a CPU generator
    seeded identically on every rank (all ranks must simulate the same segments; the model's
    collectives depend on it).

    Returns:
        :class:`SimulationPlan` with ``times = rollout_grid(N, cfg.shift, cfg.boundary)`` (float64 ``[N + 1]``)
        and ``cfg.boundary``. The draw does not depend on the boundary.
    """
    cfg = cfg if cfg is not None else DistillConfig()
    choices = cfg.num_steps_choices
    i = int(torch.randint(len(choices), (1,), generator=generator).item())
    N = int(choices[i])
    k = int(torch.randint(N, (1,), generator=generator).item())
    return SimulationPlan(N=N, k=k, times=rollout_grid(N, cfg.shift, cfg.boundary), boundary=cfg.boundary)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_latent(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [b, f, c, h, w] tensor, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")


def _check_output(out: torch.Tensor, z: torch.Tensor, what: str) -> None:
    if not torch.is_tensor(out) or tuple(out.shape) != tuple(z.shape):
        raise ValueError(f"the {what} returned shape {tuple(out.shape) if torch.is_tensor(out) else type(out)}, "
                         f"expected {tuple(z.shape)} (the input's)")


def _model_time(t: Union[float, torch.Tensor], b: int, f: int, device) -> torch.Tensor:
    """Float32 ``[b, f]`` on the 0..1000 scale from a float or a ``[b]`` tensor of times in [0, 1]."""
    if torch.is_tensor(t) and t.dim() == 1:
        return to_model_scale(t.to(device))[:, None].expand(b, f).clone()
    return to_model_scale(t).to(device).expand(b, f).clone()


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(*t.shape, *([1] * (ndim - t.dim())))


class FrameCondition(NamedTuple):
    """Clean condition frames of image-to-video in stage 2 (Wan2.2 TI2V: frame 0 of the conditioned samples).

    Attributes:
        latents: ``[b, f, c, h, w]`` clean latents (only the frames in ``mask`` are read), e.g. the batch.
        mask: ``[b, f]`` bool, True on the condition frames (held at ``latents`` with ``t = 0``). Every sample
            needs at least one frame outside it; that is not checked (it would synchronise with the device
            on every call): a fully held sample makes the DMD / critic loss NaN (a mean over no frame).
    """

    latents: torch.Tensor
    mask: torch.Tensor

    def check(self, z: torch.Tensor) -> None:
        """ValueError unless ``latents`` has ``z``'s shape and ``mask`` is bool ``[b, f]``."""
        if tuple(self.latents.shape) != tuple(z.shape):
            raise ValueError(f"condition latents {tuple(self.latents.shape)} must have the samples' shape {tuple(z.shape)}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(z.shape[:2]):
            raise ValueError(f"condition mask must be bool {tuple(z.shape[:2])}, got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")

    def hold(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` with the condition frames replaced by their clean latents (no graph through them)."""
        return torch.where(_bcast(self.mask, z.dim()), self.latents.detach().to(z.dtype), z)

    def time(self, T: torch.Tensor) -> torch.Tensor:
        """``T`` ``[b, f]`` with 0 on the condition frames."""
        return T.masked_fill(self.mask, 0.0)


def _flow_map_step(model: ModelFn, z: torch.Tensor, t: float, r: float, text,
                   condition: Optional[FrameCondition] = None) -> torch.Tensor:
    """``z - (t - r) u(z, T, R, text)``, the update formed in float64 and rounded once to ``z.dtype``. With a
    ``condition`` its frames are held clean before and after the step and get ``T = 0`` (R the step's)."""
    b, f = z.shape[:2]
    T = _model_time(t, b, f, z.device)
    if condition is not None:
        z, T = condition.hold(z), condition.time(T)
    u = model(z, T, _model_time(r, b, f, z.device), text)
    _check_output(u, z, "generator")
    out = (z.to(torch.float64) - (t - r) * u.to(torch.float64)).to(z.dtype)
    return out if condition is None else condition.hold(out)


def _jump(model: ModelFn, z: torch.Tensor, t: float, r: float, text, condition: Optional[FrameCondition],
          boundary: Optional[float], segments: list, with_grad: bool) -> torch.Tensor:
    """One rollout segment ``t -> r``; with a two-expert ``boundary`` strictly inside it, two flow-map steps
    ``t -> b -> r`` (each expert knows only its own range; by the composition property, paper eq. 8, an
    exact flow map gives the same point). Appends ``(t, r, with_grad)`` per model call to ``segments``."""
    stops = [t, boundary, r] if boundary is not None and r < boundary < t else [t, r]
    for a, c in zip(stops[:-1], stops[1:]):
        z = _flow_map_step(model, z, a, c, text, condition)
        segments.append((a, c, with_grad))
    return z


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# backward simulation
# --------------------------------------------------------------------------------------------------
def flow_map_backward_simulation(
    generator_model: ModelFn,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    plan: SimulationPlan,
    grad_through: str = "chain",
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """AnyFlow's flow-map backward simulation (paper Alg. 2, Sec. 4.2.2, Fig. 5b).

    On the grid ``times = plan.times`` (``t_0 = 1 > t_1 > ... > t_N = 0``), at most three generator calls,
    each a flow-map step ``z_r = z_t - (t - r) u(z_t, t, r)`` (``T = 1000 t``, ``R = 1000 r`` float32
    ``[b, f]``; the update in float64, rounded once to ``noise.dtype``):

    1. ``1 -> t_k`` (skipped when ``k == 0``): shortcut to the gradient step's start;
    2. ``t_k -> t_{k+1}``: the target transition of an ``N``-step Euler sampler;
    3. ``t_{k+1} -> 0`` (skipped when ``k == N - 1``): shortcut to data.

    By the composition property (paper eq. 8) an exact flow map gives exactly ``f(noise, 1, 0)`` for every
    ``(N, k)``. Calls: 3, or 2 when ``k == 0`` or ``k == N - 1`` (1 when ``N == 1``).

    Two experts (``plan.boundary = b``, Wan2.2 A14B): the grid holds ``b`` (``N >= 2``), so the target transition
    never crosses it; a shortcut segment that does (or the single segment of ``N = 1``) is split at ``b``
    into two calls. So each call lies in one expert's range, and the calls are at most one more than above.

    Gradient options (``grad_through``; whatever the caller's grad mode, ``no_grad`` parts are explicit):

    * ``"chain"`` (reference, paper "once the KL gradient is computed at z0, it is backpropagated through
      the whole chain"): all segments keep their graph; each call's parameters get gradient, and the
      gradient also flows through the segment *inputs* back to the first segment.
    * ``"no_grad_prefix"``: segment 1 runs under ``torch.no_grad`` (its output, the input of segment 2, is
      a constant); segments 2 and 3 keep their graph. So segment 2 is trained through segment 3 (its output
      is segment 3's input), and segment 3's **own parameter gradient is kept** as well (a generic model
      callable cannot exclude it). Saves the activations of one generator forward. Not a "middle segment
      only" gradient.

    Args:
        generator_model: ``model(z, T, R, text) -> u``.
        noise: ``[b, f, c, h, w]`` state at t = 1 (its dtype is the rollout's dtype).
        text: passed through to the model.
        plan: :class:`SimulationPlan` (``N``, ``k``, ``times``).
        grad_through: ``"chain"`` or ``"no_grad_prefix"``.
        condition: optional :class:`FrameCondition`: its frames are held clean with ``T = 0`` in every call
            (``R`` the segment's ``r``) and are clean in ``x0``.

    Returns:
        ``(x0, info)``: ``x0`` ``[b, f, c, h, w]`` in ``noise``'s dtype (with graph when grad is enabled);
        ``info``: ``N``, ``k``, ``t_k``, ``t_next`` (floats), ``calls`` (int), ``segments`` (list of
        ``(t, r, with_grad)``).

    Raises:
        ValueError: bad ``noise``, unknown ``grad_through``, a bad ``condition``, or a model output of the
            wrong shape.
    """
    _check_latent("noise", noise)
    if condition is not None:
        condition.check(noise)
    if grad_through not in GRAD_THROUGH:
        raise ValueError(f"grad_through must be one of {GRAD_THROUGH}, got {grad_through!r}")
    times = plan.times.tolist()
    N, k = plan.N, plan.k
    t_k, t_n = times[k], times[k + 1]
    segments = []
    z = noise
    b = plan.boundary
    if k > 0:
        if grad_through == "no_grad_prefix":
            with torch.no_grad():
                z = _jump(generator_model, z, 1.0, t_k, text, condition, b, segments, False)
        else:
            z = _jump(generator_model, z, 1.0, t_k, text, condition, b, segments, torch.is_grad_enabled())
    z = _jump(generator_model, z, t_k, t_n, text, condition, b, segments, torch.is_grad_enabled())
    if k < N - 1:
        z = _jump(generator_model, z, t_n, 0.0, text, condition, b, segments, torch.is_grad_enabled())
    info = {"N": N, "k": k, "t_k": t_k, "t_next": t_n, "calls": len(segments), "segments": segments}
    return z, info


def consistency_backward_simulation(
    generator_model: ModelFn,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    plan: SimulationPlan,
    generator: Optional[torch.Generator] = None,
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Consistency backward simulation (rCM / Self-Forcing; paper Sec. 4.2.2, Fig. 5a): the baseline.

    The rollout of an ``N``-step *consistency sampler* on the same grid ``t_0 = 1 > ... > t_N = 0``, stopped
    at the gradient step ``k``: with ``z = noise``, for ``i = 0..k``:

    * ``x0_hat_i = f(z, t_i, 0) = z - t_i u(z, t_i, 0)`` (jump to data with the generator);
    * if ``i < k``: re-noise to the next time with fresh noise, ``z = (1 - t_{i+1}) x0_hat_i + t_{i+1} eps_i``,
      ``eps_i ~ N(0, I)`` drawn from ``generator`` (float32 on the generator's device, then cast).

    Steps ``0..k-1`` run under ``torch.no_grad`` (truncated gradient, "stop-grad before the gradient step"
    as in Self-Forcing); step ``k`` keeps its graph. The returned sample is ``x0_hat_k``. Calls: ``k + 1``.

    Args:
        generator_model: ``model(z, T, R, text) -> u`` (called with ``R = 0``).
        noise: ``[b, f, c, h, w]`` state at t = 1.
        text: passed through to the model.
        plan: :class:`SimulationPlan`.
        generator: ``torch.Generator`` for the re-noising draws (``None``: global RNG); ``k`` draws of
            ``noise.shape`` in order ``i = 0..k-1``.
        condition: optional :class:`FrameCondition`, held clean with ``T = 0`` in every call (re-noised
            condition frames are replaced by the clean ones again before the next call).

    Returns:
        ``(x0_hat_k, info)``; ``info``: ``N``, ``k``, ``t_k``, ``calls``.

    Raises:
        ValueError: bad ``noise``, a two-expert plan (``plan.boundary``: its jumps to 0 cross the boundary), or a
            model output of the wrong shape.
    """
    _check_latent("noise", noise)
    if plan.boundary is not None:
        raise ValueError("the consistency rollout jumps to 0 from every grid point, across the two-expert boundary "
                         f"{plan.boundary:g}: use the flow-map backward simulation")
    if condition is not None:
        condition.check(noise)
    times = plan.times.tolist()
    z = noise
    gdev = _gen_device(generator)
    for i in range(plan.k):
        with torch.no_grad():
            x0_hat = _flow_map_step(generator_model, z, times[i], 0.0, text, condition)
            eps = torch.randn(noise.shape, generator=generator, device=gdev, dtype=torch.float32)
            eps = eps.to(device=noise.device, dtype=torch.float64)
            t_next = times[i + 1]
            z = ((1.0 - t_next) * x0_hat.to(torch.float64) + t_next * eps).to(noise.dtype)
    x0_hat = _flow_map_step(generator_model, z, times[plan.k], 0.0, text, condition)
    info = {"N": plan.N, "k": plan.k, "t_k": times[plan.k], "calls": plan.k + 1}
    return x0_hat, info


def backward_simulation(
    generator_model: ModelFn,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    plan: SimulationPlan,
    cfg: Optional[DistillConfig] = None,
    generator: Optional[torch.Generator] = None,
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Dispatch on ``cfg.simulation``: :func:`flow_map_backward_simulation` (with ``cfg.grad_through``) or
    :func:`consistency_backward_simulation` (with ``generator`` for the re-noising). A generator with a
    ``causal_rollout(noise, text, plan, grad_through)`` method (the AnyFlow-FAR generator of
    `training.stage2`) is rolled out by it: `anyflow.causal.causal_flow_map_backward_simulation`.

    ``condition`` (:class:`FrameCondition`) is passed on; the causal generator takes none (FAR conditions
    by whole clean chunks).

    Raises:
        ValueError: a causal generator with ``cfg.simulation != "flow_map"`` or with a ``condition``.
    """
    cfg = cfg if cfg is not None else DistillConfig()
    causal = getattr(generator_model, "causal_rollout", None)
    if causal is not None:
        # AnyFlow-FAR: chunk-by-chunk rollout through the KV cache (anyflow.causal, docs/design/far.md 2.2).
        if cfg.simulation != "flow_map":
            raise ValueError(f"simulation={cfg.simulation!r}: the causal (FAR) generator supports the flow-map "
                             "backward simulation only (the reference's FAR stage 2)")
        if condition is not None:
            raise ValueError("the causal (FAR) generator takes no frame condition: it conditions by whole clean "
                             "chunks")
        if plan.boundary is not None:
            raise ValueError("the causal (FAR) generator has no two-expert rollout (FAR experts are not supported)")
        return causal(noise, text, plan, cfg.grad_through)
    if cfg.simulation == "flow_map":
        return flow_map_backward_simulation(generator_model, noise, text, plan, grad_through=cfg.grad_through,
                                            condition=condition)
    return consistency_backward_simulation(generator_model, noise, text, plan, generator=generator,
                                           condition=condition)


# --------------------------------------------------------------------------------------------------
# DMD and critic
# --------------------------------------------------------------------------------------------------
def real_score_velocity(
    real_score: ModelFn,
    z: torch.Tensor,
    T: torch.Tensor,
    text: Optional[torch.Tensor],
    negative_text: Optional[torch.Tensor],
    cfg: DistillConfig,
) -> torch.Tensor:
    """Guided velocity of the real score (float64), ``g = cfg.real_guidance``:

    * ``"dmd"`` convention: ``v = v_c + g (v_c - v_u)`` (DMD2 / CausVid / Self-Forcing ``real_guidance_scale``;
      docs/design/anyflow.md 1.4);
    * ``"cfg"`` convention: ``v = v_u + g (v_c - v_u)``;

    with ``v_c = real(z, T, T, text)``, ``v_u = real(z, T, T, negative_text)``. Combining velocities equals
    combining x0-predictions (``x0 = z - t v`` is affine in ``v``). Without guidance
    (:attr:`DistillConfig.guidance_is_identity`) only the conditional call is made.

    Raises:
        ValueError: ``negative_text`` is None while guidance is needed; a wrong output shape.
    """
    v_c = real_score(z, T, T.clone(), text)
    _check_output(v_c, z, "real score")
    v_c = v_c.to(torch.float64)
    if cfg.guidance_is_identity:
        return v_c
    if negative_text is None:
        raise ValueError("negative_text is required when the real score uses guidance "
                         f"(real_guidance={cfg.real_guidance}, convention {cfg.real_guidance_convention!r})")
    v_u = real_score(z, T, T.clone(), negative_text)
    _check_output(v_u, z, "real score")
    v_u = v_u.to(torch.float64)
    g = cfg.real_guidance
    if cfg.real_guidance_convention == "dmd":
        return v_c + g * (v_c - v_u)
    return v_u + g * (v_c - v_u)


def dmd_loss(
    x0: torch.Tensor,
    real_score: ModelFn,
    fake_score: ModelFn,
    text: Optional[torch.Tensor],
    negative_text: Optional[torch.Tensor],
    tau_generator: Optional[torch.Generator],
    cfg: Optional[DistillConfig] = None,
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Distribution-matching (DMD) loss of a generated sample (paper eq. 5; reference normalisation).

    From ``tau_generator`` (on its device), in this order: ``u = rand(b)`` (float64), then
    ``eps = randn(x0.shape)`` (float32). Then, per sample:

    * ``tau = shift(u, cfg.dmd_tau_shift)`` (one time per sample, all frames), in ``[0, 1]``;
    * ``z = (1 - tau) sg(x0) + tau eps`` (float32, rounded to ``x0.dtype``), ``T = 1000 tau`` float32 ``[b, f]``;
    * with no grad: ``v_real`` from :func:`real_score_velocity` (guided), ``v_fake = fake(z, T, T, text)``;
      ``x0_real = z - tau v_real``, ``x0_fake = z - tau v_fake`` (float64);
    * ``grad = (x0_fake - x0_real) / mean_{f,c,h,w} |sg(x0) - x0_real|`` per sample, ``nan_to_num``
      (the DMD2 / Self-Forcing normaliser used by the reference; ``x0_fake - x0_real = tau (v_real - v_fake)``
      is ``-(s_real - s_fake)`` up to a positive factor, so ``-grad`` is eq. 5's descent direction);
    * ``loss = mean((x0 - sg(x0 - grad))^2)`` over all elements, in float64 (no 0.5 factor; Self-Forcing
      multiplies by 0.5 -- irrelevant under Adam apart from the gradient clip).

    Hence ``d loss / d x0 = 2 grad / x0.numel()``, propagated into the generator through ``x0``'s graph.
    If ``real_score`` and ``fake_score`` agree the gradient is exactly zero.

    With a ``condition`` (:class:`FrameCondition`; ``x0`` holds the clean latents on its frames, as the
    conditioned rollout returns them): the condition frames of ``z`` are those clean latents with
    ``tau = 0`` (``T = R = 0`` for both scores), ``grad`` is 0 on them, and the normaliser and the loss
    are per-sample means over the other frames (:func:`~megatron_anyflow.anyflow.objective.frame_mean`),
    averaged over the samples.

    Args:
        x0: generated sample ``[b, f, c, h, w]`` (with graph for the generator update).
        real_score: frozen teacher ``model(z, T, T, text) -> v``.
        fake_score: critic ``model(z, T, T, text) -> v`` (called with the conditional text).
        text: ``[b, L, d]``; negative_text: ``[1 or b, L', d]`` (needed when guidance is used).
        tau_generator: ``torch.Generator`` for ``tau`` and ``eps`` (``None``: global RNG); data-parallel
            ranks should use different states, TP / CP peers of a sample the same.
        cfg: :class:`DistillConfig` (``real_guidance``, ``real_guidance_convention``, ``dmd_tau_shift``).

    Returns:
        ``(loss, info)``: 0-d float64 loss; ``info`` (detached): ``tau`` [b] float64, ``normalizer`` [b]
        float64, ``grad`` (float64, ``x0``'s shape), ``grad_rms`` (0-d), ``loss``.

    Raises:
        ValueError: bad ``x0``; guidance without ``negative_text``; score outputs of the wrong shape.
    """
    cfg = cfg if cfg is not None else DistillConfig()
    _check_latent("x0", x0)
    if condition is not None:
        condition.check(x0)
    b, f = x0.shape[:2]
    gdev = _gen_device(tau_generator)
    u = torch.rand((b,), generator=tau_generator, device=gdev, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=tau_generator, device=gdev, dtype=torch.float32).to(x0.device)
    tau = shift_time(u, cfg.dmd_tau_shift).to(x0.device)
    x0_d = x0.detach()
    # per frame [b, f]: the sample's tau, 0 on condition frames (so z = x0 there)
    tau_f = tau[:, None].expand(b, f) if condition is None else condition.time(tau[:, None].expand(b, f))
    tau32 = _bcast(tau_f.to(torch.float32), x0.dim())
    z = ((1.0 - tau32) * x0_d.to(torch.float32) + tau32 * eps).to(x0.dtype)
    T = _model_time(tau, b, f, x0.device)
    if condition is not None:
        T = condition.time(T)
    with torch.no_grad():
        v_real = real_score_velocity(real_score, z, T, text, negative_text, cfg)
        v_fake = fake_score(z, T, T.clone(), text)
        _check_output(v_fake, z, "fake score")
        tau64 = _bcast(tau_f.to(torch.float64), x0.dim())
        z64 = z.to(torch.float64)
        x0_real = z64 - tau64 * v_real
        x0_fake = z64 - tau64 * v_fake.to(torch.float64)
        dims = tuple(range(1, x0.dim()))
        diff = (x0_d.to(torch.float64) - x0_real).abs()
        if condition is None:
            normalizer = diff.mean(dim=dims, keepdim=True)
        else:
            normalizer = _bcast(frame_mean(diff, ~condition.mask), x0.dim())
        grad = torch.nan_to_num((x0_fake - x0_real) / normalizer)
        if condition is not None:
            grad = grad.masked_fill(_bcast(condition.mask, x0.dim()), 0.0)
    x64 = x0.to(torch.float64)
    sq = (x64 - (x64 - grad).detach()) ** 2
    loss = torch.mean(sq) if condition is None else frame_mean(sq, ~condition.mask).mean()
    info = {
        "tau": tau.detach(),
        "normalizer": normalizer.reshape(b),
        "grad": grad,
        "grad_rms": grad.square().mean().sqrt(),
        "loss": loss.detach(),
    }
    return loss, info


def critic_loss(
    fake_score: ModelFn,
    x0: torch.Tensor,
    text: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    cfg: Optional[DistillConfig] = None,
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Flow-matching loss of the fake score on generated samples (the critic step; docs/design/anyflow.md 1.4).

    From ``generator``, in this order: ``t = logit_normal_t(b, generator, shift=cfg.critic_time_shift)``
    (float32 ``[b]``, one time per sample), ``eps = randn(x0.shape)`` (float32). Then
    ``z = (1 - t) x0 + t eps`` (float32, rounded to ``x0.dtype``), ``v = fake(z, T, T, text)`` with
    ``T = 1000 t`` float32 ``[b, f]``, and ``loss = mean((v - (eps - x0))^2)`` over all elements
    (float32 arithmetic). ``x0`` is detached here (the generator gets no gradient from this loss).
    With a ``condition`` (:class:`FrameCondition`) its frames are the clean latents at ``t = 0``
    (``T = R = 0``) and the loss is the per-sample mean over the other frames
    (:func:`~megatron_anyflow.anyflow.objective.frame_mean`), averaged over the samples: the teacher's
    conditioned objective (``TeacherObjectiveConfig.i2v_prob``) on generated samples.

    Args:
        fake_score: ``model(z, T, T, text) -> v`` (with grad).
        x0: generated samples ``[b, f, c, h, w]`` (from a no-grad rollout).
        text: ``[b, L, d]``.
        generator: ``torch.Generator`` for ``t`` and ``eps`` (``None``: global RNG).
        cfg: :class:`DistillConfig` (``critic_time_shift``).

    Returns:
        ``(loss, info)``: 0-d float32 loss with grad; ``info``: ``t`` [b], ``loss`` (detached).

    Raises:
        ValueError: bad ``x0`` or a wrong output shape.
    """
    cfg = cfg if cfg is not None else DistillConfig()
    _check_latent("x0", x0)
    if condition is not None:
        condition.check(x0)
    b, f = x0.shape[:2]
    gdev = _gen_device(generator)
    t = logit_normal_t(b, generator, shift=cfg.critic_time_shift).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32).to(x0.device)
    x32 = x0.detach().to(torch.float32)
    T = _model_time(t, b, f, x0.device)
    if condition is None:
        tt = _bcast(t, x0.dim())
    else:
        x32, T = condition.hold(x32), condition.time(T)
        tt = _bcast(condition.time(t[:, None].expand(b, f)), x0.dim())
    z = ((1.0 - tt) * x32 + tt * eps).to(x0.dtype)
    v = fake_score(z, T, T.clone(), text)
    _check_output(v, z, "fake score")
    sq = (v.to(torch.float32) - (eps - x32)).square()
    loss = sq.mean() if condition is None else frame_mean(sq, ~condition.mask).mean()
    return loss, {"t": t, "loss": loss.detach()}


def generator_loss(
    generator_model: ModelFn,
    real_score: ModelFn,
    fake_score: ModelFn,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    negative_text: Optional[torch.Tensor],
    plan: SimulationPlan,
    cfg: Optional[DistillConfig] = None,
    tau_generator: Optional[torch.Generator] = None,
    rollout_generator: Optional[torch.Generator] = None,
    stage1: Optional[torch.Tensor] = None,
    condition: Optional[FrameCondition] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Generator objective of one stage-2 step: rollout (:func:`backward_simulation`) + :func:`dmd_loss`,
    plus ``cfg.stage1_weight * stage1`` when ``cfg.cotrain_stage1`` and the caller passes its stage-1
    forward flow-map loss ``stage1`` (computed with ``objective.stage1_loss`` on a real batch). A
    ``condition`` (:class:`FrameCondition`) goes to both the rollout and the DMD loss.

    Returns:
        ``(loss, info)``: ``loss`` 0-d float64 (with grad); ``info``: ``rollout`` (the simulation info),
        ``dmd`` (the DMD info), ``dmd_loss``, ``stage1_loss`` (detached, or None), ``x0`` (detached sample).

    Raises:
        ValueError: ``cfg.cotrain_stage1`` is False but ``stage1`` was given (a silent drop would hide a
            wiring error); plus those of the called functions.
    """
    cfg = cfg if cfg is not None else DistillConfig()
    if stage1 is not None and not cfg.cotrain_stage1:
        raise ValueError("a stage-1 loss was passed but cfg.cotrain_stage1 is False")
    x0, rollout_info = backward_simulation(generator_model, noise, text, plan, cfg, generator=rollout_generator,
                                           condition=condition)
    loss_dmd, dmd_info = dmd_loss(x0, real_score, fake_score, text, negative_text, tau_generator, cfg,
                                  condition=condition)
    loss = loss_dmd
    if stage1 is not None:
        loss = loss + cfg.stage1_weight * torch.as_tensor(stage1).to(torch.float64)
    info = {"rollout": rollout_info, "dmd": dmd_info, "dmd_loss": loss_dmd.detach(),
            "stage1_loss": None if stage1 is None else torch.as_tensor(stage1).detach(), "x0": x0.detach()}
    return loss, info
