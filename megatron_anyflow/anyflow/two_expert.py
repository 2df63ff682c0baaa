"""A two-expert Wan2.2 A14B model as one module: two `WanModel` experts and the time boundary between them.

Wan2.2 A14B runs ``transformer`` (the high-noise expert) for timesteps ``>= boundary_ratio * 1000`` and
``transformer_2`` (the low-noise expert) below (diffusers' ``WanPipeline``). This project distils each
expert on its own time range (docs/design/anyflow.md 2.1), and stage 2 trains both together: its backward
simulation goes from noise to data and so through both ranges, and its DMD / critic times are drawn per
sample over the whole range. `TwoExpertWanModel` is that pair: ``model(z, T, R, text, adapter=...)``
hands every sample to the expert whose range holds its jump (``T -> R``), runs each expert once on its
samples, and puts the outputs back in the batch order. Both experts stay resident; each has its own LoRA
adapters (parameter names ``high.*`` and ``low.*``).

The routing rule (`jump_ranges`, shared with `anyflow.sampler.route_experts`, which applies it per call) is
applied per sample: a jump lies in the high range when ``R >= B`` and in the low range when ``T <= B``
(``B = to_model_scale(b)``, float32); a single-time call at ``T = R = B`` is the high expert's, as diffusers
routes a timestep equal to the boundary. A jump with ``T > B > R`` belongs to neither and raises: samplers split such jumps at ``b``
(`anyflow.timesteps.two_expert_time_grid`, `anyflow.distill.flow_map_backward_simulation`).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import torch
from torch import nn

from .timesteps import to_model_scale

__all__ = ["TwoExpertWanModel", "EXPERTS", "jump_ranges", "load_stage2_pair", "load_expert_pair", "one_resident"]

#: the experts' names, in diffusers' order (``transformer``, ``transformer_2``)
EXPERTS = ("high", "low")


def jump_ranges(T: torch.Tensor, R: torch.Tensor, B: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which expert's range holds each sample's jump ``T -> R``: the routing rule, in one place (used by
    `TwoExpertWanModel` per sample and `anyflow.sampler.route_experts` per call).

    A jump lies in the high range when ``R >= B`` on every frame / token and in the low range when ``T <= B``
    on every one (``B = to_model_scale(b)``, float32 on 0..1000). A single-time call at ``T = R = B`` lies in
    both (its caller gives it to the high expert, as diffusers routes a timestep equal to the boundary), and a
    jump with ``T > B > R`` somewhere in neither.

    Args:
        T, R: float32 ``[b, f]`` (or ``[b, S]`` per token) times on the 0..1000 scale, ``R <= T``.
        B: the boundary on the same scale.

    Returns:
        ``(high, low)``: bool ``[b]`` each.
    """
    T2, R2 = T.reshape(T.shape[0], -1), R.reshape(R.shape[0], -1)
    return (R2 >= B).all(dim=1), (T2 <= B).all(dim=1)


