"""Image conditioning by channel concatenation: the Wan2.2 I2V-A14B experts' 36-channel input.

A Wan2.2 I2V-A14B expert (``in_channels = 36``, ``out_channels = 16``) reads, at every call, the 16-channel
noisy latents ``z`` followed by a 20-channel **condition** ``y`` that is fixed for the whole sampling run, is
the same for the conditional and the unconditional CFG branch, and is never noised::

    model input = cat([z, y], channel axis)                 # [b, f, 16 + 20, h, w]
    y           = cat([mask, c], channel axis)              # [b, f, 4 + 16, h, w]

* ``c`` [b, f, 16, h, w]: the normalised VAE latents (posterior mode, ``(z - latents_mean) / latents_std``)
  of the pixel video ``[image, 0, ..., 0]``: the condition image as frame 0, zeros for the other
  ``num_frames - 1 = 4 (f - 1)`` frames.
* ``mask`` [b, f, 4, h, w]: which pixel frames are given (1 on frame 0, 0 elsewhere), folded onto the latent
  frames by the VAE's 4x temporal compression with frame 0 repeated 4 times (as the VAE's causal first
  latent frame covers one pixel frame): all four channels of latent frame 0 are 1, every later frame is 0.

The model's output has ``out_channels = 16``: a velocity (or an average velocity) of ``z`` alone, so a sampler's
state and update stay 16-channel and only the model call sees ``y``. Source: diffusers
``WanImageToVideoPipeline.prepare_latents`` and its denoising loop (``boundary_ratio`` set, ``expand_timesteps``
False: ``latent_model_input = torch.cat([latents, condition], dim=1)``), i.e. Wan2.2's ``i2v`` task; tested
equal to that pipeline in tests/test_channel_condition.py.

This is a different image-to-video mechanism from ``--i2v-prob`` / ``condition_frames`` (Wan2.1 T2V and Wan2.2
TI2V-5B: a clean latent frame 0 held at t = 0): here latent frame 0 is noised and generated like every other
frame, and the image reaches the model only through ``y``.

Layouts are frame-major as everywhere in this project: ``[b, f, c, h, w]``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["condition_channels", "i2v_condition_mask", "i2v_condition", "encode_i2v_condition",
           "with_channel_condition", "check_channel_condition"]

MASK_CHANNELS = 4  # the Wan VAE's temporal compression: one mask channel per pixel frame of a latent frame


def condition_channels(config) -> int:
    """Channels of the condition ``y`` a model reads besides its latents: ``in_channels - out_channels`` (20 for
    Wan2.2 I2V-A14B; 0 for Wan2.1, T2V-A14B and TI2V-5B, whose input is the latents alone).

    Raises:
        ValueError: ``in_channels < out_channels`` (no Wan model has that; the values named).
    """
    extra = int(config.in_channels) - int(config.out_channels)
    if extra < 0:
        raise ValueError(f"in_channels={config.in_channels} < out_channels={config.out_channels}: a model reads its "
                         "latents plus an optional condition, never fewer channels than it writes")
    return extra


def i2v_condition_mask(b: int, f: int, h: int, w: int, dtype: torch.dtype = torch.float32,
                       device=None) -> torch.Tensor:
    """The given-frame mask ``[b, f, 4, h, w]``: 1 on every channel of latent frame 0, 0 on frames 1..f-1
    (module docstring; one given image, no last frame)."""
    m = torch.zeros(b, f, MASK_CHANNELS, h, w, dtype=dtype, device=device)
    m[:, 0] = 1
    return m


def i2v_condition(latents: torch.Tensor) -> torch.Tensor:
    """``y = cat([mask, latents], channel axis)`` ``[b, f, 4 + c, h, w]`` in ``latents``' dtype and device.

    Args:
        latents: ``[b, f, c, h, w]`` normalised VAE latents of the video ``[image, 0, ..., 0]``
            (`encode_i2v_condition`; stored per sample in a dataset's ``condition``).

    Raises:
        ValueError: ``latents`` not 5-D.
    """
    if latents.dim() != 5:
        raise ValueError(f"condition latents must be [b, f, c, h, w]; got shape {tuple(latents.shape)}")
    b, f, _, h, w = latents.shape
    return torch.cat([i2v_condition_mask(b, f, h, w, latents.dtype, latents.device), latents], dim=2)


@torch.no_grad()
def encode_i2v_condition(codec, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The condition ``y`` ``[b, f, 4 + c, h, w]`` (float32) of images, through a VAE codec.

    Args:
        codec: a VAE codec (`data.codecs.WanVAECodec`); its posterior **mode** is used whatever its ``sample``
            setting (diffusers encodes the condition with ``sample_mode="argmax"``).
        image: ``[b, 3, H, W]`` in [-1, 1].
        num_frames: pixel frames of the video to generate (4k + 1); ``f = 1 + (num_frames - 1) / 4``.

    Raises:
        ValueError: ``image`` not ``[b, 3, H, W]``; ``num_frames`` / ``H`` / ``W`` the codec cannot encode
            (the codec's message).
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"condition image must be [b, 3, H, W] in [-1, 1]; got shape {tuple(image.shape)}")
    b, _, H, W = image.shape
    video = torch.cat([image[:, :, None], image.new_zeros(b, 3, int(num_frames) - 1, H, W)], dim=2)
    sample = getattr(codec, "sample", False)
    codec.sample = False
    try:
        c = codec.encode(video)
    finally:
        codec.sample = sample
    return i2v_condition(c.float())


def check_channel_condition(y: Optional[torch.Tensor], z_shape, channels: int, what: str = "condition") -> None:
    """Check a condition ``y`` against latents of shape ``z_shape`` = ``[b, f, c, h, w]`` for a model that reads
    ``channels`` condition channels (`condition_channels`).

    Raises:
        ValueError: ``y`` missing for a model that needs one, given to a model that reads none, or not
            ``[b, f, channels, h, w]`` (the shapes named).
    """
    b, f, _, h, w = (int(v) for v in z_shape)
    if channels == 0:
        if y is not None:
            raise ValueError(f"{what}: this model reads its latents alone (in_channels = out_channels); a "
                             f"channel condition of shape {tuple(y.shape)} was given")
        return
    if y is None:
        raise ValueError(f"{what}: this model reads a {channels}-channel condition besides its latents (Wan2.2 "
                         f"I2V-A14B: the image's VAE latents and mask, in_channels - out_channels = {channels}); "
                         "none was given")
    if tuple(y.shape) != (b, f, channels, h, w):
        raise ValueError(f"{what} must be [b, f, {channels}, h, w] = {[b, f, channels, h, w]} (the latents are "
                         f"{[b, f, int(z_shape[2]), h, w]}); got {list(y.shape)}")


def with_channel_condition(model: Callable, y: torch.Tensor) -> Callable:
    """``model`` with the condition ``y`` ``[b, f, cy, h, w]`` appended to its latents at every call:
    ``model(z, T, R, text, **kw) = inner(cat([z, y], 2), T, R, text, **kw)``.

    Every caller in this project calls its model on the whole micro-batch in a fixed row order (the samplers, the
    stage losses, the two-expert router, which splits rows only inside the wrapped model), so ``y``'s rows are
    ``z``'s. ``y`` is cast to ``z``'s dtype (float32 in, bf16 model: the same cast as the latents').

    Raises (at a call):
        ValueError: ``z`` not ``[b, f, *, h, w]`` of ``y``'s ``b, f, h, w``.
    """

    def conditioned(z, T, R, text, *args, **kwargs):
        if z.dim() != 5 or (z.shape[0], z.shape[1], z.shape[3], z.shape[4]) != (y.shape[0], y.shape[1], y.shape[3],
                                                                                 y.shape[4]):
            raise ValueError(f"latents {tuple(z.shape)} do not match the channel condition {tuple(y.shape)} "
                             "(same b, f, h, w expected)")
        return model(torch.cat([z, y.to(device=z.device, dtype=z.dtype)], dim=2), T, R, text, *args, **kwargs)

    return conditioned
