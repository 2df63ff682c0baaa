"""AnyFlow training objectives: stage-1 forward flow-map training and the teacher's flow matching.

Conventions (shared with :mod:`~megatron_anyflow.anyflow.timesteps` and
:mod:`~megatron_anyflow.anyflow.sampler`):

* times ``t, r`` lie in ``[0, 1]`` (``t = 1`` noise, ``t = 0`` data); ``z_t = (1 - t) x + t eps`` and the
  instantaneous velocity target is ``v = eps - x``;
* the network is called as ``model(z, T, R, text) -> u`` with ``z`` ``[b, f, c, h, w]``, ``T = 1000 t`` and
  ``R = 1000 r`` **float32** ``[b, f]`` (one time per sample and latent frame, never bf16: see
  ``docs/design/anyflow.md`` 6), ``text`` ``[b, L, d]``; ``u`` has ``z``'s shape and is the average
  velocity on ``[r, t]`` per unit of t in ``[0, 1]``, so the flow map is ``f(z_t, t, r) = z_t - (t - r) u``;
* ``x`` (clean latents) is in the model's dtype. ``z`` and its finite-difference perturbations are formed
  in float32 and rounded once to ``x.dtype``. With bf16 ``x`` the ``+/- v e/1000`` perturbation
  (``e/1000 = 0.005``) is close to bf16's resolution (``2^-8`` relative), so the finite difference in the
  ``z`` direction is coarse; a model that accepts float32 latents (casting after its patch embedding)
  avoids that: pass float32 ``x``.

Sources: the AnyFlow paper (Alg. 1; eq. 3 MeanFlow objective, eq. 4 central difference, eq. 6
guidance-fused prediction, eq. 7 adaptive loss reweighting) and the public reference implementation
(docs/design/anyflow.md 1.3). The fused per-sample loss and the reweighting run in
:mod:`megatron_anyflow_kernels` (Triton on CUDA, PyTorch reference elsewhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_anyflow_kernels import adaptive_reweight, flow_map_loss, flow_map_target

from .timesteps import KIND_BOUNDARY, TimeSamplerConfig, logit_normal_t, loss_weight, sample_t_r, to_model_scale

__all__ = [
    "FlowMapObjectiveConfig",
    "TeacherObjectiveConfig",
    "stage1_loss",
    "flow_matching_loss",
    "far_stage1_loss",
    "sample_far_num_chunks",
    "guidance_fused",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# One generator for the whole micro-batch, or one per sample (row). Per-sample generators seeded by the
# sample's index in the iteration's global batch make the draws independent of the batch layout
# (micro-batch size, data-parallel size, accumulation steps): see ``training/stages.py``.
NoiseGenerators = Union[None, torch.Generator, Sequence[torch.Generator]]

_BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _check_prob(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from exc
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


@dataclass
class FlowMapObjectiveConfig:
    """Constants of the stage-1 forward flow-map objective (reference defaults).

    Attributes:
        guidance: CFG scale ``g`` fused into the prediction, ``u = (u_c - (1 - g) sg(u_null)) / g``
            (paper eq. 6; 3.0). Also divides the finite difference, ``du/dt = (u_+ - u_-) / (2 e g)``
            (paper Alg. 1), which uses the *conditional* outputs only: for a model whose conditional and
            null outputs coincide (e.g. one that ignores the text), the derivative of the fused ``u`` is
            ``g`` times that, so the MeanFlow fixed point is the true flow map only at ``g = 1``.
            Must be non-zero and finite.
        fd_eps: finite-difference step ``e`` in timestep units (0..1000 scale; paper eq. 4; 5.0): the two
            extra forwards run at ``(z +/- v e/1000, T +/- e, R)``. Must be > 0. ``T +/- e`` is not
            clamped to ``[0, 1000]`` (as in the reference).
        text_dropout: probability that a sample's prompt is replaced by the negative-prompt embedding in
            the conditional (and +/-) forwards (0.1).
        i2v_prob: probability that a sample's latent frame 0 is a clean condition frame (image-to-video):
            its ``t = 0`` (so ``z = x`` there) while its ``r`` stays the sample's ``r`` (the reference
            trainer sets only ``t[:, 0] = 0``, and diffusers' ``AnyFlowPipeline`` feeds condition frames
            ``timestep = 0`` with the step's ``r_timestep``); it is not perturbed in the +/- forwards (the
            condition is held clean along the trajectory, so its total t-derivative is zero; the reference
            perturbs it with the other frames) and its loss is masked (frame weight 0) (0.0). The reference
            draws one i2v decision per global batch; here it is per sample.
        adaptive_reweight: apply the adaptive loss reweighting of paper eq. 7 (True); False: plain mean.
        reweight_eps: the constant ``c`` of eq. 7 (1e-5).
        time: the (t, r) sampler and loss-weight configuration (:class:`TimeSamplerConfig`).
        kernel_backend: backend of the fused loss kernels: ``"auto"`` (Triton for CUDA tensors, the torch
            reference elsewhere), ``"torch"`` or ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``).

    Raises:
        ValueError: on construction, for a zero / non-finite guidance, ``fd_eps <= 0``, a probability
            outside ``[0, 1]``, ``reweight_eps < 0``, a ``time`` that is not a :class:`TimeSamplerConfig`
            or an unknown backend.
    """

    guidance: float = 3.0
    fd_eps: float = 5.0
    text_dropout: float = 0.1
    i2v_prob: float = 0.0
    adaptive_reweight: bool = True
    reweight_eps: float = 1e-5
    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    kernel_backend: str = "auto"

    def __post_init__(self) -> None:
        self.guidance = float(self.guidance)
        if not math.isfinite(self.guidance) or self.guidance == 0.0:
            raise ValueError(f"guidance must be a finite non-zero number, got {self.guidance!r}")
        self.fd_eps = float(self.fd_eps)
        if not math.isfinite(self.fd_eps) or self.fd_eps <= 0.0:
            raise ValueError(f"fd_eps must be a positive finite number (timestep units), got {self.fd_eps!r}")
        self.text_dropout = _check_prob("text_dropout", self.text_dropout)
        self.i2v_prob = _check_prob("i2v_prob", self.i2v_prob)
        self.adaptive_reweight = bool(self.adaptive_reweight)
        self.reweight_eps = float(self.reweight_eps)
        if not math.isfinite(self.reweight_eps) or self.reweight_eps < 0.0:
            raise ValueError(f"reweight_eps must be a finite number >= 0, got {self.reweight_eps!r}")
        if not isinstance(self.time, TimeSamplerConfig):
            raise ValueError(f"time must be a TimeSamplerConfig, got {type(self.time).__name__}")
        if self.kernel_backend not in _BACKENDS:
            raise ValueError(f"kernel_backend must be one of {_BACKENDS}, got {self.kernel_backend!r}")


@dataclass
class TeacherObjectiveConfig:
    """Constants of the plain flow-matching (teacher / critic) objective.

    Attributes:
        shift: time shift ``s`` applied to the logit-normal draw (5.0, Wan2.1).
        logit_mean, logit_std: of the normal before the sigmoid (0.0, 1.0).
        text_dropout: probability that a prompt is replaced by the negative-prompt embedding (0.1).
        i2v_prob: probability that a sample's latent frame 0 is a clean condition frame (text-image-to-video,
            Wan2.2 TI2V): its input is the clean latent (``z = x``), its time ``t = r = 0`` (the teacher is
            single-time; diffusers' ``WanPipeline`` with ``expand_timesteps=True`` feeds the first frame's
            tokens ``timestep = 0``), and it is excluded from the loss (the per-sample mean runs over the
            other frames). The same option as :attr:`FlowMapObjectiveConfig.i2v_prob` (0.0).

    Raises:
        ValueError: ``shift <= 0``, ``logit_std <= 0``, or ``text_dropout`` / ``i2v_prob`` outside ``[0, 1]``.
    """

    shift: float = 5.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    text_dropout: float = 0.1
    i2v_prob: float = 0.0

    def __post_init__(self) -> None:
        self.shift = float(self.shift)
        if not math.isfinite(self.shift) or self.shift <= 0.0:
            raise ValueError(f"shift must be a positive finite number, got {self.shift!r}")
        self.logit_mean = float(self.logit_mean)
        self.logit_std = float(self.logit_std)
        if not math.isfinite(self.logit_std) or self.logit_std <= 0.0:
            raise ValueError(f"logit_std must be a positive finite number, got {self.logit_std!r}")
        self.text_dropout = _check_prob("text_dropout", self.text_dropout)
        self.i2v_prob = _check_prob("i2v_prob", self.i2v_prob)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_latent_and_text(x, text, negative_text):
    if not torch.is_tensor(x) or x.dim() != 5:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a 5-D tensor [b, f, c, h, w] of clean latents, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    b = x.shape[0]
    if not torch.is_tensor(text) or text.dim() != 3:
        shape = tuple(text.shape) if torch.is_tensor(text) else type(text).__name__
        raise ValueError(f"text must be a 3-D tensor [b, L, d], got {shape}")
    if text.shape[0] != b:
        raise ValueError(f"text batch {text.shape[0]} does not match x batch {b} "
                         f"(text {tuple(text.shape)}, x {tuple(x.shape)})")
    if not torch.is_tensor(negative_text) or negative_text.dim() != 3:
        shape = tuple(negative_text.shape) if torch.is_tensor(negative_text) else type(negative_text).__name__
        raise ValueError(f"negative_text must be a 3-D tensor [1 or b, L, d], got {shape}")
    if negative_text.shape[0] not in (1, b) or negative_text.shape[1:] != text.shape[1:]:
        raise ValueError(f"negative_text must be [1 or b, L, d] = [1 or {b}, {text.shape[1]}, {text.shape[2]}] "
                         f"(same L and d as text), got {tuple(negative_text.shape)}")


def _check_noise(noise, x):
    if noise is None:
        return
    if not torch.is_tensor(noise) or tuple(noise.shape) != tuple(x.shape):
        shape = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _row_draws(x: torch.Tensor, noise: Optional[torch.Tensor], generator: NoiseGenerators, num_uniform: int,
               time_fn: Optional[Callable[[int, Optional[torch.Generator]], torch.Tensor]] = None):
    """The per-sample random draws of one micro-batch: ``(t or None, eps, u [num_uniform, b])``.

    One generator: ``t = time_fn(b, g)`` (if given), ``eps = randn(x.shape, dtype=x.dtype)`` (unless
    ``noise``), then ``num_uniform`` draws of ``rand(b)``, in this order. A sequence of ``b`` generators:
    the same order per sample from its own generator (``time_fn(1, g_i)``, ``randn(x.shape[1:])``,
    ``rand(num_uniform)``), so a sample's draws do not depend on which other samples share its micro-batch.

    Raises:
        ValueError: a generator sequence whose length is not the batch size.
    """
    b = x.shape[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"got {len(generator)} per-sample noise generators for a batch of {b}")
        ts, rows, us = [], [], []
        for g in generator:
            dev = _gen_device(g)
            if time_fn is not None:
                ts.append(time_fn(1, g).to(x.device))
            if noise is None:
                rows.append(torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=dev).to(x.device))
            us.append(torch.rand((num_uniform, 1), generator=g, dtype=torch.float32, device=dev).to(x.device))
        t = torch.cat(ts) if time_fn is not None else None
        eps = torch.cat(rows) if noise is None else noise.to(device=x.device, dtype=x.dtype)
        return t, eps, torch.cat(us, dim=1)
    t = time_fn(b, generator).to(x.device) if time_fn is not None else None
    eps = _draw_noise(x, noise, generator)
    dev = _gen_device(generator)
    u = [torch.rand((b,), generator=generator, dtype=torch.float32, device=dev).to(x.device) for _ in range(num_uniform)]
    return t, eps, torch.stack(u) if u else torch.empty((0, b), device=x.device)


def _draw_noise(x, noise, generator):
    """``eps`` in x's dtype/device: ``noise`` if given, else ``randn(x.shape, dtype=x.dtype)`` from ``generator``."""
    if noise is not None:
        return noise.to(device=x.device, dtype=x.dtype)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_gen_device(generator))
    return eps.to(x.device)