class TwoExpertWanModel(nn.Module):
    """Two `WanModel` experts routed per sample by time (module docstring).

    Args:
        high: the high-noise expert (diffusers' ``transformer``; serves t in ``[b, 1]``).
        low: the low-noise expert (``transformer_2``; t in ``[0, b]``).
        boundary: ``b = boundary_ratio`` in (0, 1), on the [0, 1] time scale.

    Attributes:
        config: the high expert's `WanConfig` (both experts share the architecture; checked).

    Raises:
        ValueError: ``boundary`` not in (0, 1), or experts of different architectures (``WanConfig.arch_dict``
            other than ``expert``).
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        b = float(boundary)
        if not 0.0 < b < 1.0:
            raise ValueError(f"boundary must lie in (0, 1), got {boundary!r}")
        ah, al = high.config.arch_dict(), low.config.arch_dict()
        diff = sorted(k for k in set(ah) | set(al) if k != "expert" and ah.get(k) != al.get(k))
        if diff:
            raise ValueError(f"the two experts must share one architecture; they differ in {diff}: "
                             f"{[(k, ah.get(k), al.get(k)) for k in diff]}")
        self.high, self.low = high, low
        self.boundary = b
        self._B = float(to_model_scale(b))

    @property
    def config(self):
        return self.high.config

    @property
    def dtype(self) -> torch.dtype:
        """The experts' compute dtype (`WanModel.dtype`)."""
        return self.high.dtype

    def experts(self) -> Iterator[Tuple[str, nn.Module]]:
        """``("high", model), ("low", model)``."""
        yield "high", self.high
        yield "low", self.low

    def expert_mask(self, T: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Bool ``[b]``: True where a sample's jump is the high expert's.

        Args:
            T, R: float32 ``[b, f]`` (or ``[b, S]`` per token) times on the 0..1000 scale, ``R <= T``.

        Raises:
            ValueError: a sample whose jump crosses the boundary (``T > B > R`` on some frame), or whose frames
                lie in both ranges (the values named).
        """
        B = self._B
        T2, R2 = T.reshape(T.shape[0], -1), R.reshape(R.shape[0], -1)
        high, low = jump_ranges(T, R, B)
        bad = ~(high | low)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"sample {i}'s jump crosses the expert boundary {B:g} (model scale): T in "
                             f"[{float(T2[i].min()):g}, {float(T2[i].max()):g}], R in [{float(R2[i].min()):g}, "
                             f"{float(R2[i].max()):g}]; no single expert knows it (split it at the boundary)")
        return high  # T = R = B is in both ranges: the high expert's, as diffusers routes t = boundary

    def forward(self, latents: torch.Tensor, t: torch.Tensor, r, text, *args, **kwargs):
        """``WanModel.forward`` of each sample's expert (module docstring); ``r = None`` (a single-time call)
        routes by ``t``. Other arguments go to the experts as given (``text`` and ``latents`` row-split).

        Returns the experts' outputs in batch order: ``[b, f, c, h, w]``. A batch wholly in one range is one
        call of that expert with the caller's tensors (bitwise that expert's output). The routing reads the
        times on the host (one synchronisation per call, as `route_experts`): the split needs the row indices.
        Every TP / CP rank of a sample holds the same times, so all take the same branch and their collectives
        stay in step.
        """
        high = self.expert_mask(t, t if r is None else r)
        if bool(high.all()):
            return self.high(latents, t, r, text, *args, **kwargs)
        if not bool(high.any()):
            return self.low(latents, t, r, text, *args, **kwargs)
        if args or any(k not in ("adapter",) for k in kwargs):
            raise ValueError(f"a batch split between the experts takes (latents, t, r, text, adapter=) only; got "
                             f"{len(args)} more positional and {sorted(k for k in kwargs if k != 'adapter')}")
        ih, il = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)

        def rows(x, idx):
            return None if x is None else x.index_select(0, idx)

        oh = self.high(rows(latents, ih), rows(t, ih), rows(r, ih), rows(text, ih), **kwargs)
        ol = self.low(rows(latents, il), rows(t, il), rows(r, il), rows(text, il), **kwargs)
        # back to batch order through the inverse permutation (differentiable into both experts)
        return torch.cat([oh, ol]).index_select(0, torch.argsort(torch.cat([ih, il])))

    def describe_kernels(self, device=None) -> str:
        return "two experts (Wan2.2 A14B, boundary %g): %s" % (self.boundary, self.high.describe_kernels(device))

    def compile_blocks(self, *args, **kwargs) -> None:
        for _, m in self.experts():
            m.compile_blocks(*args, **kwargs)


def load_stage2_pair(path: str, adapter: str = "generator", ema: bool = False, **config_overrides) -> TwoExpertWanModel:
    """Both experts of a two-expert stage-2 checkpoint (``anyflow_meta.json`` ``experts``), each with ``adapter``
    merged (`checkpoint.model_io.load_for_inference`), as one `TwoExpertWanModel` in eval mode.

    Raises:
        ValueError: ``path`` holds one model (no ``experts`` in its metadata).
        KeyError / CheckpointError: as `load_for_inference` (a missing adapter or tensor, named).
    """
    from megatron_anyflow.checkpoint import store as ckpt
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    if not meta.get("experts"):
        raise ValueError(f"{d} holds one model, not a two-expert stage-2 run (no 'experts' in anyflow_meta.json)")
    models = [load_for_inference(d, adapter=adapter, ema=ema, expert=e, **config_overrides) for e in EXPERTS]
    return TwoExpertWanModel(*models, float(meta["boundary_ratio"])).eval()


def load_expert_pair(path: str, path_2: str, load: Callable[[str], nn.Module]) -> TwoExpertWanModel:
    """Two one-expert checkpoints (e.g. the converted bases, the teacher of a two-expert model) as one
    `TwoExpertWanModel`: ``load(path)`` gives each model, the roles and the boundary come from each checkpoint's
    ``wan_config`` (``expert``, ``boundary_ratio``), so either order works.

    Raises:
        ValueError: checkpoints that are not one 'high' and one 'low' expert, or boundaries that differ (the paths
            and the fields named; `checkpoint.model_io.expert_pair`, whose messages call them --teacher /
            --teacher-2).
    """
    from megatron_anyflow.checkpoint.model_io import expert_pair

    pair, boundary = expert_pair(("--teacher", path), ("--teacher-2", path_2))
    return TwoExpertWanModel(load(pair["high"][0]), load(pair["low"][0]), boundary).eval()


def one_resident(models: Dict[str, nn.Module], device) -> Dict[str, Callable]:
    """The models as callables of which only the one being called is on ``device``; the others wait in host memory.

    Two float32 14B experts are 2 x 57 GB, more than one 80 GB GPU holds, and an evaluation holds four (the
    teacher's pair and the student's). A sampler calls one expert for a stretch of steps and then the other, so
    keeping the rest in host memory costs two moves per rollout (against N forwards of a 14B). On the CPU
    nothing moves and the models themselves are returned.

    Args:
        models: name -> ``torch.nn.Module`` (anywhere; all go to host memory first when ``device`` is not the CPU).
        device: the device the called model runs on.

    Returns:
        name -> ``fn(*args, **kwargs)``: calls its model after moving it onto ``device`` and the previous one off
        it, when needed.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return {k: m.to(device) for k, m in models.items()}
    models = {k: m.to("cpu") for k, m in models.items()}
    on = [None]  # the name of the model now on the device

    def resident(name):
        def fn(*args, **kwargs):
            if on[0] != name:
                if on[0] is not None:
                    models[on[0]].to("cpu")
                models[name].to(device)
                on[0] = name
            return models[name](*args, **kwargs)
        return fn

    return {k: resident(k) for k in models}
