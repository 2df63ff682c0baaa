"""``AnyFlowTwoExpertPipeline``: diffusers' ``AnyFlowPipeline`` for a two-expert flow map (Wan2.2 A14B).

diffusers' ``AnyFlowPipeline`` holds one ``transformer``; its ``WanPipeline`` holds two (``transformer`` for
timesteps ``>= boundary_ratio * 1000``, ``transformer_2`` below) but samples the teacher's ODE, not a flow
map. What a two-expert AnyFlow student needs and neither class has: the second transformer, the boundary
in the pipeline config, and a time grid on which no flow-map jump crosses the boundary (each expert
learned only the jumps inside its own range). This class adds exactly that to ``AnyFlowPipeline``:

* the grid is the flow-map grid of N steps with the interior point nearest the boundary ``b`` moved onto
  it (N = 1: the jump 1 -> 0 split at ``b``, two evaluations), as the training library's
  ``anyflow.timesteps.two_expert_time_grid``;
* each jump t -> r goes to ``transformer`` when ``r >= b`` (it lies in ``[b, 1]``) and to ``transformer_2``
  when ``t <= b``; a crossing jump (a user's own ``sigmas`` / ``timesteps``) raises. This is the library's
  ``anyflow.sampler.route_experts`` rule.

Wan2.2 I2V-A14B experts (``in_channels`` 36, ``out_channels`` 16) read the image through 20 input channels, as
diffusers' ``WanImageToVideoPipeline`` feeds them: ``__call__(image=...)`` builds the condition once (a 4-channel
mask, 1 on latent frame 0, and the normalised VAE latents, posterior mode, of the video [image, 0, ..., 0]) and
every expert call reads ``cat([latents, condition])`` on the channel axis, the same condition for both CFG
halves; the latents and the scheduler stay 16-channel. The training library's counterpart is
``data.channel_condition``.

``tools/convert_to_hf.py --expert-2`` copies this file, unchanged, into the export as
``pipeline_anyflow_two_expert.py`` and names it in ``model_index.json`` (``_class_name`` =
``["pipeline_anyflow_two_expert", "AnyFlowTwoExpertPipeline"]``), so that

    DiffusionPipeline.from_pretrained(export, trust_remote_code=True)

loads it as is (diffusers' custom-pipeline mechanism; ``custom_pipeline=`` the file also works). It
imports only torch and diffusers: a user needs nothing of this project.
"""

from typing import List, Optional

import torch
from diffusers import AnyFlowPipeline

__all__ = ["AnyFlowTwoExpertPipeline"]

# Timestep units (0..1000). The scheduler rebuilds the snapped point as shift(unshift(b)) in float64, one
# rounding away from b * 1000 (~1e-13); any real grid spacing is > 1e-1 timestep units.
_ROUTE_TOL = 1e-6