def _select_text(text, negative_text, drop):
    """Rows of ``text`` with ``drop`` replaced by the negative embedding (broadcast to b)."""
    b = text.shape[0]
    neg = negative_text.to(device=text.device, dtype=text.dtype).expand(b, -1, -1)
    return torch.where(drop.view(b, 1, 1), neg, text), neg.contiguous()


def condition_mask(i2v: torch.Tensor, f: int) -> torch.Tensor:
    """``[b, f]`` bool: True on latent frame 0 of the samples with ``i2v`` ``[b]`` (the clean condition
    frame of image-to-video), False elsewhere."""
    cond = torch.zeros((i2v.shape[0], f), dtype=torch.bool, device=i2v.device)
    cond[:, 0] = i2v
    return cond


def frame_mean(sq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-sample mean ``[b]`` of ``sq`` ``[b, f, ...]`` over the elements of the frames with ``keep``
    ``[b, f]`` = 1 (the trained frames; condition frames have 0): the mean over each frame's elements,
    then the ``keep``-weighted mean over frames. Every sample needs a kept frame."""
    b, f = keep.shape
    return (sq.reshape(b, f, -1).mean(dim=2) * keep.to(sq.dtype)).sum(dim=1) / keep.to(sq.dtype).sum(dim=1)


def check_i2v_frames(i2v_prob: float, f: int) -> None:
    """ValueError when image-to-video (``i2v_prob > 0``) meets clips of fewer than 2 latent frames."""
    if i2v_prob > 0.0 and f < 2:
        raise ValueError(f"i2v_prob > 0 needs at least 2 latent frames (frame 0 is the condition), got f={f}")


def _bcast(t: torch.Tensor) -> torch.Tensor:
    """[b, f] -> [b, f, 1, 1, 1] for broadcasting against latents."""
    return t.reshape(*t.shape, 1, 1, 1)


def _check_output(u, z, what):
    if not torch.is_tensor(u) or tuple(u.shape) != tuple(z.shape):
        shape = tuple(u.shape) if torch.is_tensor(u) else type(u).__name__
        raise ValueError(f"model output ({what}) must have z's shape {tuple(z.shape)}, got {shape}")


def _dp_world(dp_group) -> int:
    if dp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=dp_group)


# --------------------------------------------------------------------------------------------------
# Stage 1: forward flow-map training (paper Alg. 1)
# --------------------------------------------------------------------------------------------------
def stage1_loss(
    model: ModelFn,
    x: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    cfg: Optional[FlowMapObjectiveConfig] = None,
    *,
    time_generator: Optional[torch.Generator],
    noise_generator: NoiseGenerators,
    global_batch: int,
    global_offset: int,
    dp_group=None,
    noise: Optional[torch.Tensor] = None,
    return_tensors: bool = False,
    boundary_carry: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AnyFlow stage-1 forward flow-map loss of one data-parallel rank's micro-batch (paper Alg. 1).

    Procedure:

    1. ``(t, r, kind) = sample_t_r(global_batch, time_generator, cfg.time)`` and this rank takes rows
       ``[global_offset, global_offset + b)``. The boundary (r = t) / r = 0 / free split is by index over
       the **global** data-parallel micro-batch (docs/design/anyflow.md 6): every DP rank passes the same
       ``time_generator`` state and its own offset (e.g. ``dp_rank * b``); TP / CP peers of one sample pass
       identical generators (and offsets) so they draw identical times, noise and masks. With gradient
       accumulation ``global_batch`` is the whole iteration's batch (all accumulation steps and DP ranks)
       and the offset of rank ``d`` in accumulation step ``j`` is ``j * micro * DP + d * micro`` (the data
       sampler's order), so the split is the same for every (DP, micro-batch, accumulation) layout.
    2. From ``noise_generator`` (each DP rank its own state, or one generator per sample), in this order:
       ``eps = randn(x.shape, dtype=x.dtype)`` (skipped when ``noise`` is given), the text-dropout uniforms
       ``rand(b)`` (sample ``i`` dropped iff ``u_i < cfg.text_dropout``), the image-to-video uniforms
       ``rand(b)`` (frame 0 of sample ``i`` is a clean condition frame iff ``u_i < cfg.i2v_prob``). Both
       uniform draws always happen, whatever the probabilities. The draws are made on the generator's
       device. Per-sample generators draw the same sequence per sample (:func:`_row_draws`).
    3. Per sample and frame ``t, r`` ``[b, f]`` (condition frames: ``t = 0``, ``r`` the sample's);
       ``z = (1 - t) x + t eps``, ``v = eps - x`` (float32 arithmetic, rounded once to ``x.dtype``);
       ``T = to_model_scale(t)``, ``R = to_model_scale(r)`` float32 ``[b, f]``.
    4. Four forwards: ``u_c = model(z, T, R, c)`` **with** grad; under ``torch.no_grad()``:
       ``u_null = model(z, T, R, negative)``, ``u_+ = model(z + v e/1000, T + e, R, c)``,
       ``u_- = model(z - v e/1000, T - e, R, c)`` with ``e = cfg.fd_eps``, ``c`` the prompts after
       dropout, ``negative`` the negative embedding expanded to ``b``; condition frames are not perturbed.
    5. Per-sample loss (:func:`megatron_anyflow_kernels.flow_map_loss`; paper eq. 3, 4, 6)::

           u      = (u_c - (1 - g) u_null) / g
           u_tgt  = v - (T - R) (u_+ - u_-) / (2 e g)        (stop-gradient)
           loss_i = w(t_i) * mean over trained frames and elements of (u - u_tgt)^2

       with ``w`` = :func:`~megatron_anyflow.anyflow.timesteps.loss_weight` of the sample's ``t`` and
       frame weight 0 on condition frames.
    6. Adaptive reweighting (paper eq. 7; if ``cfg.adaptive_reweight``): with no grad, ``(sum of boundary
       losses, number of boundary samples)`` is all-reduced (float64) over ``dp_group`` (a local
       computation when ``dp_group`` is None or has one rank) and added to ``boundary_carry`` (the same
       sums of the iteration's earlier accumulation steps), ``boundary_mean = sum / max(count, 1)``.
       Boundary samples are the first ``n_b`` indices of the global batch and accumulation steps take
       consecutive index ranges, so every boundary sample of the iteration lies in this or an earlier
       accumulation step whenever this step holds a non-boundary sample: the carried mean is the mean
       over **all** boundary samples of the iteration, exactly as with one big micro-batch;
       then :func:`megatron_anyflow_kernels.adaptive_reweight` scales every non-boundary loss by
       ``boundary_mean / (loss_i + cfg.reweight_eps)`` (boundary samples by 1). With no boundary sample in
       the whole group the scales are 1. ``cfg.adaptive_reweight = False``: plain mean.

    The returned loss is the mean over the **local** batch ``b``. Data-parallel gradient averaging (the
    usual DDP / distributed-optimizer all-reduce-mean over equal local batches) then yields the gradient
    of the mean over the global batch; the boundary mean is already global, so DP = n with ``b`` samples
    per rank gives the same gradient as DP = 1 with ``n b`` samples (tests/test_dp_reweight.py).
    ``dp_group`` should span the ranks holding *different* samples (megatron-core's
    ``parallel_state.get_data_parallel_group()``); ranks that hold the same samples (TP, and CP when each
    CP rank computes the loss on full outputs) must not be in it, or their losses are counted twice.
    Every rank of ``dp_group`` must call this function (it contains a collective) when the group has more
    than one rank and ``cfg.adaptive_reweight`` is on.

    Args:
        model: ``model(z, T, R, text) -> u`` (see the module docstring). Called four times; only the first
            call builds an autograd graph.
        x: ``[b, f, c, h, w]`` clean latents, floating point (the model's dtype).
        text: ``[b, L, d]`` prompt embeddings.
        negative_text: ``[1, L, d]`` or ``[b, L, d]`` negative-prompt embedding (same ``L``, ``d``).
        cfg: :class:`FlowMapObjectiveConfig` (defaults if None).
        time_generator: generator of the (t, r) draw, the same state on every DP rank (None: the global
            RNG, which then must be seeded identically everywhere).
        noise_generator: generator of eps and the dropout / i2v draws, different per DP rank (None: the
            global RNG).
        global_batch: size of the data-parallel micro-batch summed over the DP ranks (``n >= b``).
        global_offset: index of this rank's first sample in it (``0 <= offset <= n - b``).
        dp_group: the data-parallel process group for the boundary-loss gather (None: local).
        noise: optional ``eps`` of ``x``'s shape to use instead of drawing it (e.g. slices of one global
            noise tensor, to reproduce a DP = 1 run at DP = n); cast to ``x.dtype``.
        return_tensors: also put the fused prediction ``u_pred`` and the target ``u_target`` (float32,
            ``x``'s shape, detached) in ``stats`` (costs one more pass over the outputs).
        boundary_carry: ``(sum, count)`` float64 0-d tensors on ``x``'s device: the (already global)
            boundary-loss sum and count of the iteration's earlier accumulation steps, i.e. the
            ``boundary_sum`` / ``boundary_count`` stats of the previous call (None: the first step).

    Returns:
        ``(loss, stats)``: ``loss`` 0-d float32 with grad; ``stats`` a dict of detached tensors (no host
        synchronisation): ``loss``; ``per_sample_loss`` [b] (before reweighting, including ``w(t)``);
        ``scales`` [b] (reweighting factors, ones without reweighting); ``boundary_mean`` 0-d (global
        mean boundary loss; 0 when there is none or reweighting is off); ``num_boundary`` 0-d (global
        count; local count when reweighting is off); ``num_boundary_local``; ``boundary_sum``,
        ``boundary_count`` (float64, cumulative over the iteration so far: the next call's
        ``boundary_carry``); ``t``, ``r`` [b] (sampled, in
        [0, 1]), ``kind`` [b] (0 boundary, 1 r = 0, 2 free); ``t_mean``, ``r_mean``; ``sample_weight`` [b];
        ``text_dropped`` [b] bool; ``i2v`` [b] bool; ``fd_sq``, ``v_sq`` [b] (float32 squared norms over
        the trained frames of the target's finite-difference term ``(T - R)(u_+ - u_-) / (2 e g)`` and of
        ``v``: their ratio says how much of the target is the model's own derivative); optionally
        ``u_pred``, ``u_target``.

    Raises:
        ValueError: ``x`` not a 5-D floating tensor; ``text`` not ``[b, L, d]``; ``negative_text`` not
            ``[1 or b, L, d]``; ``noise`` not of ``x``'s shape; ``global_batch`` / ``global_offset`` not
            integers with ``0 <= global_offset`` and ``global_offset + b <= global_batch``;
            ``cfg.i2v_prob > 0`` with a single latent frame; a model output not of ``z``'s shape.
    """
    cfg = cfg if cfg is not None else FlowMapObjectiveConfig()
    if not isinstance(cfg, FlowMapObjectiveConfig):
        raise ValueError(f"cfg must be a FlowMapObjectiveConfig, got {type(cfg).__name__}")
    _check_latent_and_text(x, text, negative_text)
    _check_noise(noise, x)
    b, f = x.shape[:2]
    for name, val in (("global_batch", global_batch), ("global_offset", global_offset)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"{name} must be an int, got {val!r}")
    if global_offset < 0 or global_offset + b > global_batch:
        raise ValueError(f"need 0 <= global_offset and global_offset + b <= global_batch, got "
                         f"global_offset={global_offset}, b={b}, global_batch={global_batch}")
    check_i2v_frames(cfg.i2v_prob, f)
    device = x.device
    g, e = cfg.guidance, cfg.fd_eps

    # 1-2. Random draws.
    t_all, r_all, kind_all = sample_t_r(global_batch, time_generator, cfg.time)
    sl = slice(global_offset, global_offset + b)
    t_s, r_s, kind = t_all[sl].to(device), r_all[sl].to(device), kind_all[sl].to(device)
    _, eps, u = _row_draws(x, noise, noise_generator, 2)
    drop, i2v = u[0] < cfg.text_dropout, u[1] < cfg.i2v_prob

    # 3. Per-frame times, noisy latents, velocity.
    t = t_s[:, None].expand(b, f).clone()
    r = r_s[:, None].expand(b, f).clone()
    frame_weight = torch.ones((b, f), dtype=torch.float32, device=device)
    if cfg.i2v_prob > 0.0:
        cond = condition_mask(i2v, f)
        t = t.masked_fill(cond, 0.0)  # r keeps the sample's value (reference / diffusers convention)
        frame_weight = frame_weight.masked_fill(cond, 0.0)
        perturb = (~cond).to(torch.float32)
    else:
        perturb = None
    x32, eps32 = x.to(torch.float32), eps.to(torch.float32)
    z32 = (1.0 - _bcast(t)) * x32 + _bcast(t) * eps32
    v32 = eps32 - x32
    z = z32.to(x.dtype)
    v = v32.to(x.dtype)
    T = to_model_scale(t)
    R = to_model_scale(r)
    step = v32 * (e / 1000.0) if perturb is None else v32 * (e / 1000.0) * _bcast(perturb)
    step_T = torch.full_like(T, e) if perturb is None else e * perturb
    text_used, neg = _select_text(text, negative_text, drop)

    # 4. Forwards.
    u_cond = model(z, T, R, text_used)
    _check_output(u_cond, z, "conditional")
    with torch.no_grad():
        u_null = model(z, T, R, neg)
        u_plus = model((z32 + step).to(x.dtype), T + step_T, R, text_used)
        u_minus = model((z32 - step).to(x.dtype), T - step_T, R, text_used)
    for name, u in (("null", u_null), ("plus", u_plus), ("minus", u_minus)):
        _check_output(u, z, name)

    # 5. Per-sample loss (fused kernel). All five latents in one dtype (fp32 or bf16).
    lat_dtype = u_cond.dtype if u_cond.dtype in _KERNEL_DTYPES else torch.float32
    lat = [u.to(lat_dtype) for u in (u_cond, u_null, u_plus, u_minus, v)]
    dt = (T - R).to(torch.float32)
    sample_weight = loss_weight(t_s, cfg.time).to(device)
    per_sample = flow_map_loss(*lat, dt, frame_weight, sample_weight, guidance=g, fd_eps=e,
                               backend=cfg.kernel_backend)

    # 6. Adaptive reweighting (eq. 7) with the boundary mean gathered over the DP group.
    is_boundary = kind == KIND_BOUNDARY
    n_b_local = is_boundary.sum()
    if cfg.adaptive_reweight:
        with torch.no_grad():
            acc = torch.stack([
                (per_sample.detach().to(torch.float64) * is_boundary).sum(),
                n_b_local.to(torch.float64),
            ])
            if _dp_world(dp_group) > 1:
                dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=dp_group)
            if boundary_carry is not None:
                acc = acc + torch.stack([c.to(device=acc.device, dtype=torch.float64) for c in boundary_carry])
            n_b_global = acc[1]
            boundary_mean = (acc[0] / acc[1].clamp_min(1.0)).to(torch.float32)
            # No boundary sample anywhere in the group: treat every sample as a boundary one (scales 1),
            # without a host synchronisation.
            scale_one = is_boundary | (n_b_global == 0)
        loss, scales = adaptive_reweight(per_sample, scale_one, boundary_mean, eps=cfg.reweight_eps,
                                         backend=cfg.kernel_backend)
    else:
        loss, scales = per_sample.mean(), torch.ones_like(per_sample)
        boundary_mean = torch.zeros((), dtype=torch.float32, device=device)
        n_b_global = n_b_local.to(torch.float64)
        acc = torch.zeros(2, dtype=torch.float64, device=device)

    # Diagnostics (issue #17): per sample, the squared norms of the finite-difference term of the target,
    # (T - R)(u_+ - u_-) / (2 e g), and of v over the trained frames (detached, no host synchronisation).
    with torch.no_grad():
        fw = _bcast(frame_weight)
        fd = (u_plus.to(torch.float32) - u_minus.to(torch.float32)) * (_bcast(dt) / (2.0 * e * g))
        fd_sq = (fd * fw).square().reshape(b, -1).sum(dim=1)
        v_sq = (v32 * fw).square().reshape(b, -1).sum(dim=1)
        del fd

    stats: Dict[str, torch.Tensor] = {
        "loss": loss.detach(),
        "per_sample_loss": per_sample.detach(),
        "fd_sq": fd_sq, "v_sq": v_sq,
        "scales": scales.detach(),
        "boundary_mean": boundary_mean.detach(),
        "num_boundary": n_b_global.detach(),
        "num_boundary_local": n_b_local.detach(),
        "boundary_sum": acc[0].detach(), "boundary_count": acc[1].detach(),
        "t": t_s, "r": r_s, "kind": kind,
        "t_mean": t_s.mean(), "r_mean": r_s.mean(),
        "sample_weight": sample_weight,
        "text_dropped": drop, "i2v": i2v,
    }
    if return_tensors:
        with torch.no_grad():
            u_pred, u_tgt = flow_map_target(*[u.detach() for u in lat], dt, guidance=g, fd_eps=e)
        stats["u_pred"], stats["u_target"] = u_pred, u_tgt
    return loss, stats


