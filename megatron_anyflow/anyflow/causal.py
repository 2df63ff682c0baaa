"""AnyFlow-FAR: chunked (frame-autoregressive) any-step generation and the stage-2 causal rollout.

The causal student generates a video chunk by chunk (``docs/design/far.md`` sections 1.7, 2.2, 3).
A chunk partition ``cp`` splits the ``F`` latent frames into chunks; chunk ``k`` covers frames
``[s_k, e_k)`` with ``s_k = sum(cp[:k])``, ``e_k = sum(cp[:k + 1])``. For every chunk:

1. its noise slice ``noise[:, s_k:e_k]`` is rolled out from t = 1 to t = 0 with the flow-map Euler steps
   ``z_r = z_t - (t - r) u(z_t, t, r)`` on the per-chunk grid ``flow_map_time_grid(N, shift)``, each step a
   causal model call that reads the KV cache of chunks ``0..k-1`` (the sampler), or with AnyFlow's
   three-segment flow-map backward simulation (the stage-2 rollout);
2. then the clean prefix ``x[:, :e_k]`` (chunks ``0..k``) is prefilled into a new KV cache at
   ``t = r = 0`` for the next chunk (not after the last chunk).

Image / video conditioning (I2V, V2V) is a chunk-aligned clean prefix: its chunks are copied, never
denoised, and only prefilled (docs/design/far.md 3).

Latents are ``[b, f, c, h, w]`` (frame-major, the project and diffusers FAR layout). Times handed to the
model are float32 on the **0..1000** scale (:func:`~megatron_anyflow.anyflow.timesteps.to_model_scale`);
times in this module's arguments, grids and ``info`` are in ``[0, 1]`` (t = 1 noise, t = 0 data).

Pieces:

* :class:`CausalFlowMapModel`: the contract of the causal model (``new_cache`` / ``step`` / ``prefill``);
* :func:`check_chunk_partition`, :func:`condition_chunks`: partition and conditioning-prefix checks;
* :func:`chunk_schedule`: one chunk's ``(t, r)`` steps, with diffusers' ``t == r`` skip rule;
* :func:`sample_chunked`: the inference loop of diffusers ``AnyFlowFARPipeline`` (``use_kv_cache=True``);
* :func:`causal_flow_map_backward_simulation`: the stage-2 rollout (reference ``training_rollout``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .distill import GRAD_THROUGH, SimulationPlan, _check_latent, _check_output, flow_map_backward_simulation
from .sampler import _euler_update, _progress
from .timesteps import NUM_TRAIN_TIMESTEPS, flow_map_time_grid, to_model_scale

__all__ = [
    "CausalFlowMapModel",
    "check_chunk_partition",
    "condition_chunks",
    "chunk_schedule",
    "sample_chunked",
    "causal_flow_map_backward_simulation",
]

#: ``callback(chunk, step, t, r, z)`` of :func:`sample_chunked` (times in [0, 1]; ``z`` the chunk after the step).
StepCallback = Callable[[int, int, float, float, torch.Tensor], None]


@runtime_checkable
class CausalFlowMapModel(Protocol):
    """The causal (FAR) flow-map model as the chunked sampler and the stage-2 rollout see it.

    The KV cache is an opaque object owned by the model. It is **functional**: :meth:`prefill` returns a
    new cache and never mutates the one it is given, and :meth:`step` only reads it, because the autograd
    graph of earlier :meth:`step` calls (stage-2 rollout) may still reference the old cache's tensors, and
    because one cache serves all the steps of a chunk.

    Shapes: ``b`` batch, ``cp`` the full chunk partition, chunk ``k`` has ``cp[k]`` latent frames of
    ``[c, h, w]``; ``text`` is the prompt embedding ``[b, L, d]`` (passed through untouched, may be None).
    """

    def new_cache(self, batch_size: int) -> Any:
        """An empty KV cache (no chunk cached) for ``batch_size`` samples."""
        ...

    def step(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: Optional[torch.Tensor],
             chunk_partition: Sequence[int], cache: Any) -> torch.Tensor:
        """One flow-map evaluation of chunk ``k = len(chunk_partition) - 1`` against the cache.

        Args:
            z: noisy latents of chunk ``k``, ``[b, cp[k], c, h, w]``.
            t, r: float32 ``[b, cp[k]]`` on the 0..1000 scale, ``t > r`` (per frame; equal within a chunk).
            text: prompt embedding ``[b, L, d]``.
            chunk_partition: ``cp[:k + 1]`` (the cached chunks plus the current one).
            cache: the cache holding chunks ``0..k-1`` (from :meth:`prefill`, or :meth:`new_cache` for k = 0).

        Returns:
            ``u`` ``[b, cp[k], c, h, w]``: the average velocity on ``[r, t]`` per unit of t in [0, 1], so that
            the flow map is ``f(z, t, r) = z - (t - r) / 1000 * u`` (docs/design/far.md 1.7, diffusers
            ``_forward_inference``).
        """
        ...

    def prefill(self, prefix: torch.Tensor, text: Optional[torch.Tensor], chunk_partition: Sequence[int],
                cache: Any) -> Any:
        """Encode the clean chunks ``0..j`` (``chunk_partition = cp[:j + 1]``) at ``t = r = 0``.

        Args:
            prefix: clean latents ``[b, sum(cp[:j + 1]), c, h, w]``.
            text: prompt embedding ``[b, L, d]``.
            chunk_partition: ``cp[:j + 1]``.
            cache: the cache holding chunks ``0..j-1``.

        Returns:
            A **new** cache holding chunks ``0..j`` (the old one is left as it was).
        """
        ...


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def check_chunk_partition(chunk_partition: Sequence[int], num_frames: int) -> Tuple[int, ...]:
    """Validate a chunk partition of ``num_frames`` latent frames.

    Args:
        chunk_partition: frames per chunk, e.g. ``(1, 3, 3, 3, 3, 3, 3, 2)`` for 21 latent frames.
        num_frames: number of latent frames ``F`` it must cover.

    Returns:
        The partition as a tuple of ints.

    Raises:
        ValueError: an empty partition, a non-integer or non-positive entry, or a sum other than ``num_frames``
            (the message names the values).
    """
    cp = tuple(chunk_partition)
    if not cp or not all(_is_int(n) and n >= 1 for n in cp):
        raise ValueError(f"chunk_partition must be a non-empty sequence of positive ints, got {cp!r}")
    if sum(cp) != num_frames:
        raise ValueError(f"chunk_partition {list(cp)} sums to {sum(cp)}, expected num_frames = {num_frames}")
    return cp


def condition_chunks(chunk_partition: Sequence[int], num_condition_frames: int) -> int:
    """Number of context chunks of an I2V / V2V prefix of ``T = num_condition_frames`` latent frames.

    ``T`` must be chunk-aligned: ``T == sum(cp[:i])`` for some ``i >= 1`` (then ``i`` is returned), or 0
    (text-to-video, returns 0). diffusers / the reference take ``n_ctx = min{i : sum(cp[:i]) >= T}`` and
    silently leave the rest of the last context chunk at zeros (cached and output as zeros); we reject
    such prefixes instead (docs/design/far.md 3 and 7.7).

    Args:
        chunk_partition: the (validated) chunk partition.
        num_condition_frames: ``T >= 0``.

    Returns:
        ``n_ctx`` in ``[0, len(cp)]``.

    Raises:
        ValueError: ``T`` is negative, not an int, or not chunk-aligned (the message lists the aligned lengths).
    """
    cp = tuple(chunk_partition)
    T = num_condition_frames
    if not _is_int(T) or T < 0:
        raise ValueError(f"num_condition_frames must be an int >= 0, got {T!r}")
    if T == 0:
        return 0
    ends = [sum(cp[:i + 1]) for i in range(len(cp))]
    if T not in ends:
        raise ValueError(f"a conditioning prefix of {T} latent frames is not chunk-aligned for chunk_partition "
                         f"{list(cp)}: expected one of {ends} (the chunk ends)")
    return ends.index(T) + 1


def chunk_schedule(times: torch.Tensor) -> List[Tuple[float, float]]:
    """One chunk's flow-map steps ``(t, r)`` on a grid, with diffusers' skip rule for ``t == r``.

    For ``i = 0..M-1`` the step ``(times[i], times[i + 1])`` is kept unless ``1000 t == 1000 r`` in float64
    (diffusers ``AnyFlowFARPipeline``: ``t = scheduler.timesteps[i]``, ``r = scheduler.sigmas[i + 1] * 1000``,
    ``if t == r: continue``). On the standard grid ``flow_map_time_grid(N, shift)`` (strictly decreasing) no
    step is skipped and this is the ``N`` steps of :class:`~megatron_anyflow.anyflow.sampler.FlowMapEulerSampler`.

    Args:
        times: float ``[M + 1]`` grid in ``[0, 1]``, non-increasing (e.g. ``flow_map_time_grid(N, shift)``,
            which equals diffusers' ``FlowMapEulerDiscreteScheduler(shift=s).set_timesteps(N).sigmas``).

    Returns:
        list of ``(t, r)`` Python floats (float64) in ``[0, 1]``, ``t > r``.

    Raises:
        ValueError: ``times`` is not a 1-D floating tensor of at least 2 values, leaves ``[0, 1]``, or increases.
    """
    if not torch.is_tensor(times) or times.dim() != 1 or times.numel() < 2 or not times.is_floating_point():
        raise ValueError(f"times must be a 1-D floating tensor of >= 2 values, got "
                         f"{tuple(times.shape) if torch.is_tensor(times) else type(times).__name__}")
    grid = times.detach().to(device="cpu", dtype=torch.float64).tolist()
    if any(not (0.0 <= t <= 1.0) for t in grid) or any(a < b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"times must be non-increasing values in [0, 1], got {grid}")
    scale = float(NUM_TRAIN_TIMESTEPS)
    return [(t, r) for t, r in zip(grid, grid[1:]) if t * scale != r * scale]


def _condition_prefix(condition: Optional[torch.Tensor], noise: torch.Tensor, cp: Tuple[int, ...]
                      ) -> Tuple[int, Optional[torch.Tensor]]:
    """``(n_ctx, condition cast to noise's dtype and device)``; validates shape and chunk alignment."""
    if condition is None:
        return 0, None
    _check_latent("condition", condition)
    if condition.shape[0] != noise.shape[0] or condition.shape[2:] != noise.shape[2:]:
        raise ValueError(f"condition must be [b, T, c, h, w] matching noise {tuple(noise.shape)} in b, c, h, w; "
                         f"got {tuple(condition.shape)}")
    n_ctx = condition_chunks(cp, condition.shape[1])
    return n_ctx, condition.detach().to(device=noise.device, dtype=noise.dtype)


def _prefill(model: CausalFlowMapModel, chunks: List[torch.Tensor], text, cp: Tuple[int, ...], cache):
    """New cache of the clean prefix ``cat(chunks)`` = chunks ``0..j`` with ``j = len(chunks) - 1``."""
    prefix = torch.cat(chunks, dim=1)
    new_cache = model.prefill(prefix, text, cp[:len(chunks)], cache)
    if new_cache is None:
        raise ValueError("model.prefill returned None: it must return the new cache (functional API; the old "
                         "cache may still be referenced)")
    return new_cache


def _chunk_step(model: CausalFlowMapModel, cp: Tuple[int, ...], cache, z, T, R, text) -> torch.Tensor:
    """``model.step`` of chunk ``k = len(cp) - 1`` with the output shape checked."""
    u = model.step(z, T, R, text, cp, cache)
    _check_output(u, z, f"causal model step of chunk {len(cp) - 1}")
    return u


@torch.no_grad()
def sample_chunked(
    model: CausalFlowMapModel,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    chunk_partition: Sequence[int],
    num_steps: int,
    shift: float = 5.0,
    condition: Optional[torch.Tensor] = None,
    progress: bool = False,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Chunked any-step generation: the ``AnyFlowFARPipeline`` loop with ``use_kv_cache=True``
    (docs/design/far.md 1.7, 3).

    With ``n = len(cp)`` chunks, ``n_ctx = condition_chunks(cp, T)`` context chunks and
    ``steps = chunk_schedule(flow_map_time_grid(N, shift))``, for ``k = 0..n-1``:

    * ``k < n_ctx``: ``x_k = condition[:, s_k:e_k]`` (copied, never denoised; its noise slice is unused);
    * otherwise ``z = noise[:, s_k:e_k]`` and for each ``(t, r)`` in ``steps``:
      ``u = model.step(z, T, R, text, cp[:k + 1], cache)`` with ``T, R = to_model_scale(t, r)`` expanded to
      float32 ``[b, cp[k]]``, then ``z <- z - (t - r) u`` formed in float64 and rounded once to the state's
      dtype (diffusers ``FlowMapEulerDiscreteScheduler.step``, bitwise); ``x_k = z``;
    * if ``k < n - 1``: ``cache = model.prefill(x[:, :e_k], text, cp[:k + 1], cache)`` (also after context
      chunks; the prefix is a fresh tensor, never written afterwards).

    Model calls: ``N (n - n_ctx)`` steps and ``n - 1`` prefills. The same noise draw as diffusers
    (``latents`` permuted to ``[b, F, c, h, w]``) gives the same chunk noise slices.

    Args:
        model: a :class:`CausalFlowMapModel`.
        noise: ``[b, F, c, h, w]`` state at t = 1 for all ``F = sum(cp)`` frames; its dtype is the state's
            dtype (float32 recommended). Not modified.
        text: prompt embedding ``[b, L, d]`` (passed through; may be None).
        chunk_partition: frames per chunk, summing to ``F``.
        num_steps: ``N >= 1`` flow-map steps per chunk (any step: each chunk uses the full N-step grid).
        shift: time shift ``s > 0`` of the grid (5.0 for AnyFlow; diffusers' scheduler defaults to 1.0).
        condition: optional clean prefix ``[b, T, c, h, w]`` with a chunk-aligned ``T`` (I2V: ``T = cp[0]``,
            V2V: ``T = sum(cp[:i])``); cast to ``noise``'s dtype.
        progress: tqdm progress bar over chunks.
        callback: ``callback(chunk, step, t, r, z)`` after every model step (``t, r`` in [0, 1], ``z`` the
            chunk's new state ``[b, cp[k], c, h, w]``); its return value is ignored.

    Returns:
        ``x0`` ``[b, F, c, h, w]`` in ``noise``'s dtype and device.

    Raises:
        ValueError: bad ``noise`` / ``condition`` shapes, a partition that does not sum to ``F``, a
            misaligned ``condition`` (the message lists the aligned lengths), bad ``num_steps`` / ``shift``,
            a model output of the wrong shape, or a ``prefill`` that returns None.

    Runs under ``torch.no_grad()``.
    """
    _check_latent("noise", noise)
    b, F = noise.shape[:2]
    cp = check_chunk_partition(chunk_partition, F)
    n_ctx, condition = _condition_prefix(condition, noise, cp)
    steps = chunk_schedule(flow_map_time_grid(num_steps, shift))
    chunks: List[torch.Tensor] = []
    cache = model.new_cache(b)
    for k in _progress(range(len(cp)), progress, "FAR chunks"):
        s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
        if k < n_ctx:
            z = condition[:, s_k:e_k].clone()
        else:
            z = noise[:, s_k:e_k].clone()
            for i, (t, r) in enumerate(steps):
                T = to_model_scale(t).to(noise.device).expand(b, cp[k]).clone()
                R = to_model_scale(r).to(noise.device).expand(b, cp[k]).clone()
                u = _chunk_step(model, cp[:k + 1], cache, z, T, R, text)
                z = _euler_update(z, t - r, u)
                if callback is not None:
                    callback(k, i, t, r, z)
        chunks.append(z)
        if k < len(cp) - 1:
            cache = _prefill(model, chunks, text, cp, cache)
    return torch.cat(chunks, dim=1)


def causal_flow_map_backward_simulation(
    model: CausalFlowMapModel,
    noise: torch.Tensor,
    text: Optional[torch.Tensor],
    chunk_partition: Sequence[int],
    plan: SimulationPlan,
    grad_through: str = "chain",
    condition: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Stage-2 causal backward simulation (docs/design/far.md 2.2; reference
    ``FAR_Wan_AnyFlow_OnPolicy_Trainer.training_rollout``).

    For every chunk ``k`` (in order), on the chunk's noise slice ``noise[:, s_k:e_k]``: AnyFlow's three-segment
    rollout ``1 -> t_k -> t_{k+1} -> 0`` of
    :func:`~megatron_anyflow.anyflow.distill.flow_map_backward_simulation` with the **same** plan ``(N, k)``
    for every chunk (paper Alg. 2), each call ``model.step(z, T, R, text, cp[:k + 1], cache)``; then, except
    after the last chunk, ``cache = model.prefill(x[:, :e_k], text, cp[:k + 1], cache)`` under
    ``torch.no_grad`` on the **detached** prefix. So the history enters chunk ``k`` only through a cache
    without graph: the gradient of chunk ``k``'s output reaches chunk ``k``'s own (<= 3) calls only
    (``grad_through`` as in the bidirectional rollout, within the chunk).

    An exact causal flow map gives, by the composition property, the same sample for every ``(N, k)``, equal to
    :func:`sample_chunked`'s (docs/design/far.md 5.2). With ``N == 1`` the single step ``1 -> 0`` is bitwise
    :func:`sample_chunked` with ``num_steps = 1``.

    The reference rollout is text-to-video only; ``condition`` (chunk-aligned, as in :func:`sample_chunked`) is
    an extension: its chunks are copied (detached) and prefilled, with no generator call.

    Args:
        model: a :class:`CausalFlowMapModel` (the generator; its parameters get the gradient).
        noise: ``[b, F, c, h, w]`` at t = 1 (its dtype is the rollout's dtype).
        text: prompt embedding ``[b, L, d]``.
        chunk_partition: frames per chunk, summing to ``F``.
        plan: :class:`~megatron_anyflow.anyflow.distill.SimulationPlan` (``N``, ``k``, grid ``times`` in [0, 1]),
            shared by all chunks (and all ranks).
        grad_through: ``"chain"`` (reference) or ``"no_grad_prefix"``, per chunk.
        condition: optional clean prefix ``[b, T, c, h, w]``, ``T`` chunk-aligned.

    Returns:
        ``(x0, info)``: ``x0`` ``[b, F, c, h, w]`` in ``noise``'s dtype (with graph when grad is enabled);
        ``info``: ``N``, ``k``, ``t_k``, ``t_next`` (floats in [0, 1]), ``context_chunks`` (``n_ctx``),
        ``chunks`` (per chunk: the info of ``flow_map_backward_simulation``, or None for a context chunk),
        ``calls_per_chunk`` (list of ints, 0 for context chunks), ``calls`` (total step calls),
        ``prefills`` (``n - 1``).

    Raises:
        ValueError: bad ``noise`` / ``condition`` / partition (as :func:`sample_chunked`), unknown
            ``grad_through``, a model output of the wrong shape, or a ``prefill`` that returns None.
    """
    _check_latent("noise", noise)
    if grad_through not in GRAD_THROUGH:
        raise ValueError(f"grad_through must be one of {GRAD_THROUGH}, got {grad_through!r}")
    b, F = noise.shape[:2]
    cp = check_chunk_partition(chunk_partition, F)
    n_ctx, condition = _condition_prefix(condition, noise, cp)
    chunks: List[torch.Tensor] = []
    chunk_infos: List[Optional[Dict[str, object]]] = []
    prefills = 0
    cache = model.new_cache(b)
    for k in range(len(cp)):
        s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
        if k < n_ctx:
            x_k, info_k = condition[:, s_k:e_k].clone(), None
        else:
            chunk_model = functools.partial(_chunk_step, model, cp[:k + 1], cache)
            x_k, info_k = flow_map_backward_simulation(chunk_model, noise[:, s_k:e_k], text, plan,
                                                       grad_through=grad_through)
        chunks.append(x_k)
        chunk_infos.append(info_k)
        if k < len(cp) - 1:
            with torch.no_grad():
                cache = _prefill(model, [c.detach() for c in chunks], text, cp, cache)
            prefills += 1
    calls_per_chunk = [0 if info is None else int(info["calls"]) for info in chunk_infos]
    info = {
        "N": plan.N, "k": plan.k, "t_k": plan.t_k, "t_next": plan.t_next, "context_chunks": n_ctx,
        "chunks": chunk_infos, "calls_per_chunk": calls_per_chunk, "calls": sum(calls_per_chunk),
        "prefills": prefills,
    }
    return torch.cat(chunks, dim=1), info
