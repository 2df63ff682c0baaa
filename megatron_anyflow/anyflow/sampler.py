"""Samplers: the AnyFlow flow-map Euler sampler and the teacher's CFG Euler ODE sampler.

Model callables follow ``model(z, t, r, text) -> u``: ``z`` latents ``[b, f, c, h, w]``; ``t`` and ``r``
float32 ``[b, f]`` on the **0..1000 scale**; ``text`` ``[b, L, d]``; ``u`` of ``z``'s shape, the average
velocity on ``[r, t]`` per unit of t in ``[0, 1]`` (at ``r = t`` the instantaneous velocity).
Both samplers use the grid :func:`~megatron_anyflow.anyflow.timesteps.flow_map_time_grid`
(``shift(linspace(1, 0, N + 1))``), feed the network ``to_model_scale(t)`` (float32), and form the update
with the float64 grid differences in float64 arithmetic, rounded once to the state's dtype, like diffusers'
``FlowMapEulerDiscreteScheduler.step``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import torch

from megatron_anyflow.data.channel_condition import with_channel_condition

from .timesteps import flow_map_time_grid, to_model_scale, two_expert_time_grid
from .two_expert import jump_ranges

__all__ = ["FlowMapEulerSampler", "TeacherEulerSampler", "route_experts"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return iterable
    return tqdm(iterable, desc=desc)


def _check_noise(noise: torch.Tensor) -> None:
    if not torch.is_tensor(noise) or noise.dim() != 5:
        raise ValueError("noise must be a [b, f, c, h, w] tensor")
    if not noise.is_floating_point():
        raise ValueError("noise must be a floating-point tensor")


def _conditioned(model: Optional[ModelFn], y: Optional[torch.Tensor], noise: torch.Tensor) -> Optional[ModelFn]:
    """``model`` reading the channel condition ``y`` (`channel_condition.with_channel_condition`), or ``model``."""
    if y is None or model is None:
        return model
    if (not torch.is_tensor(y) or y.dim() != 5 or y.shape[:2] != noise.shape[:2]
            or y.shape[3:] != noise.shape[3:]):
        raise ValueError(f"channel_condition must be [b, f, c_y, h, w] with noise's b, f, h, w "
                         f"{tuple(noise.shape)}; got {tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    return with_channel_condition(model, y.to(noise.device))


def _euler_update(z: torch.Tensor, dt: float, u: torch.Tensor) -> torch.Tensor:
    """``z - dt * u`` formed in float64 and rounded once to ``z.dtype``.

    This is what diffusers' ``FlowMapEulerDiscreteScheduler.step`` does (its sigmas are float64 tensors
    of rank >= 1, so type promotion computes in float64 before ``.to(model_output.dtype)``); our rollout
    is bitwise identical to the scheduler loop for float32 states.
    """
    return (z.to(torch.float64) - dt * u.to(torch.float64)).to(z.dtype)


def _check_steps_shift(num_steps: int, shift: float) -> None:
    # flow_map_time_grid validates both; call it once so the constructor fails early.
    flow_map_time_grid(num_steps, shift)


class FlowMapEulerSampler:
    """Any-step flow-map Euler sampler: ``z_r = z_t - (t - r) u(z_t, t, r)`` (docs/design/anyflow.md 1.5).

    For ``i = 0..N-1`` with ``(t, r) = (grid[i], grid[i+1])``, ``grid = flow_map_time_grid(N, shift)``:
    ``z <- z - (t - r) * model(z, T, R, text)`` where ``T = to_model_scale(t)``, ``R = to_model_scale(r)``
    expanded to float32 ``[b, f]``. Guidance is fused into the model (guidance scale 1, paper eq. 6), so
    there is one model call per step. With the exact average velocity the result is exact for any N.

    Args:
        num_steps: number of steps ``N >= 1`` (NFE).
        shift: time shift ``s > 0`` (5.0 for Wan2.1 / AnyFlow).
        boundary: for a two-expert model (Wan2.2 A14B; the model a :func:`route_experts` pair), the expert
            boundary ``b`` in ``(0, 1)``: the grid is :func:`~megatron_anyflow.anyflow.timesteps.two_expert_time_grid`
            (its point nearest ``b`` moved onto ``b``, so no step crosses it; ``N = 1`` splits at ``b`` and
            costs two evaluations). None (default): the plain grid.

    Raises:
        ValueError: ``num_steps`` < 1 or not an integer; ``shift <= 0``; ``boundary`` not in (0, 1).

    Attributes:
        times: float64 ``[N + 1]`` grid in ``[0, 1]``, from 1 to 0 (``[3]`` for ``N = 1`` with a boundary).

    Image-to-video (``condition_frames``): the first ``fc`` latent frames are held at the given clean
    latents for the whole rollout and are fed to the model with ``t = 0``; their ``r`` is the step's ``r``
    (``condition_r="step"``, the default: the reference / diffusers AnyFlow pipelines, and what stage 1
    and stage 2 train with ``--i2v-prob``) or 0 (``condition_r="zero"``: a clean frame at the flow-map
    boundary). The model's output for them is discarded.
    """

    def __init__(self, num_steps: int, shift: float = 5.0, boundary: Optional[float] = None):
        _check_steps_shift(num_steps, shift)
        self.shift = float(shift)
        self.times = (flow_map_time_grid(int(num_steps), self.shift) if boundary is None
                      else two_expert_time_grid(int(num_steps), self.shift, boundary))  # validates boundary
        self.boundary = None if boundary is None else float(boundary)
        self.num_steps = len(self.times) - 1  # model calls: N, or 2 for N = 1 split at a boundary

    @torch.no_grad()
    def __call__(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        text: Optional[torch.Tensor],
        progress: bool = False,
        trajectory: bool = False,
        condition_frames: Optional[torch.Tensor] = None,
        condition_r: str = "step",
        channel_condition: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Roll out from ``noise`` (the state at t = 1) to t = 0.

        Args:
            model: ``model(z, T, R, text) -> u`` (T, R float32 ``[b, f]`` on 0..1000).
            noise: ``[b, f, c, h, w]`` initial state at t = 1 (its dtype is the state's dtype; float32
                recommended). Not modified.
            text: text embedding ``[b, L, d]`` passed through to the model (may be ``None``).
            progress: show a tqdm progress bar.
            trajectory: also return the list of the ``N + 1`` states ``[z_1, ..., z_0]`` (clones).
            condition_frames: optional clean latents ``[b, fc, c, h, w]`` for the first ``fc`` frames
                (image-to-video: ``fc = 1``), see the class docstring.
            condition_r: with ``condition_frames``, the condition frames' ``r``: ``"step"`` (the step's r;
                reference, diffusers, training) or ``"zero"``.
            channel_condition: for a model that reads a condition besides its latents (Wan2.2 I2V-A14B),
                ``y`` ``[b, f, c_y, h, w]`` appended to the state's channels at every call
                (`channel_condition`); the state and the update stay ``noise``'s channels.

        Returns:
            ``x0`` ``[b, f, c, h, w]`` in ``noise``'s dtype; with ``trajectory=True`` ``(x0, states)``.

        Raises:
            ValueError: bad ``noise`` rank/dtype, ``condition_frames`` or ``channel_condition`` of the wrong
                shape, or ``condition_r`` not ``"step"`` / ``"zero"``.

        Runs under ``torch.no_grad()``.
        """
        _check_noise(noise)
        if condition_r not in ("step", "zero"):
            raise ValueError(f"condition_r={condition_r!r}; expected 'step' (reference / diffusers) or 'zero'")
        model = _conditioned(model, channel_condition, noise)
        b, f = noise.shape[:2]
        fc = 0
        if condition_frames is not None:
            if (condition_frames.dim() != 5 or condition_frames.shape[0] != b
                    or condition_frames.shape[2:] != noise.shape[2:] or not (1 <= condition_frames.shape[1] <= f)):
                raise ValueError(
                    f"condition_frames must be [b, fc, c, h, w] with 1 <= fc <= f matching noise "
                    f"{tuple(noise.shape)}, got {tuple(condition_frames.shape)}"
                )
            fc = condition_frames.shape[1]
            condition_frames = condition_frames.to(device=noise.device, dtype=noise.dtype)

        z = noise.clone()
        if fc:
            z[:, :fc] = condition_frames
        states = [z.clone()] if trajectory else None
        times = self.times.tolist()
        for i in _progress(range(self.num_steps), progress, "flow-map sampling"):
            t, r = times[i], times[i + 1]
            T = to_model_scale(t).to(noise.device).expand(b, f).clone()
            R = to_model_scale(r).to(noise.device).expand(b, f).clone()
            if fc:
                T[:, :fc] = 0.0
                if condition_r == "zero":
                    R[:, :fc] = 0.0
            u = model(z, T, R, text)
            z = _euler_update(z, t - r, u)
            if fc:
                z[:, :fc] = condition_frames
            if trajectory:
                states.append(z.clone())
        if trajectory:
            return z, states
        return z