# --------------------------------------------------------------------------------------------------
# Teacher: plain flow matching
# --------------------------------------------------------------------------------------------------
def flow_matching_loss(
    model: ModelFn,
    x: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    cfg: Optional[TeacherObjectiveConfig] = None,
    *,
    noise_generator: NoiseGenerators,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Plain flow-matching (v-prediction MSE) loss of a single-time model: the teacher objective.

    Run this first to fine-tune the teacher on one's own data (and it is the stage-2 critic's loss on
    generated samples; docs/design/anyflow.md 1.6). From ``noise_generator``, in this order:
    ``t = logit_normal_t(b, ..., shift, logit_mean, logit_std)`` (one time per sample, all frames),
    ``eps = randn(x.shape, dtype=x.dtype)`` (skipped when ``noise`` is given), text-dropout uniforms
    ``rand(b)`` (prompt ``i`` replaced by the negative embedding iff ``u_i < cfg.text_dropout``), and only
    when ``cfg.i2v_prob > 0`` the image-to-video uniforms ``rand(b)`` (frame 0 of sample ``i`` is a clean
    condition frame iff ``u_i < cfg.i2v_prob``; drawn last, so ``i2v_prob = 0`` keeps every earlier draw
    and the whole computation bitwise as before the option existed). Then per sample and frame
    ``t`` ``[b, f]`` (0 on condition frames), ``z = (1 - t) x + t eps`` (float32, rounded to ``x.dtype``;
    exactly ``x`` on condition frames), ``v = eps - x``, ``pred = model(z, T, T, text_used)`` with
    ``T = to_model_scale(t)`` float32 ``[b, f]`` (``r = t``: the single-time / boundary case of the AnyFlow
    time embedding; condition frames get ``t = r = 0``, as diffusers' ``WanPipeline`` with
    ``expand_timesteps=True`` feeds Wan2.2 TI2V's first frame), and
    ``loss = mean_i mean_{f,c,h,w} (pred - v)^2`` (float32 arithmetic), the mean over ``f`` running over
    the frames that are not condition frames.

    Args:
        model: ``model(z, T, R, text) -> v`` (called once, with grad).
        x: ``[b, f, c, h, w]`` clean latents. text: ``[b, L, d]``. negative_text: ``[1 or b, L, d]``.
        cfg: :class:`TeacherObjectiveConfig` (defaults if None).
        noise_generator: generator of t, eps and the dropout draw (None: global RNG), or one generator
            per sample (the same order of draws per sample: ``t``, ``eps``, dropout uniform).
        noise: optional eps of ``x``'s shape (then not drawn).

    Returns:
        ``(loss, stats)``: 0-d float32 loss with grad; ``stats``: detached ``loss``, ``per_sample_loss``
        [b], ``t`` [b] (in [0, 1]; the sample's time, also where frame 0 is a condition frame), ``t_mean``,
        ``text_dropped`` [b] bool, ``i2v`` [b] bool (frame 0 held clean).

    Raises:
        ValueError: bad shapes (as :func:`stage1_loss`), ``cfg.i2v_prob > 0`` with a single latent frame,
            or a model output not of ``z``'s shape.
    """
    cfg = cfg if cfg is not None else TeacherObjectiveConfig()
    if not isinstance(cfg, TeacherObjectiveConfig):
        raise ValueError(f"cfg must be a TeacherObjectiveConfig, got {type(cfg).__name__}")
    _check_latent_and_text(x, text, negative_text)
    _check_noise(noise, x)
    b, f = x.shape[:2]
    check_i2v_frames(cfg.i2v_prob, f)
    conditioned = cfg.i2v_prob > 0.0
    t_s, eps, u = _row_draws(x, noise, noise_generator, 2 if conditioned else 1, time_fn=lambda n, g: logit_normal_t(
        n, g, shift=cfg.shift, mean=cfg.logit_mean, std=cfg.logit_std))
    drop = u[0] < cfg.text_dropout
    i2v = u[1] < cfg.i2v_prob if conditioned else torch.zeros_like(drop)
    t = t_s[:, None].expand(b, f)
    if conditioned:
        cond = condition_mask(i2v, f)
        t = t.masked_fill(cond, 0.0)
    x32, eps32 = x.to(torch.float32), eps.to(torch.float32)
    z = ((1.0 - _bcast(t)) * x32 + _bcast(t) * eps32).to(x.dtype)
    v32 = eps32 - x32
    T = to_model_scale(t)
    text_used, _ = _select_text(text, negative_text, drop)
    pred = model(z, T, T.clone(), text_used)
    _check_output(pred, z, "velocity")
    sq = (pred.to(torch.float32) - v32).square()
    if conditioned:  # mean over the trained frames only (every sample keeps >= 1 of its f >= 2 frames)
        per_sample = frame_mean(sq, ~cond)
    else:  # i2v_prob = 0: the reduction of the unconditioned objective, bitwise
        per_sample = sq.reshape(b, -1).mean(dim=1)
    loss = per_sample.mean()
    stats = {"loss": loss.detach(), "per_sample_loss": per_sample.detach(), "t": t_s, "t_mean": t_s.mean(),
             "text_dropped": drop, "i2v": i2v}
    return loss, stats


# --------------------------------------------------------------------------------------------------
# AnyFlow-FAR stage 1: teacher forcing with clean copies (docs/design/far.md 2.1)
# --------------------------------------------------------------------------------------------------
def sample_far_num_chunks(generator: Optional[torch.Generator], total_chunks: int, long_context_prob: float,
                          min_chunks: int = 3) -> int:
    """The chunk count ``n`` of a FAR stage-1 iteration (reference ``long_context_training_ratio``).

    With probability ``long_context_prob``: ``n ~ U{min_chunks, ..., total_chunks}``; else
    ``n = min_chunks`` (both capped at ``total_chunks``). Two draws are always made, in this order
    (``rand()``, ``randint``), so the stream does not depend on the outcome. Pass a generator with the
    same state on every rank (the reference draws on rank 0 and broadcasts).

    Raises:
        ValueError: ``total_chunks < 1`` or a probability outside [0, 1].
    """
    if total_chunks < 1:
        raise ValueError(f"total_chunks must be >= 1, got {total_chunks}")
    p = _check_prob("long_context_prob", long_context_prob)
    lo = min(min_chunks, total_chunks)
    u = torch.rand((), generator=generator)
    n = torch.randint(lo, total_chunks + 1, (), generator=generator)
    return int(n) if float(u) < p else lo


def far_stage1_loss(
    model,
    x: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    cfg: Optional[FlowMapObjectiveConfig] = None,
    *,
    chunk_partition: Sequence[int],
    num_chunks: int,
    full_chunk_limit: int = 3,
    **stage1_kwargs,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AnyFlow-FAR stage-1 loss (docs/design/far.md 2.1, reference ``FAR_Wan_AnyFlow_Pretrain_Trainer.train_causal``):
    :func:`stage1_loss` on the target chunks under teacher forcing.

    The clip is cut to its first ``n = num_chunks`` chunks of ``chunk_partition``; the last
    ``min(n, full_chunk_limit)`` chunks are the *target* (``Ff`` frames, full resolution), the earlier ones
    clean compressed context at ``t = r = 0``. Every forward of :func:`stage1_loss` (conditional, null,
    and the two finite-difference ones, which perturb the target frames only) is the teacher-forcing
    forward ``model(cat(context, z), cat(0, T), cat(0, R), text, chunk_partition=cp[:n],
    clean_latents=x_target, clean_t=0)`` of `WanModel`. One (t, r) per sample for all target frames;
    eps is drawn for the target frames only; loss, ``w(t)``, the global split and the adaptive
    reweighting are those of :func:`stage1_loss` on ``x_target``.

    Args:
        model: a FAR `WanModel` (or anything with its FAR call signature).
        x: ``[b, F, c, h, w]`` clean latents of whole clips (``F >= sum(chunk_partition[:n])``).
        text, negative_text, cfg: as :func:`stage1_loss` (``cfg.i2v_prob`` must be 0: I2V ability comes
            from teacher forcing, chunk 0 being the image).
        chunk_partition: latent frames per chunk of a whole clip.
        num_chunks: ``n`` (:func:`sample_far_num_chunks`), the same on every rank.
        full_chunk_limit: the model's ``full_chunk_limit`` (3).
        stage1_kwargs: the keyword arguments of :func:`stage1_loss` (generators, global batch layout,
            ``boundary_carry``, ``noise`` of the target's shape, ...).

    Returns:
        :func:`stage1_loss`'s ``(loss, stats)`` plus ``stats["num_chunks"]`` and ``stats["target_frames"]``.

    Raises:
        ValueError: ``num_chunks`` outside ``1..len(chunk_partition)``, clips shorter than the chunks, or
            ``cfg.i2v_prob > 0``; plus :func:`stage1_loss`'s errors.
    """
    cfg = cfg if cfg is not None else FlowMapObjectiveConfig()
    cp = tuple(int(c) for c in chunk_partition)
    if not 1 <= num_chunks <= len(cp):
        raise ValueError(f"num_chunks={num_chunks}; expected 1..{len(cp)} (chunk_partition={list(cp)})")
    if cfg.i2v_prob > 0:
        raise ValueError(f"i2v_prob={cfg.i2v_prob}: FAR stage 1 has no image-to-video draw (teacher forcing "
                         "trains it: chunk 0 is the image)")
    cp = cp[:num_chunks]
    frames = sum(cp)
    if x.dim() != 5 or x.shape[1] < frames:
        raise ValueError(f"latents {tuple(x.shape)}: {num_chunks} chunks of {list(cp)} need {frames} latent frames")
    nf = min(num_chunks, full_chunk_limit)
    n_target = sum(cp[num_chunks - nf:])
    context, target = x[:, :frames - n_target], x[:, frames - n_target:frames]
    fc = context.shape[1]

    def teacher_forcing(z, T, R, txt):
        zeros = T.new_zeros(T.shape[0], fc)
        return model(torch.cat([context, z], 1), torch.cat([zeros, T], 1), torch.cat([zeros, R], 1), txt,
                     chunk_partition=cp, clean_latents=target, clean_t=T.new_zeros(T.shape[0]))

    loss, stats = stage1_loss(teacher_forcing, target, text, negative_text, cfg, **stage1_kwargs)
    stats["num_chunks"] = torch.tensor(float(num_chunks))
    stats["target_frames"] = torch.tensor(float(n_target))
    return loss, stats


def guidance_fused(model: ModelFn, negative_text: torch.Tensor, guidance: float) -> ModelFn:
    """``model`` with the negative branch fused (paper eq. 6): ``(u_c - (1 - g) sg(u_null)) / g``, the null
    forward without gradient. ``guidance == 1`` returns ``model`` (no extra forward). Used by the FAR
    stage-1 bidirectional branch (reference ``_forward_bidirection`` training)."""
    if guidance == 1.0:
        return model

    def fused(z, T, R, txt):
        u_c = model(z, T, R, txt)
        with torch.no_grad():
            u_null = model(z, T, R, negative_text.to(txt.dtype).expand(txt.shape[0], -1, -1))
        return (u_c - (1.0 - guidance) * u_null) / guidance

    return fused