class _ExpertRouter(torch.nn.Module):
    """Stands in for ``transformer`` during a call: each forward goes to one expert (module docstring)."""

    def __init__(self, high, low, boundary_timestep: float, condition: Optional[torch.Tensor] = None):
        super().__init__()
        self.high, self.low, self.boundary = high, low, float(boundary_timestep)
        self.condition = condition  # [B, F, 20, h, w] (I2V-A14B) or None

    @property
    def dtype(self):
        return self.high.dtype

    @property
    def device(self):
        return self.high.device

    @property
    def config(self):
        return self.high.config

    def forward(self, *, timestep, r_timestep, **kwargs):
        if self.condition is not None:  # CFG stacks [negative, positive] copies of the batch: one condition each
            x, y = kwargs["hidden_states"], self.condition
            y = y.repeat(x.shape[0] // y.shape[0], 1, 1, 1, 1).to(device=x.device, dtype=x.dtype)
            kwargs["hidden_states"] = torch.cat([x, y], dim=2)
        b = self.boundary
        if bool((r_timestep >= b - _ROUTE_TOL).all()):
            return self.high(timestep=timestep, r_timestep=r_timestep, **kwargs)
        if bool((timestep <= b + _ROUTE_TOL).all()):
            return self.low(timestep=timestep, r_timestep=r_timestep, **kwargs)
        raise ValueError(
            f"a flow-map jump crosses the expert boundary {b:g} (timesteps {float(timestep.max()):g} -> "
            f"{float(r_timestep.min()):g}): neither expert learned it; call without sigmas / timesteps (the "
            "pipeline's grid puts the boundary on the grid) or include the boundary in your schedule")


class AnyFlowTwoExpertPipeline(AnyFlowPipeline):
    """``AnyFlowPipeline`` with a high-noise ``transformer`` and a low-noise ``transformer_2`` split at
    ``boundary_ratio`` (module docstring).

    Args:
        tokenizer, text_encoder, vae, scheduler: as ``AnyFlowPipeline``.
        transformer: ``AnyFlowTransformer3DModel``, the high-noise expert (times ``[b, 1]``).
        transformer_2: ``AnyFlowTransformer3DModel``, the low-noise expert (times ``[0, b]``).
        boundary_ratio: ``b`` in (0, 1) (0.875 Wan2.2 T2V-A14B, 0.9 I2V-A14B).

    I2V-A14B experts (``in_channels > out_channels``) need ``image`` at the call (module docstring).

    Raises:
        ValueError: ``boundary_ratio`` missing or outside (0, 1), or ``transformer_2`` missing.
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    # a component with a default (as WanPipeline's): without this, diffusers passes the index entry, not the model
    _optional_components = ["transformer_2"]

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler, transformer_2=None,
                 boundary_ratio: Optional[float] = None):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                         scheduler=scheduler)
        if transformer_2 is None:
            raise ValueError("AnyFlowTwoExpertPipeline needs transformer_2 (the low-noise expert)")
        if boundary_ratio is None or not 0.0 < float(boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio={boundary_ratio!r}; expected a number in (0, 1) (Wan2.2 A14B: 0.875 "
                             "T2V, 0.9 I2V)")
        self.register_modules(transformer_2=transformer_2)
        self.register_to_config(boundary_ratio=float(boundary_ratio))

    def two_expert_sigmas(self, num_inference_steps: int) -> List[float]:
        """The unshifted sigmas (the scheduler applies its shift) of the N-step grid with ``b`` on it: the
        default ``linspace(1, 0, N + 1)[:-1]`` with the point whose shifted value is nearest ``b`` (among
        the interior ones) replaced by ``unshift(b)``; ``[1, unshift(b)]`` for N = 1."""
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        s, b = float(self.scheduler.config.shift), float(self.config.boundary_ratio)
        b_unshifted = b / (s - (s - 1.0) * b)  # the inverse of the scheduler's shift s x / (1 + (s - 1) x)
        if n == 1:
            return [1.0, b_unshifted]
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        shifted = s * base / (1.0 + (s - 1.0) * base)
        i = 1 + int(torch.argmin((shifted[1:-1] - b).abs()))
        sigmas = base[:-1].tolist()
        sigmas[i] = b_unshifted
        return sigmas

    @property
    def condition_channels(self) -> int:
        """Channels the experts read besides the latents: 20 for I2V-A14B (the image condition), else 0."""
        cfg = self.transformer.config
        return int(cfg.in_channels) - int(cfg.out_channels or cfg.in_channels)

    def prepare_latents(self, batch_size, num_channels_latents, *args, **kwargs):
        # AnyFlowPipeline sizes the noise by the transformer's in_channels; an I2V expert writes out_channels
        return super().prepare_latents(batch_size, num_channels_latents - self.condition_channels, *args, **kwargs)

    @torch.no_grad()
    def image_condition(self, image, height: int, width: int, num_frames: int) -> torch.Tensor:
        """The I2V-A14B condition ``[B, F, 4 + z_dim, h, w]`` (frame-major, float32) of ``image`` (anything the
        video processor takes: PIL, [B, 3, H, W] tensors in [0, 1], ...), as ``WanImageToVideoPipeline.
        prepare_latents`` builds it: mask (1 on latent frame 0) and the normalised VAE latents (posterior mode) of
        [image, 0, ..., 0] of ``num_frames`` frames."""
        device = self._execution_device
        image = self.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        b = image.shape[0]
        video = torch.cat([image[:, :, None], image.new_zeros(b, image.shape[1], num_frames - 1, height, width)], 2)
        moments = self.vae._encode(video.to(self.vae.dtype))
        mu = torch.chunk(moments, 2, dim=1)[0].float()  # the posterior mode, [B, z, F, h, w]
        mean = torch.tensor(self.vae.config.latents_mean, device=mu.device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std, device=mu.device).view(1, -1, 1, 1, 1)
        latents = ((mu - mean) * inv_std).permute(0, 2, 1, 3, 4)  # [B, F, z, h, w]
        mask = torch.zeros(b, latents.shape[1], 4, *latents.shape[3:], device=latents.device)
        mask[:, 0] = 1
        return torch.cat([mask, latents], dim=2)

    def __call__(self, *args, num_inference_steps: int = 50, sigmas=None, timesteps=None, image=None, **kwargs):
        """``AnyFlowPipeline.__call__`` on the two-expert grid (``num_inference_steps`` = N; N = 1 runs two
        evaluations), each jump routed to its expert. Own ``sigmas`` / ``timesteps`` are used as given and
        must not cross the boundary (ValueError). ``image``: the first frame, for I2V-A14B experts (required
        there, refused otherwise: image-to-video of other experts is ``video`` / ``video_latents``)."""
        cc = self.condition_channels
        if cc and image is None:
            raise ValueError(f"the experts read a {cc}-channel image condition (Wan2.2 I2V-A14B): pass image=")
        if not cc and image is not None:
            raise ValueError("image= is for Wan2.2 I2V-A14B experts; these take a clean first frame as video= / "
                             "video_latents=")
        condition = None
        if cc:
            condition = self.image_condition(image, kwargs.get("height", 480), kwargs.get("width", 832),
                                             kwargs.get("num_frames", 81))
            if condition.shape[2] != cc:
                raise ValueError(f"the VAE gives a {condition.shape[2]}-channel condition; the experts read {cc}")
        if sigmas is None and timesteps is None:
            sigmas = self.two_expert_sigmas(num_inference_steps)
            num_inference_steps = len(sigmas)
        high = self.transformer
        router = _ExpertRouter(high, self.transformer_2, 1000.0 * float(self.config.boundary_ratio), condition)
        # object.__setattr__: DiffusionPipeline.__setattr__ would rewrite the registered component in the config
        object.__setattr__(self, "transformer", router)
        try:
            return super().__call__(*args, num_inference_steps=num_inference_steps, sigmas=sigmas,
                                    timesteps=timesteps, **kwargs)
        finally:
            object.__setattr__(self, "transformer", high)