def route_experts(high: ModelFn, low: ModelFn, boundary: float) -> ModelFn:
    """A two-expert model (Wan2.2 A14B) as one flow-map callable: each jump goes to the expert whose time
    range holds it.

    diffusers' ``WanPipeline`` runs ``transformer`` (``high``, high noise) for timesteps ``>= boundary_ratio
    * 1000`` and ``transformer_2`` (``low``) below. A flow-map jump t -> r uses ``high`` when it lies in
    ``[b, 1]`` (``r >= b``) and ``low`` when it lies in ``[0, b]`` (``t <= b``): a jump that starts exactly at
    ``b`` belongs to ``low`` (the per-timestep rule would give its start time to ``high``). A jump that
    crosses ``b`` has no expert (each knows only its own range) and is refused: sample on
    :func:`~megatron_anyflow.anyflow.timesteps.two_expert_time_grid` (``FlowMapEulerSampler(..., boundary=b)``),
    whose steps never cross. The choice and its Gaussian evidence: docs/design/anyflow.md 2.1.

    Args:
        high, low: ``model(z, T, R, text) -> u`` callables (T, R float32 ``[b, f]`` on 0..1000).
        boundary: ``b`` in ``(0, 1)`` on the [0, 1] time scale; compared on the model scale as
            ``to_model_scale(b)`` (float32), so a grid point snapped onto ``b`` routes exactly.

    Returns:
        ``model(z, T, R, text) -> u``: one call of one expert with the same arguments. Every (sample, frame)
        time pair of a call must lie in one expert's range (frames held clean, ``T = 0``, follow ``R``). Its
        ``boundary`` attribute is ``b``, as `two_expert.TwoExpertWanModel`'s (the samplers of
        `anyflow.generation` and `anyflow.evaluation` read it to sample on the boundary grid).

    Raises:
        ValueError: ``boundary`` not in (0, 1) (at construction); at a call, a jump that crosses ``b``, or
            time pairs of one call in both ranges (the values named).
    """
    b = float(boundary)
    if not 0.0 < b < 1.0:
        raise ValueError(f"boundary must lie in (0, 1), got {boundary!r}")
    B = float(to_model_scale(b))

    def model(z, T, R, text):
        in_high, in_low = jump_ranges(T, R, B)  # the rule, shared with two_expert.TwoExpertWanModel
        if bool(in_high.all()):
            return high(z, T, R, text)
        if bool(in_low.all()):
            return low(z, T, R, text)
        raise ValueError(f"a jump crosses the expert boundary {B:g} (model scale): T in [{float(T.min()):g}, "
                         f"{float(T.max()):g}], R in [{float(R.min()):g}, {float(R.max()):g}]; no single expert "
                         "knows it: sample on two_expert_time_grid (FlowMapEulerSampler(..., boundary=b))")

    model.boundary = b
    return model


class TeacherEulerSampler:
    """Euler ODE sampler of the (single-time) teacher with classifier-free guidance; one model or two experts.

    Same grid as :class:`FlowMapEulerSampler`. Per step ``(t, r)``:
    ``v = v_u + g (v_c - v_u)`` with ``v_c = model(z, T, T, text)``, ``v_u = model(z, T, T, negative_text)``
    (the teacher is called with ``r = t``, where the AnyFlow time embedding equals the pretrained one),
    then ``z <- z - (t - r) v``. ``guidance_scale == 1`` skips the unconditional call. This is the
    Wan2.1 flow-matching Euler sampler with CFG (the design's DMD "real" score uses the same combination).

    Two experts (Wan2.2 A14B, ``boundary`` set): each step's velocity comes from one expert, chosen by the
    step's start time as diffusers' ``WanPipeline.__call__`` does: ``transformer`` (``model``, high noise)
    with ``guidance_scale`` when ``t_model >= boundary_ratio * 1000``, else ``transformer_2`` (``model_2``,
    low noise) with ``guidance_scale_2``. ``t_model`` is the timestep the expert is fed, ``T =
    to_model_scale(t)`` (float32 on 0..1000), compared with ``to_model_scale(boundary)``: WanPipeline
    compares its scheduler's timestep, the one its transformer is fed, with the Python float ``boundary_ratio
    * 1000``, which torch rounds to a float32 timestep's dtype before comparing (FlowMatchEulerDiscreteScheduler;
    FlowMapEulerDiscreteScheduler's float64 timesteps route alike on every grid N <= 200, tested). A grid
    point exactly on the boundary (Wan's shift-5 grid at b = 0.875 for N a multiple of 12) goes to the high
    expert.
    The grid stays the plain one (no snapping: a teacher's Euler step is no flow map, and the reference
    samples the plain grid; docs/design/anyflow.md 2.1: the routings of an Euler teacher differ by less
    than its discretisation error).

    Args:
        num_steps: number of Euler steps ``N >= 1`` (NFE = N, or 2N with CFG).
        shift: time shift ``s > 0``.
        guidance_scale: CFG scale ``g`` (3.0 by default; 1.0 disables CFG); with ``boundary``, the high
            expert's (WanPipeline's ``guidance_scale``).
        boundary: None (one model) or the expert boundary ``b`` in ``(0, 1)`` on the [0, 1] time scale
            (diffusers' ``boundary_ratio``: 0.875 for T2V-A14B); then ``__call__`` needs ``model_2``.
        guidance_scale_2: the low expert's CFG scale (WanPipeline's ``guidance_scale_2``); None: equal to
            ``guidance_scale`` (WanPipeline's default). Only with ``boundary``. Each expert's scale applies on
            its own steps: with ``guidance_scale`` 1 and ``guidance_scale_2`` > 1 the low expert is guided.
            WanPipeline differs there (its CFG switch reads ``guidance_scale`` alone, so it then guides neither
            expert); for scales > 1, the ones in use, the two agree (tests/test_two_expert_synthesis.py).

    Attributes:
        times: float64 ``[N + 1]`` grid in ``[0, 1]``, from 1 to 0.
        experts: with ``boundary``, ``["high" | "low"] * N``, the expert of each step; None for one model.

    Raises:
        ValueError: ``num_steps`` < 1, ``shift <= 0``, a non-finite guidance scale, ``boundary`` not in
            (0, 1), ``guidance_scale_2`` without ``boundary``.
    """

    def __init__(self, num_steps: int, shift: float = 5.0, guidance_scale: float = 3.0,
                 boundary: Optional[float] = None, guidance_scale_2: Optional[float] = None):
        _check_steps_shift(num_steps, shift)
        guidance_scale = _check_guidance(guidance_scale, "guidance_scale")
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        self.guidance_scale = guidance_scale
        self.times = flow_map_time_grid(self.num_steps, self.shift)
        self.boundary = self.guidance_scale_2 = self.experts = None
        if boundary is None:
            if guidance_scale_2 is not None:
                raise ValueError("guidance_scale_2 is the low-noise expert's CFG scale: it needs a boundary "
                                 "(two experts)")
            return
        try:
            b = float(boundary)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"boundary must be a number in (0, 1), got {boundary!r}") from exc
        if not 0.0 < b < 1.0:
            raise ValueError(f"boundary must lie in (0, 1) (the [0, 1] time at which the experts switch), got "
                             f"{boundary!r}")
        self.boundary = b
        self.guidance_scale_2 = (guidance_scale if guidance_scale_2 is None
                                 else _check_guidance(guidance_scale_2, "guidance_scale_2"))
        B = to_model_scale(b)
        self.experts = ["high" if bool(to_model_scale(t) >= B) else "low" for t in self.times[:-1].tolist()]

    @torch.no_grad()
    def __call__(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        text: Optional[torch.Tensor],
        negative_text: Optional[torch.Tensor] = None,
        progress: bool = False,
        trajectory: bool = False,
        model_2: Optional[ModelFn] = None,
        channel_condition: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Integrate the guided PF-ODE from ``noise`` (t = 1) to t = 0.

        Args:
            model: ``model(z, T, R, text) -> v``; called with ``R = T`` (float32 ``[b, f]``, 0..1000). With a
                boundary, the high-noise expert (diffusers' ``transformer``).
            noise: ``[b, f, c, h, w]`` state at t = 1 (its dtype is the state's dtype).
            text: conditional text embedding ``[b, L, d]``.
            negative_text: negative-prompt embedding ``[b, L', d]``; required when a guidance scale in use
                is not 1.
            progress: tqdm progress bar.
            trajectory: also return the ``N + 1`` states.
            model_2: with a boundary, the low-noise expert (diffusers' ``transformer_2``); required then,
                refused without one.
            channel_condition: ``y`` ``[b, f, c_y, h, w]`` for models that read a condition besides their
                latents (Wan2.2 I2V-A14B, `channel_condition`): appended to the state at every call of either
                expert, the same for the conditional and the unconditional branch (``WanImageToVideoPipeline``).

        Returns:
            ``x0`` in ``noise``'s dtype, or ``(x0, states)`` with ``trajectory=True``.

        Raises:
            ValueError: bad ``noise``; ``negative_text`` missing while a guidance scale in use is not 1;
                ``model_2`` missing with a boundary or given without one; ``channel_condition`` not of
                ``noise``'s ``b, f, h, w``.
        """
        _check_noise(noise)
        model, model_2 = _conditioned(model, channel_condition, noise), _conditioned(model_2, channel_condition, noise)
        if self.boundary is None:
            if model_2 is not None:
                raise ValueError("model_2 (the low-noise expert) needs a boundary: TeacherEulerSampler(..., "
                                 "boundary=b)")
            models, scales = [model] * self.num_steps, [self.guidance_scale] * self.num_steps
        else:
            if model_2 is None:
                raise ValueError(f"a two-expert TeacherEulerSampler (boundary {self.boundary:g}) needs model_2, "
                                 "the low-noise expert")
            high = [e == "high" for e in self.experts]
            models = [model if h else model_2 for h in high]
            scales = [self.guidance_scale if h else self.guidance_scale_2 for h in high]
        if negative_text is None and any(g != 1.0 for g in scales):
            raise ValueError("negative_text is required when guidance_scale != 1")
        b, f = noise.shape[:2]
        z = noise.clone()
        states = [z.clone()] if trajectory else None
        times = self.times.tolist()
        for i in _progress(range(self.num_steps), progress, "teacher sampling"):
            t, r = times[i], times[i + 1]
            m, g = models[i], scales[i]
            T = to_model_scale(t).to(noise.device).expand(b, f).clone()
            v = m(z, T, T, text).to(z.dtype)
            if g != 1.0:
                v_u = m(z, T, T, negative_text).to(z.dtype)
                v = v_u + g * (v - v_u)
            z = _euler_update(z, t - r, v)
            if trajectory:
                states.append(z.clone())
        if trajectory:
            return z, states
        return z


def _check_guidance(g, name: str) -> float:
    try:
        g = float(g)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a finite number, got {g!r}") from exc
    if not math.isfinite(g):
        raise ValueError(f"{name} must be finite, got {g!r}")
    return g
