"""Any-step generation for users: load a student, encode prompts / conditions, sample at several N, decode.

The library behind ``tools/generate.py``. One run, from one noise tensor and one set of text
embeddings, samples the flow-map Euler rollout (:class:`~megatron_anyflow.anyflow.sampler.FlowMapEulerSampler`)
at every requested step count N, so the videos of a run differ only by N.

Layouts and units:
    - latents, noise: float32 ``[n, f, c, h, w]`` (frame-major, the model's layout; diffusers' pipelines
      use ``[n, c, f, h, w]`` and permute);
    - text embeddings: float32 ``[n, L, d]``, zero beyond each prompt's tokens (Wan's convention);
    - video: float32 ``[n, 3, F, H, W]`` in [-1, 1] (channel-major, the codecs' layout);
    - times: the sampler's grid in [0, 1], fed to the model on the 0..1000 scale.

The n samples are ordered prompt-major: prompt 0 video 0, prompt 0 video 1, ..., prompt 1 video 0, ...
The default noise is ``torch.randn([n, f, c, h, w], generator=torch.Generator("cpu").manual_seed(seed))``
(float32, on the CPU, then moved to the device), so a seed reproduces a run on any device.

Image- / video-to-video (condition frames): the first ``fc`` latent frames are held at the clean
condition latents, as the reference and diffusers' ``AnyFlowPipeline`` (``video_latents``) do: replaced
in the model's input at every step and in the final latents, fed with ``timestep = 0`` and with
``r_timestep`` = the step's r (``condition_r="step"``, the default); ``condition_r="zero"`` feeds
``r = 0`` instead. The condition is an image (:func:`image_condition`), a
video or its latents (:func:`video_condition`) or image latents (:func:`image_latents_condition`).

AnyFlow-FAR models (``model.config.far``) sample chunk by chunk with the KV cache
(:func:`~megatron_anyflow.anyflow.causal.sample_chunked`), with any chunk partition whose positive entries
sum to the latent frames (default: the one the checkpoint recorded; :func:`resolve_chunk_partition`). Their
condition frames must be whole chunks (:func:`condition_lengths`); they are copied clean and prefilled into
the KV cache at t = r = 0, never stepped, so ``condition_r`` has no effect on them.

Reproducing a run: :func:`save_run_tensors` writes ``noise``, ``prompt_embeds``, ``condition_frames`` (if
any) and ``steps_<N>`` (the final latents per N) to one safetensors file; ``tools/generate.py --noise FILE
--prompt-embeds FILE`` reads the first two back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler

__all__ = [
    "GenerationError", "NonFiniteSampleError", "LoadedModel", "load_model", "is_diffusers_dir", "resolve_codec", "resolve_text_encoder",
    "load_prompt_embeds", "load_noise", "make_noise", "image_condition", "video_condition", "sample_any_step",
    "save_run_tensors", "check_steps", "video_size", "prompt_embeddings", "initial_noise", "write_videos",
    "is_far", "resolve_chunk_partition", "suggest_chunk_partition", "latent_frames_hint", "condition_lengths",
    "check_condition_frames", "image_latents_condition", "read_image", "image_channel_condition",
]

DEFAULT_SHIFT = 5.0


class GenerationError(ValueError):
    """Bad user input for generation (a missing adapter, a wrong image size, ``--steps 0``, ...)."""


class NonFiniteSampleError(RuntimeError):
    """The model produced NaN / inf while sampling (the message names N, the step and the chunk): the
    weights are unusable (e.g. a diverged run). ``tools/generate.py`` exits 1 and writes no video."""


def _check_finite(name: str, x: Optional[torch.Tensor]) -> None:
    """GenerationError if ``x`` holds NaN / inf (an input that would only produce a NaN video)."""
    if x is None or not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        nan = int(torch.isnan(x).sum())
        raise GenerationError(f"{name} {tuple(x.shape)} holds non-finite values ({nan} NaN, {int(bad.sum()) - nan} "
                              "inf): refusing to sample from it")


# ------------------------------------------------------------------------------------------ model
@dataclass
class LoadedModel:
    """A model ready to sample, with what was learnt about its source.

    Attributes:
        model: `WanModel` in eval mode (adapter merged), on ``device``; a two-expert stage-2 checkpoint gives a
            `anyflow.two_expert.TwoExpertWanModel` of both experts (each merged).
        kind: ``"checkpoint"`` (a training / converted checkpoint) or ``"diffusers"`` (an export).
        path: the resolved checkpoint directory or diffusers transformer directory.
        adapter: the merged adapter (``None``: base / full weights); ema: EMA weights used.
        shift: the time shift recorded by the source (``--time-shift`` of the run, the export's scheduler
            config), else 5.0.
        data_path: the dataset the run trained on (its codec, text encoder and sizes are the defaults).
        pipeline_dir: the diffusers pipeline root when the export is a full pipeline (vae/, text_encoder/).
    """

    model: torch.nn.Module
    kind: str
    path: str
    adapter: Optional[str] = None
    ema: bool = False
    shift: float = DEFAULT_SHIFT
    data_path: Optional[str] = None
    pipeline_dir: Optional[str] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        return int(self.model.config.text_dim)

    @property
    def in_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def condition_channels(self) -> int:
        """Channels of the image condition the model reads besides its latents (20: Wan2.2 I2V-A14B; else 0)."""
        from megatron_anyflow.data.channel_condition import condition_channels

        return condition_channels(self.model.config)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents sampled (``in_channels`` less the condition's: 16 for I2V-A14B)."""
        return self.in_channels - self.condition_channels


def is_diffusers_dir(path: str) -> bool:
    """True for a diffusers transformer directory (``config.json``) or pipeline (``model_index.json`` or
    ``transformer/config.json``); False for a training checkpoint (``anyflow_meta.json`` or a tracker)."""
    from megatron_anyflow.checkpoint.store import META, TRACKER

    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, TRACKER)):
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in
               ("config.json", "model_index.json", os.path.join("transformer", "config.json")))


def _scheduler_shift(*dirs: str) -> Optional[float]:
    for d in dirs:
        p = os.path.join(d, "scheduler_config.json")
        if os.path.isfile(p):
            with open(p) as f:
                return float(json.load(f).get("shift", 1.0))
    return None


def load_model(path: str, adapter: Optional[str] = "auto", ema: bool = False, tensor_model_parallel_size: int = 1,
               context_parallel_size: int = 1, sequence_parallel: bool = False, bf16: bool = False,
               device: Optional[torch.device] = None, attention_impl: str = "auto", compile: bool = False,
               cuda_graphs: bool = False) -> LoadedModel:
    """Load the model to sample from a training checkpoint or a diffusers export.

    Args:
        path: a checkpoint root / directory (any stage; a converted model) or a diffusers transformer or
            pipeline directory (``tools/convert_to_hf.py``).
        adapter: checkpoints only: the LoRA adapter to merge. ``"auto"``: ``generator`` when the checkpoint
            has it (stage 1 / 2), else its only adapter (a LoRA teacher), else none (full weights: a
            converted or fully fine-tuned model); ``None`` / ``"none"``: the base weights. A teacher has no
            delta embedder, so it ignores r and the flow-map sampler is its plain Euler sampler (no CFG).
        ema: merge the adapter's EMA weights (full fine-tuning: the EMA of every weight).
        tensor_model_parallel_size / context_parallel_size / sequence_parallel: the model's layout; the
            process groups must be initialised with the same sizes (`parallel.state.initialize_parallel`).
            Checkpoints reshard on load; a diffusers export is split with `convert.shard_state_dict`.
        bf16: bf16 weights and compute: every block, the activations and the FAR KV cache in bf16; diffusers'
            fp32 modules (time embedders, modulation tables) stay fp32, the timesteps float32 and the sampler's
            update float64 (`FlowMapEulerSampler`).
        attention_impl: the attention kernel of the blocks, the training stack's choices
            (`config.ATTENTION_IMPLS`; ``auto``: cuDNN fused attention on Hopper, else FlashAttention-3, flash-attn,
            PyTorch SDPA; the CPU: SDPA).
        compile: regional ``torch.compile`` of each transformer block (`WanModel.compile_blocks`, as training's
            ``--compile``); the first call of each shape traces.
        cuda_graphs: CUDA only, bidirectional models only: compile the blocks with ``mode="reduce-overhead"``
            (CUDA graphs replay each fixed-shape block call; the step shape does not depend on N).

    The adapter is merged into the base weights once here (``models.lora.merge_adapter``, then the LoRA
    wrappers are removed): sampling runs plain linears, no LoRA branch. There is no guidance pass: AnyFlow
    students are guidance-distilled, so a step is one forward (NFE = N per video, per chunk for FAR).

    Raises:
        GenerationError: an unknown or unusable ``attention_impl``; ``cuda_graphs`` without CUDA or for a FAR
            model; the adapter asked for is not in the checkpoint (names it and the adapters there);
            ``--ema`` without EMA weights in the checkpoint; ``adapter`` / ``ema`` with a diffusers export
            (its adapters were merged at export).
        FileNotFoundError: nothing loadable at ``path``.
    """
    lm = _load_model(path, adapter, ema, tensor_model_parallel_size, context_parallel_size, sequence_parallel, bf16,
                     device, attention_impl, cuda_graphs)
    if cuda_graphs and is_far(lm.model):
        # a FAR prefill returns the KV cache from inside the blocks: CUDA-graph outputs, overwritten by the next
        # replay while the cache still holds them
        raise GenerationError(f"--cuda-graphs does not apply to the AnyFlow-FAR checkpoint {lm.path} (its KV cache "
                              "would hold CUDA-graph outputs that the next replay overwrites); use --compile")
    if compile or cuda_graphs:
        lm.model.compile_blocks(**({"mode": "reduce-overhead"} if cuda_graphs else {}))
    lm.info.update(bf16=bool(bf16), attention_impl=attention_impl, compile=bool(compile or cuda_graphs),
                   cuda_graphs=bool(cuda_graphs))
    return lm


def _load_model(path, adapter, ema, tensor_model_parallel_size, context_parallel_size, sequence_parallel, bf16,
                device, attention_impl, cuda_graphs) -> LoadedModel:
    from megatron_anyflow.models.wan.config import ATTENTION_IMPLS
    from megatron_anyflow.checkpoint import store as ckpt
    from megatron_anyflow.checkpoint.store import read_meta, resolve_checkpoint_dir

    device = device or torch.device("cpu")
    if attention_impl not in ATTENTION_IMPLS:
        raise GenerationError(f"--attention-impl {attention_impl}: expected one of {', '.join(ATTENTION_IMPLS)}")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise GenerationError(f"--cuda-graphs needs a CUDA device; this run is on {device} (drop --cuda-graphs; "
                              "--compile works on the CPU too)")
    from megatron_anyflow.models.wan.layer import resolve_attention_impl

    try:  # an unusable kernel (flash on a CPU, fa3 not installed) is named before the weights load
        resolve_attention_impl(attention_impl, torch.device(device))
    except (ValueError, ImportError) as err:
        raise GenerationError(f"--attention-impl {attention_impl}: {err}") from None
    par = dict(tensor_model_parallel_size=tensor_model_parallel_size, context_parallel_size=context_parallel_size,
               sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1, attention_impl=attention_impl)
    if bf16:
        par.update(bf16=True)
    if is_diffusers_dir(path):
        given = ([f"--adapter {adapter}"] if adapter not in ("auto", None, "none") else []) + (["--ema"] if ema else [])
        if given:
            raise GenerationError(f"{path} is a diffusers export: its adapter was merged when it was exported, so "
                                  f"{' / '.join(given)} does not apply (export another with "
                                  "tools/convert_to_hf.py --merge-lora NAME [--ema])")
        return _load_diffusers(path, par, device)
    d = resolve_checkpoint_dir(path)
    meta = read_meta(d)
    have = list((meta.get("lora") or {}).get("adapters", []))
    if adapter == "auto":  # the student of stage 1 / 2; a LoRA teacher's only adapter; else the full weights
        adapter = "generator" if "generator" in have else have[0] if len(have) == 1 else None
    elif adapter == "none":
        adapter = None
    if adapter is not None and adapter not in have:
        raise GenerationError(f"checkpoint {d} has no adapter {adapter!r} (its adapters: {have or 'none'}; "
                              f"stage {meta.get('stage', 'converted')!r}); pass --adapter one of {have} or "
                              "--adapter none for the base weights")
    if ema:
        group = adapter or "model"
        keys = ckpt.tensor_keys(d)  # the verified index: megatron-core's reader would unpickle it unchecked
        if not any(k.startswith(f"ema.{group}.") for k in keys):
            raise GenerationError(f"--ema: checkpoint {d} holds no EMA weights of {group!r} "
                                  f"(stage {meta.get('stage', 'converted')!r}); drop --ema")
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    arch = meta.get("wan_config") or {}
    if arch.get("expert") and not meta.get("experts"):  # one expert alone knows only its own time range
        b = arch.get("boundary_ratio")
        span = f"[{b:g}, 1]" if arch["expert"] == "high" else f"[0, {b:g}]"
        raise GenerationError(f"{d} is the {arch['expert']}-noise expert of a two-expert model (Wan2.2 A14B, "
                              f"boundary_ratio {b:g}): it knows t in {span} only, and a video needs both experts; "
                              "generate from the pair's stage-2 checkpoint, or export both experts with "
                              "tools/convert_to_hf.py --expert-2 ... --pipeline")
    if meta.get("experts"):  # a two-expert stage-2 run (Wan2.2 A14B): both experts, each step routed to its own
        from megatron_anyflow.anyflow.two_expert import load_stage2_pair

        model = load_stage2_pair(d, adapter=adapter, ema=ema, **par)
    else:
        model = load_for_inference(d, adapter=adapter, ema=ema, **par)
    args = meta.get("args") or {}
    return LoadedModel(model=model.to(device).eval(), kind="checkpoint", path=d, adapter=adapter, ema=ema,
                       shift=float(args.get("time_shift", DEFAULT_SHIFT)), data_path=args.get("data_path"),
                       info={"stage": meta.get("stage"), "iteration": meta.get("iteration")})


def _load_diffusers(path: str, par: dict, device) -> LoadedModel:
    """A diffusers Wan / AnyFlow / AnyFlow-FAR transformer (or pipeline) directory as a `WanModel`: an
    ``AnyFlowFARTransformer3DModel`` becomes a FAR model (``config.far``, its chunk partition) sampled chunk
    by chunk; FAR config keys a reference-layout config omits take diffusers' defaults, listed in
    ``info["far_config_assumed"]`` (`convert.far_config_defaults_filled`)."""
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.convert import (arch_from_hf_config, far_config_defaults_filled, hf_to_megatron,
                                                     load_full_state_dict)
    from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir
    from megatron_anyflow.models.wan.model import WanModel

    tdir = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "transformer")
    pipeline_dir = path if tdir != path else (
        os.path.dirname(os.path.abspath(path)) if os.path.isfile(
            os.path.join(os.path.dirname(os.path.abspath(path)), "model_index.json")) else None)
    hf_cfg, hf_sd = read_hf_transformer_dir(tdir, progress=False)
    arch = arch_from_hf_config(hf_cfg)
    cfg = wan_config(None, **arch, perform_initialization=False, **{k: v for k, v in par.items()})
    model = WanModel(cfg)
    load_full_state_dict(model, hf_to_megatron(hf_sd, cfg.head_dim), source=tdir)
    dirs = [tdir] + ([os.path.join(pipeline_dir, "scheduler")] if pipeline_dir else [])
    shift = _scheduler_shift(*dirs)
    info = {"hf_class": hf_cfg.get("_class_name")}
    if arch.get("far"):
        info["far_config_assumed"] = far_config_defaults_filled(hf_cfg)
    return LoadedModel(model=model.to(device).eval(), kind="diffusers", path=tdir,
                       shift=DEFAULT_SHIFT if shift is None else shift, pipeline_dir=pipeline_dir, info=info)


# ------------------------------------------------------------------------------------------ codec
def dataset_index(data_path: Optional[str]) -> dict:
    """The ``index.json`` of a latent dataset, or ``{}`` when ``data_path`` is None or has none."""
    if not data_path:
        return {}
    p = os.path.join(data_path, "index.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        return json.load(f)


def resolve_codec(name: Optional[str], vae: Optional[str], index: dict, pipeline_dir: Optional[str],
                  in_channels: int, device=None):
    """The latent codec to size and decode videos with (or ``None``: latents only).

    Order: ``name`` (``pixel``, ``wan-vae``, ``wan2.2-vae``, ``none``); else the dataset's codec
    (``index["codec"]``, the VAE path overridable with ``vae``); else ``vae``; else the pipeline's ``vae/``
    (a VAE alone gives the codec of its family: ``wan2.2-vae`` for a 48-channel VAE, else ``wan-vae``);
    else ``None``.

    Raises:
        GenerationError: an unknown codec name; a codec whose latent channels differ from the model's
            ``in_channels``; a VAE codec with no VAE directory, or with a VAE of the other family.
    """
    from megatron_anyflow.data.codecs import CODECS, VAE_CODECS, PixelCodec, codec_from_config, vae_codec_name

    pipe_vae = os.path.join(pipeline_dir, "vae") if pipeline_dir and os.path.isdir(os.path.join(pipeline_dir, "vae")) else None
    if name is not None:
        if name == "none":
            return None
        if name == "pixel":
            cc = index.get("codec") or {}
            codec = PixelCodec(cc.get("space_to_depth", 4), cc.get("scale", 2.0)) if cc.get("name") == "pixel" else PixelCodec()
        elif name in VAE_CODECS or name == "wan":
            name = "wan-vae" if name == "wan" else name
            path = vae or pipe_vae or (index.get("codec") or {}).get("path")
            if not path:
                raise GenerationError(f"--codec {name} needs a VAE directory: pass --vae DIR (a diffusers "
                                      "AutoencoderKLWan, e.g. Wan2.1-T2V-1.3B-Diffusers/vae or "
                                      "Wan2.2-TI2V-5B-Diffusers/vae)")
            try:
                codec = CODECS[name](path, device=device)
            except ValueError as err:  # a VAE of the other family
                raise GenerationError(str(err)) from None
        else:
            raise GenerationError(f"unknown codec {name!r}: expected one of {[*CODECS, 'none']}")
    elif index.get("codec"):
        codec = codec_from_config(index["codec"], vae_path=vae, device=device)
    elif vae or pipe_vae:
        codec = CODECS[vae_codec_name(vae or pipe_vae)](vae or pipe_vae, device=device)
    else:
        return None
    if codec.channels != in_channels:
        raise GenerationError(f"codec {codec.name!r} has {codec.channels} latent channels but the model expects "
                              f"in_channels={in_channels}; pass the codec the model was trained with (--codec, --vae)")
    return codec


# ------------------------------------------------------------------------------------------ text
def resolve_text_encoder(name: Optional[str], path: Optional[str], tokenizer: Optional[str],
                         max_length: Optional[int], index: dict, pipeline_dir: Optional[str], text_dim: int,
                         device=None):
    """The text encoder that turns prompts into ``[n, L, text_dim]`` embeddings.

    Order: ``name`` (``minilm`` / ``umt5``, with ``path``); else the dataset's encoder
    (``index["text_encoder"]``: name, path, max_length); else the pipeline's ``text_encoder/`` +
    ``tokenizer/`` (umT5); else MiniLM when ``text_dim == 384`` (the tiny presets).

    Raises:
        GenerationError: no encoder can be chosen (names the model's text_dim and what to pass); an
            encoder whose width differs from ``text_dim``; an unknown name.
    """
    from megatron_anyflow.data.text import MiniLMTextEncoder, UMT5TextEncoder

    te = index.get("text_encoder") or {}
    pipe_te = os.path.join(pipeline_dir, "text_encoder") if pipeline_dir and os.path.isdir(
        os.path.join(pipeline_dir, "text_encoder")) else None
    if name is None:
        if te.get("name"):
            name, path = te["name"], path or te.get("path")
            max_length = max_length or te.get("max_length")
        elif pipe_te:
            name, path = "umt5", path or pipe_te
        elif text_dim == 384:
            name = "minilm"
        else:
            raise GenerationError(f"no text encoder for a model with text_dim={text_dim}: pass --text-encoder umt5 "
                                  "--text-encoder-path DIR (Wan2.1's umT5), or --prompt-embeds FILE")
    if name == "minilm":
        # a recorded package path from another machine falls back to the installed package
        enc = MiniLMTextEncoder(path if path and os.path.isdir(path) else None, max_length=max_length or 32,
                                device=device)
    elif name == "umt5":
        if not path:
            raise GenerationError("--text-encoder umt5 needs --text-encoder-path DIR (a UMT5EncoderModel directory)")
        enc = UMT5TextEncoder(path, max_length=max_length or 512, tokenizer=tokenizer, device=device)
    else:
        raise GenerationError(f"unknown text encoder {name!r}: expected 'minilm' or 'umt5'")
    if enc.dim != text_dim:
        raise GenerationError(f"text encoder {name!r} ({enc.path}) gives {enc.dim}-d states but the model expects "
                              f"text_dim={text_dim}")
    return enc


def load_prompt_embeds(path: str, text_dim: int) -> torch.Tensor:
    """Prompt embeddings from a safetensors file: key ``prompt_embeds`` (or its only tensor), float32
    ``[n, L, text_dim]`` (``[L, text_dim]`` is read as n = 1).

    Raises:
        GenerationError: no such key / several tensors and none named ``prompt_embeds``, wrong rank or width.
    """
    return _load_tensor(path, "prompt_embeds", lambda x: x.dim() == 3 and x.shape[2] == text_dim,
                        f"[n, L, {text_dim}]", unsqueeze_rank=2)


def load_noise(path: str) -> torch.Tensor:
    """Noise from a safetensors file: key ``noise`` (or its only tensor), float32 ``[n, f, c, h, w]``."""
    return _load_tensor(path, "noise", lambda x: x.dim() == 5, "[n, f, c, h, w]", unsqueeze_rank=4)


def _load_tensor(path: str, key: str, ok: Callable[[torch.Tensor], bool], expected: str, unsqueeze_rank: int):
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise GenerationError(f"{path}: no such file (expected a safetensors file with {key!r} {expected})")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for garbage files
        raise GenerationError(f"{path}: not a readable safetensors file ({err})") from err
    if key in tensors:
        x = tensors[key]
    elif len(tensors) == 1:
        x = next(iter(tensors.values()))
    else:
        raise GenerationError(f"{path}: no tensor {key!r} (has {sorted(tensors)}); expected {key!r} {expected}")
    if x.dim() == unsqueeze_rank:
        x = x.unsqueeze(0)
    if not ok(x) or not x.is_floating_point():
        raise GenerationError(f"{path}: {key!r} has shape {tuple(x.shape)} and dtype {x.dtype}; expected {expected} "
                              "floating point")
    return x.float()


def make_noise(n: int, latent_shape: Sequence[int], seed: int) -> torch.Tensor:
    """float32 ``[n, *latent_shape]`` standard normal from a CPU generator seeded with ``seed``."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((n, *latent_shape), generator=g, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ conditions
def _check_size(what: str, path: str, w: int, h: int, width: int, height: int) -> None:
    if (w, h) != (width, height):
        raise GenerationError(f"{what} {path} is {w}x{h} (width x height); expected {width}x{height} "
                              f"(--width {width} --height {height}): resize it, or pass --width {w} --height {h}")


def image_condition(path: str, codec, height: int, width: int) -> torch.Tensor:
    """Image-to-video: the image's clean latent frame ``[1, 1, c, h, w]`` (float32).

    The image (`read_image`: exactly ``width x height``, scaled to [-1, 1]) is encoded as a one-frame video
    ``[1, 3, 1, H, W]`` (the Wan VAE's first latent frame encodes the first video frame alone; the pixel codec
    encodes frames independently).

    Raises:
        GenerationError: unreadable file, wrong size, or no codec to encode with.
    """
    if codec is None:
        raise GenerationError("--image needs a codec to encode it (--codec pixel / wan-vae, --vae DIR)")
    video = read_image(path, height, width)[:, :, None]  # [1, 3, 1, H, W]
    return codec.encode(video).float()[:, :1]


def read_image(path: str, height: int, width: int) -> torch.Tensor:
    """``--image``: the PNG / JPEG at ``path`` (read with PIL, converted to RGB), exactly ``width x height``, as
    ``[1, 3, H, W]`` float32 in [-1, 1].

    Raises:
        GenerationError: unreadable file or wrong size.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise GenerationError(f"--image {path}: cannot read it as an image ({err})") from err
    _check_size("--image", path, img.width, img.height, width, height)
    x = torch.from_numpy(np.asarray(img).copy()).float().div(127.5).sub(1.0)  # H, W, 3 in [-1, 1]
    return x.permute(2, 0, 1)[None]


def image_channel_condition(path: str, codec, height: int, width: int, frames: int,
                            channels: int) -> torch.Tensor:
    """Image-to-video for a model that reads the image through input channels (Wan2.2 I2V-A14B): the condition
    ``y`` ``[1, f, channels, h, w]`` (float32) of the image at ``path``, built as ``WanImageToVideoPipeline`` does
    (`data.channel_condition.encode_i2v_condition`: mask + the VAE latents of [image, 0, ..., 0]).

    Raises:
        GenerationError: no VAE codec, an unreadable file or wrong size, or a codec whose condition is not
            ``channels`` wide (the codec named).
    """
    from megatron_anyflow.data.channel_condition import encode_i2v_condition

    if codec is None or not hasattr(codec, "vae"):
        raise GenerationError(f"--image {path}: this model reads the image through {channels} input channels "
                              "(Wan2.2 I2V-A14B), made by the Wan VAE: pass --codec wan-vae --vae DIR")
    y = encode_i2v_condition(codec, read_image(path, height, width), frames)
    if y.shape[2] != channels:
        raise GenerationError(f"--image {path}: the {codec.name} codec gives a {y.shape[2]}-channel condition; the "
                              f"model reads {channels}")
    return y


def video_condition(path: str, codec, height: int, width: int, num_latent_frames: int,
                    condition_frames: Optional[int] = None,
                    chunk_partition: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Video-to-video: a clean prefix of latent frames ``[1 or n, fc, c, h, w]`` (float32).

    ``path`` is either a safetensors file with ``latents`` ``[fc, c, h, w]`` / ``[n, fc, c, h, w]``
    (used as is: the diffusers pipeline's ``video_latents``) or a video file read with PyAV, whose first
    ``(fc - 1) * temporal_factor + 1`` frames (``width x height``) are encoded. ``fc`` (latent frames) is
    ``condition_frames``; else all of the file's latents; else, for a video file, as many latent frames as
    the clip covers, at most ``num_latent_frames - 1`` and, for a FAR model (``chunk_partition`` given),
    the longest whole-chunk prefix among those.

    Args:
        chunk_partition: the FAR partition the video is sampled with (None: a bidirectional model); then
            ``fc`` must be one of :func:`condition_lengths` (``sum(cp[:i])``, ``1 <= i < len(cp)``).

    Raises:
        GenerationError: wrong frame size; a clip or file too short for ``condition_frames``; ``fc`` not
            accepted (bidirectional: not in ``[1, num_latent_frames - 1]``; FAR: not a whole-chunk prefix,
            the message lists the accepted ``--condition-frames`` values); no codec for a video file.
    """
    F = int(num_latent_frames)
    if condition_frames is not None and condition_frames < 1:
        raise GenerationError(f"--condition-frames {condition_frames}: expected a number of latent frames >= 1")
    if path.endswith(".safetensors"):
        lat = _load_tensor(path, "latents", lambda x: x.dim() == 5, "[n, fc, c, h, w]", unsqueeze_rank=4)
        available = lat.shape[1]
        if condition_frames is not None:
            if condition_frames > available:
                raise GenerationError(f"--video {path} holds {available} latent frame(s); --condition-frames "
                                      f"{condition_frames} needs {condition_frames}")
            lat = lat[:, :condition_frames]
        fc = lat.shape[1]
        what = (f"--condition-frames {fc}" if condition_frames is not None
                else f"--video {path} holds {fc} latent frame(s)")
        check_condition_frames(fc, F, chunk_partition, what=what, available=available)
    else:
        import av
        import numpy as np

        if codec is None:
            raise GenerationError("--video with a video file needs a codec to encode it (--codec, --vae DIR)")
        try:
            with av.open(path) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        except (av.FFmpegError, OSError) as err:
            raise GenerationError(f"--video {path}: cannot decode it ({err})") from err
        if not frames:
            raise GenerationError(f"--video {path}: no frames")
        _check_size("--video", path, frames[0].shape[1], frames[0].shape[0], width, height)
        tf = codec.temporal_factor
        available = (len(frames) - 1) // tf + 1
        if condition_frames is not None:
            fc, what = condition_frames, f"--condition-frames {condition_frames}"
        else:  # the longest prefix the clip covers (FAR: of whole chunks)
            fc = max(condition_lengths(F, chunk_partition, available), default=min(available, F - 1))
            what = f"--video {path} ({len(frames)} frames = {available} latent frame(s))"
        check_condition_frames(fc, F, chunk_partition, what=what, available=available)
        need = (fc - 1) * tf + 1
        if need > len(frames):
            raise GenerationError(f"--video {path} has {len(frames)} frames; {fc} condition latent frame(s) need "
                                  f"{need} (temporal factor {tf})")
        x = torch.from_numpy(np.stack(frames[:need])).float().div(127.5).sub(1.0)  # F, H, W, 3
        lat = codec.encode(x.permute(3, 0, 1, 2)[None]).float()
    return lat


def image_latents_condition(path: str, latent_shape: Sequence[int],
                            chunk_partition: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Image-to-video from latents (``--image-latents``): the clean first latent frame(s) ``[1, F0, c, h, w]``
    (float32), without decoding an image.

    ``path`` is a safetensors file with key ``latents`` (or a single tensor of any name) of shape
    ``[c, h, w]`` (one frame, F0 = 1), ``[1, c, h, w]`` or ``[F0, c, h, w]`` (F0 frames), in the model's
    latent space (a codec's normalised latents, e.g. ``WanVAECodec.encode(image)[0]``). They become the
    first F0 latent frames of every sample, held clean as ``--image`` / ``--video`` hold theirs.

    Args:
        latent_shape: ``(F, c, h, w)`` of one sample of this run.
        chunk_partition: the FAR partition (None: bidirectional); F0 must then be a whole-chunk prefix.

    Raises:
        GenerationError: an unreadable file or no such tensor; a shape other than ``[c, h, w]`` /
            ``[F0, c, h, w]`` with this run's ``c, h, w`` (names the file, the key, the shape found and the
            shape expected); F0 not accepted (bidirectional: not in ``1 .. F - 1``; FAR: not whole chunks).
    """
    from safetensors.torch import load_file

    F, c, h, w = (int(v) for v in latent_shape)
    expected = (f"[{c}, {h}, {w}] or [F0, {c}, {h}, {w}] with 1 <= F0 < {F} (the latents of this run are "
                f"[{F}, {c}, {h}, {w}])")
    if not os.path.isfile(path):
        raise GenerationError(f"--image-latents {path}: no such file (expected a safetensors file with 'latents' "
                              f"{expected})")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for garbage files
        raise GenerationError(f"--image-latents {path}: not a readable safetensors file ({err})") from err
    key = "latents" if "latents" in tensors or len(tensors) != 1 else next(iter(tensors))
    if key not in tensors:
        raise GenerationError(f"--image-latents {path}: no tensor 'latents' (has {sorted(tensors)}); expected "
                              f"'latents' {expected}")
    x = tensors[key]
    got = list(x.shape)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w) or not x.is_floating_point():
        raise GenerationError(f"--image-latents {path}: {key!r} has shape {got} ({x.dtype}); expected {expected}, "
                              "floating point")
    check_condition_frames(x.shape[0], F, chunk_partition, what=f"--image-latents {path}: {key!r} {got} holds "
                           f"{x.shape[0]} latent frame(s)", flag="--image-latents")
    return x.float().unsqueeze(0)


# ------------------------------------------------------------------------------------------ FAR chunks
def is_far(model) -> bool:
    """True for an AnyFlow-FAR (causal, chunk-by-chunk) model: ``model.config.far``."""
    return bool(getattr(getattr(model, "config", None), "far", False))


def suggest_chunk_partition(chunk_partition: Sequence[int], num_latent_frames: int) -> List[int]:
    """A partition of ``num_latent_frames`` close to ``chunk_partition``, for error messages: its leading
    chunks while they fit, then chunks of its largest size after the first, the last one shortened.
    E.g. ``(1, 3, 3, 3, 3, 3, 3, 2)`` -> ``[1, 3, 1]`` for 5 frames; ``(1, 2, 1)`` -> ``[1, 2, 1, 2, 1]`` for 7."""
    cp = [int(c) for c in chunk_partition] or [1]
    out: List[int] = []
    for c in cp:
        if sum(out) + c > num_latent_frames:
            break
        out.append(c)
    size = max(cp[1:] or cp)
    while sum(out) < num_latent_frames:
        out.append(min(size, num_latent_frames - sum(out)))
    return out


def resolve_chunk_partition(model, num_latent_frames: int, chunk_partition: Optional[Sequence[int]] = None,
                            flag: str = "chunk_partition", source: str = "",
                            frames_hint: Optional[Callable[[int], str]] = None) -> Optional[Tuple[int, ...]]:
    """The chunk partition a FAR model samples ``num_latent_frames`` latent frames with; None for a
    bidirectional model (which takes no partition).

    Any partition whose entries are positive ints summing to F works with any FAR checkpoint (diffusers'
    ``AnyFlowFARPipeline(chunk_partition=...)`` and :func:`~megatron_anyflow.anyflow.causal.sample_chunked`
    take it per call); the one the checkpoint recorded (``model.config.chunk_partition``, the training
    partition) is only the default.

    Args:
        model: the model to sample (FAR when ``model.config.far``).
        num_latent_frames: F, latent frames of the video to sample.
        chunk_partition: latent frames per chunk (``--chunk-partition``), or None for the recorded one.
        flag: how the caller names ``chunk_partition`` in messages (``"--chunk-partition"`` in the CLI).
        source: where F came from, appended to the frame count in messages (e.g. ``" (--frames 17)"``).
        frames_hint: ``frames_hint(S)`` -> how to ask for S latent frames instead (e.g. ``"--frames 21"``,
            :func:`latent_frames_hint`), offered when the recorded partition (sum S) does not fit.

    Returns:
        The partition as a tuple of ints (FAR), or None (bidirectional, ``chunk_partition`` None).

    Raises:
        GenerationError: ``chunk_partition`` for a bidirectional model; an entry that is not a positive int;
            a given partition whose sum is not F (names ``flag``, the partition, its sum and F, and a partition
            that fits); no partition given and the recorded one does not sum to F (names both, and the two ways
            out: ``flag`` summing to F, or ``frames_hint(S)``).
    """
    F = int(num_latent_frames)
    if not is_far(model):
        if chunk_partition is not None:
            raise GenerationError(f"{flag} {list(chunk_partition)} applies to AnyFlow-FAR (causal) checkpoints only; "
                                  f"this model is bidirectional and samples all {F} latent frames at once: drop {flag}")
        return None
    recorded = tuple(int(c) for c in model.config.chunk_partition)
    if chunk_partition is not None:
        cp = tuple(chunk_partition)
        if not cp or any(isinstance(c, bool) or int(c) != c or c < 1 for c in cp):
            raise GenerationError(f"{flag} {list(cp)}: expected one or more positive numbers of latent frames "
                                  f"per chunk, summing to the video's {F} latent frames")
        cp = tuple(int(c) for c in cp)
        if sum(cp) != F:
            raise GenerationError(f"{flag} {list(cp)} sums to {sum(cp)} latent frames but the video has {F} latent "
                                  f"frames{source}: pass chunks summing to {F}, e.g. {flag} "
                                  f"{' '.join(map(str, suggest_chunk_partition(cp, F)))}")
        return cp
    if sum(recorded) != F:
        S = sum(recorded)
        other = frames_hint(S) if frames_hint is not None else f"sample {S} latent frames"
        raise GenerationError(f"the FAR model's chunk_partition {list(recorded)} covers {S} latent frames; the video "
                              f"has {F}{source}: pass {flag} with chunks summing to {F} (e.g. {flag} "
                              f"{' '.join(map(str, suggest_chunk_partition(recorded, F)))}), or {other} for the "
                              "recorded partition")
    return recorded


def latent_frames_hint(codec, num_latent_frames: int, latent_shape: Optional[Sequence[int]] = None,
                       noise_file: Optional[str] = None) -> str:
    """How a ``tools/generate.py`` user asks for ``S = num_latent_frames`` latent frames: with a video codec
    ``--frames (S - 1) * temporal_factor + 1`` (Wan VAE: video frames are 4k + 1); without one (``--codec
    none``) ``--latent-shape S C H W`` (``latent_shape``: the run's ``(F, C, H, W)``), or a noise file with S
    latent frames when the latents came from ``--noise FILE``."""
    S = int(num_latent_frames)
    if codec is None:
        if noise_file:
            return f"a --noise file with {S} latent frames ([n, {S}, c, h, w])"
        chw = " ".join(map(str, latent_shape[1:])) if latent_shape is not None else "C H W"
        return f"--latent-shape {S} {chw}"
    tf = int(codec.temporal_factor)
    frames = (S - 1) * tf + 1
    if tf == 1:
        return f"--frames {S}"
    name = {"wan-vae": "Wan-VAE", "wan2.2-vae": "Wan2.2-VAE"}.get(codec.name, f"{codec.name} codec")
    return f"--frames {frames} ({name} video frames must be {tf}k+1; {frames} frames give {S} latent frames)"


def condition_lengths(num_latent_frames: int, chunk_partition: Optional[Sequence[int]] = None,
                      available: Optional[int] = None) -> List[int]:
    """The condition-prefix lengths (latent frames) generation accepts for a video of F latent frames.

    Bidirectional (``chunk_partition`` None): ``1 .. F - 1``. FAR: the chunk ends before the last chunk,
    ``sum(cp[:i])`` for ``i = 1 .. len(cp) - 1`` (condition frames are whole chunks, copied clean and only
    prefilled into the KV cache; at least one chunk is generated). ``available``: at most this many (the
    frames a clip or file holds)."""
    F = int(num_latent_frames)
    if chunk_partition is None:
        out = list(range(1, F))
    else:
        cp = [int(c) for c in chunk_partition]
        out = [sum(cp[:i]) for i in range(1, len(cp))]
    return [k for k in out if available is None or k <= available]


def check_condition_frames(num_condition_frames: int, num_latent_frames: int,
                           chunk_partition: Optional[Sequence[int]] = None, what: Optional[str] = None,
                           flag: str = "--condition-frames", available: Optional[int] = None,
                           partition_flag: str = "--chunk-partition") -> int:
    """Check a condition prefix of ``fc = num_condition_frames`` latent frames (I2V / V2V); returns ``fc``.

    Args:
        num_condition_frames: fc, latent frames held clean.
        num_latent_frames: F, latent frames of the video.
        chunk_partition: the FAR partition used (None: bidirectional model).
        what: the message's subject (e.g. ``"--image-latents x.safetensors holds 2 latent frames"``);
            default ``f"{flag} {fc}"``.
        flag: what the user changes to fix it; the accepted values are listed in its unit, latent frames.
        available: the most latent frames the source holds (a clip's length), or None.
        partition_flag: how the partition is named when suggesting one with a chunk boundary at fc.

    Raises:
        GenerationError: fc not in :func:`condition_lengths` (the message lists exactly those values, in
            latent frames, and for FAR a partition with a chunk boundary at fc).
    """
    fc, F = int(num_condition_frames), int(num_latent_frames)
    accepted = condition_lengths(F, chunk_partition, available)
    if fc in accepted:
        return fc
    what = what or f"{flag} {fc}"
    if chunk_partition is None:
        have = "" if available is None else f", the source holds {available}"
        raise GenerationError(f"{what}: {fc} condition latent frame(s); expected 1 .. {max(accepted, default=0)} "
                              f"(the output has {F} latent frames{have})")
    cp = [int(c) for c in chunk_partition]
    if accepted:
        fits = f"{flag} accepts {accepted} latent frames" + ("" if available is None else
                                                             f" (the source holds {available})")
    elif len(cp) == 1:
        fits = "a partition of one chunk leaves no prefix to hold clean"
    else:
        fits = (f"no whole-chunk prefix {condition_lengths(F, cp)} fits in the {available} latent frame(s) the "
                "source holds")
    alt = ""
    if 1 <= fc < F and (available is None or fc <= available):  # split the chunk that holds frame fc there
        ends = sorted({sum(cp[:i + 1]) for i in range(len(cp))} | {fc})
        alt = (f"; or pass {partition_flag} with a chunk ending at frame {fc}, e.g. "
               f"{' '.join(str(b - a) for a, b in zip([0] + ends, ends))}")
    raise GenerationError(f"{what}: {fc} condition latent frame(s) are not whole chunks of the FAR chunk partition "
                          f"{cp} (condition frames are copied clean chunk by chunk, and the last chunk is generated); "
                          f"{fits}{alt}")


# ------------------------------------------------------------------------------------------ sampling
def check_steps(steps: Sequence[int]) -> List[int]:
    """Validate step counts (integers >= 1); returns them as a list (order kept, duplicates dropped).

    Raises:
        GenerationError: an empty list or a value < 1, named.
    """
    if not steps:
        raise GenerationError("--steps needs at least one step count N >= 1")
    out = []
    for n in steps:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise GenerationError(f"--steps {n}: every step count must be an integer >= 1 (N = NFE)")
        if int(n) not in out:
            out.append(int(n))
    return out


@torch.no_grad()
def sample_any_step(model: Callable, noise: torch.Tensor, text: torch.Tensor, steps: Sequence[int],
                    shift: float = DEFAULT_SHIFT, condition_frames: Optional[torch.Tensor] = None,
                    condition_r: str = "step", batch_size: Optional[int] = None,
                    progress: bool = True, chunk_partition: Optional[Sequence[int]] = None,
                    channel_condition: Optional[torch.Tensor] = None) -> Dict[int, torch.Tensor]:
    """Flow-map Euler samples of the same noise and text at every N in ``steps``.

    Args:
        model: ``model(z, T, R, text) -> u`` (a `WanModel`; T, R float32 ``[b, f]`` on 0..1000). A
            `anyflow.two_expert.TwoExpertWanModel` (its ``boundary``) is sampled on
            `timesteps.two_expert_time_grid` (``N = 1``: two model calls).
        noise: ``[n, f, c, h, w]`` at t = 1 (its dtype is the state's dtype; float32 recommended).
        text: ``[n, L, d]``.
        steps: step counts N (validated by :func:`check_steps`).
        shift: the grid's time shift (5.0 for Wan2.1 / AnyFlow).
        condition_frames: clean latents ``[1 or n, fc, c, h, w]`` of the first ``fc`` frames (I2V / V2V).
            A FAR model needs ``fc`` chunk-aligned (``fc = sum(cp[:i])``, ``i >= 1``; see
            :func:`condition_lengths`).
        condition_r: ``"step"`` (reference / diffusers ``AnyFlowPipeline``: condition frames get the step's
            r) or ``"zero"`` (r = 0). Bidirectional models only: a FAR model never runs a step on its
            condition chunks (they are copied clean and prefilled into the KV cache at t = r = 0,
            ``anyflow.causal.sample_chunked``), so the value has no effect there.
        batch_size: samples per model call (default: all n).
        progress: one tqdm bar over all model calls (NFE).
        chunk_partition: FAR models only: latent frames per chunk, positive ints summing to ``f`` (any
            partition, as diffusers' ``AnyFlowFARPipeline``); None: the model's ``config.chunk_partition``.
        channel_condition: ``y`` ``[1 or n, f, c_y, h, w]`` for a model that reads the image through input
            channels (Wan2.2 I2V-A14B; :func:`image_channel_condition`), appended to the latents at every call.

    Returns:
        ``{N: x0}`` with ``x0`` ``[n, f, c, h, w]`` in ``noise``'s dtype, on ``noise``'s device.

    Raises:
        NonFiniteSampleError: a model output (bidirectional) or a chunk's state (FAR) is NaN / inf; the
            message names N, the step, the chunk and the samples.
        GenerationError: non-finite noise, prompt embeddings or condition frames; bad steps,
            ``condition_r``, or text / condition batch sizes that do not match;
            ``chunk_partition`` for a bidirectional model; a FAR partition that does not sum to ``f`` or a
            condition that is not chunk-aligned (the messages name the partition and the frame counts).
    """
    steps = check_steps(steps)
    for name, x in (("noise", noise), ("prompt embeddings", text), ("condition frames", condition_frames),
                    ("channel condition", channel_condition)):
        _check_finite(name, x)
    if condition_r not in ("step", "zero"):
        raise GenerationError(f"condition_r={condition_r!r}; expected 'step' (diffusers) or 'zero'")
    n = noise.shape[0]
    if text.shape[0] != n:
        raise GenerationError(f"{text.shape[0]} prompt embedding(s) for {n} noise sample(s)")
    if condition_frames is not None:
        if condition_frames.shape[0] == 1 and n > 1:
            condition_frames = condition_frames.expand(n, *condition_frames.shape[1:])
        if condition_frames.shape[0] != n:
            raise GenerationError(f"{condition_frames.shape[0]} condition sample(s) for {n} noise sample(s)")
    if channel_condition is not None:
        if channel_condition.shape[0] == 1 and n > 1:
            channel_condition = channel_condition.expand(n, *channel_condition.shape[1:])
        if channel_condition.shape[0] != n:
            raise GenerationError(f"{channel_condition.shape[0]} channel condition(s) for {n} noise sample(s)")
    cp = resolve_chunk_partition(model, noise.shape[1], chunk_partition)  # None: bidirectional
    if cp is not None and channel_condition is not None:
        raise GenerationError("an AnyFlow-FAR model reads no channel condition")
    if cp is not None and condition_frames is not None:
        check_condition_frames(condition_frames.shape[1], noise.shape[1], cp, flag="condition_frames",
                               partition_flag="chunk_partition")
    bs = batch_size or n
    chunks = [(i, min(i + bs, n)) for i in range(0, n, bs)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(steps) * len(chunks), desc="sampling", unit="NFE")

    where = {"N": 0, "step": 0, "samples": (0, 0)}  # what the next model call computes, for error messages

    def counted(z, t, r, txt):
        out = model(z, t, r, txt)
        where["step"] += 1
        if not bool(torch.isfinite(out).all()):  # one host sync per step: negligible next to a forward
            a, b = where["samples"]
            raise NonFiniteSampleError(f"the model's output is not finite at N = {where['N']}, step "
                                       f"{where['step']} of {where['N']} (samples {a}..{b - 1}): the weights or "
                                       "the inputs are unusable; no video was written")
        if bar is not None:
            bar.update(1)
        return out

    def chunk_step_finite(chunk, step, t, r, z):
        if not bool(torch.isfinite(z).all()):
            a, b = where["samples"]
            raise NonFiniteSampleError(f"the state is not finite at N = {where['N']}, step {step + 1} of "
                                       f"{where['N']}, chunk {chunk} (samples {a}..{b - 1}): the weights or the "
                                       "inputs are unusable; no video was written")

    out: Dict[int, torch.Tensor] = {}
    if cp is not None:
        # AnyFlow-FAR: chunk by chunk with the KV cache (anyflow.causal.sample_chunked, docs/design/far.md 3); the
        # condition is the first whole chunks (I2V: chunk 0 = the image latent).
        from megatron_anyflow.anyflow.causal import sample_chunked
        from megatron_anyflow.models.wan.far import FarModelRunner

        runner = FarModelRunner(model)
        for N in steps:
            parts = []
            for a, b in chunks:
                cond = condition_frames[a:b] if condition_frames is not None else None
                where.update(N=N, samples=(a, b))
                try:
                    parts.append(sample_chunked(runner, noise[a:b], text[a:b], cp, N, shift=shift, condition=cond,
                                                callback=chunk_step_finite))
                except ValueError as err:
                    raise GenerationError(str(err)) from None
                if bar is not None:
                    bar.update(N)
            out[N] = torch.cat(parts)
        if bar is not None:
            bar.close()
        return out
    for N in steps:
        if bar is not None:
            bar.set_postfix_str(f"N={N}")
        # a two-expert model samples on the grid with its boundary on it (no step crosses it; N = 1: two calls)
        sampler = FlowMapEulerSampler(N, shift=shift, boundary=getattr(model, "boundary", None))
        parts = []
        for a, b in chunks:
            cond = condition_frames[a:b] if condition_frames is not None else None
            where.update(N=N, step=0, samples=(a, b))
            y = channel_condition[a:b] if channel_condition is not None else None
            parts.append(sampler(counted, noise[a:b], text[a:b], condition_frames=cond, condition_r=condition_r,
                                 channel_condition=y))
        out[N] = torch.cat(parts)
        if not bool(torch.isfinite(out[N]).all()):  # finite outputs, but the update overflowed
            raise NonFiniteSampleError(f"the samples at N = {N} are not finite (the Euler update overflowed): "
                                       "no video was written")
    if bar is not None:
        bar.close()
    return out


def save_run_tensors(path: str, samples: Dict[int, torch.Tensor], noise: torch.Tensor, text: torch.Tensor,
                     condition_frames: Optional[torch.Tensor] = None) -> str:
    """Write ``steps_<N>`` (final latents ``[n, f, c, h, w]``), ``noise``, ``prompt_embeds`` and, for I2V / V2V,
    ``condition_frames`` (float32, CPU, contiguous) to one safetensors file. Returns ``path``."""
    from safetensors.torch import save_file

    tensors = {f"steps_{N}": x for N, x in samples.items()}
    tensors.update(noise=noise, prompt_embeds=text)
    if condition_frames is not None:
        tensors["condition_frames"] = condition_frames
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
    return path


def latent_shape_for(codec, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
    """``(f, c, h, w)`` of one sample's latents for a ``frames x height x width`` video.

    Raises:
        GenerationError: sizes the codec cannot produce (e.g. Wan VAE frames not 4k + 1: the message names
            the nearest frame counts that work), named.
    """
    try:
        return tuple(codec.latent_shape(frames, height, width))
    except ValueError as err:
        tf = int(getattr(codec, "temporal_factor", 1))
        hint = ""
        if tf > 1 and (frames - 1) % tf:
            lo = (frames - 1) // tf * tf + 1
            near = [f for f in (lo, lo + tf) if f >= 1]
            hint = (f" (video frames must be {tf}k+1 for this codec: e.g. "
                    + " or ".join(f"--frames {f} ({(f - 1) // tf + 1} latent frames)" for f in near) + ")")
        raise GenerationError(f"--frames {frames} --height {height} --width {width}: {err}{hint}") from err


def video_size(codec, index: dict, height: Optional[int], width: Optional[int], frames: Optional[int],
               latent_shape: Optional[Sequence[int]] = None):
    """``(height, width, frames, latent_shape)`` of the videos: the given sizes, else the dataset's
    (``index["video"]``), else the codec's ``default_video`` (Wan2.1 VAE: 480 x 832 x 81; Wan2.2 VAE:
    704 x 1280 x 121; none for the pixel codec). Without a codec only ``latent_shape``
    (``(f, c, h, w)``, possibly None) is known.

    Raises:
        GenerationError: sizes unknown, or not producible by the codec (named).
    """
    if codec is None:
        return None, None, None, tuple(latent_shape) if latent_shape else None
    v = index.get("video") or {}
    default = codec.default_video
    height = height or v.get("height") or default["height"]
    width = width or v.get("width") or default["width"]
    frames = frames or v.get("num_frames") or default["num_frames"]
    if not (height and width and frames):
        raise GenerationError("the video size is unknown (the checkpoint records no dataset): pass --height, "
                              "--width and --frames")
    return height, width, frames, latent_shape_for(codec, frames, height, width)


def prompt_embeddings(prompts: Sequence[str], prompt_embeds: Optional[str], num_videos: int, text_dim: int,
                      encoder: Optional[Callable[[], object]] = None, log: Callable[[str], None] = lambda s: None):
    """Text embeddings ``[n, L, d]`` and one caption per sample, prompt-major (``n = prompts x num_videos``).

    ``prompt_embeds``: a safetensors file (:func:`load_prompt_embeds`), one row per prompt (a
    ``--save-latents`` file has one row per sample: reuse it with ``num_videos = 1``); ``prompts`` then
    only caption the videos. Otherwise ``encoder()`` builds the text encoder that encodes ``prompts``.

    Raises:
        GenerationError: no prompt; captions that do not match the embeddings; ``num_videos < 1``.
    """
    if num_videos < 1:
        raise GenerationError(f"--num-videos {num_videos}: must be >= 1")
    prompts = list(prompts)
    if prompt_embeds:
        text = load_prompt_embeds(prompt_embeds, text_dim)
        if prompts and len(prompts) != text.shape[0]:
            raise GenerationError(f"{len(prompts)} prompt(s) given as captions for {text.shape[0]} embedding(s) in "
                                  f"{prompt_embeds}")
        prompts = prompts or [f"prompt {i} of {os.path.basename(prompt_embeds)}" for i in range(text.shape[0])]
        log(f"prompt embeddings {tuple(text.shape)} from {prompt_embeds}")
    else:
        if not prompts:
            raise GenerationError("no prompt: pass --prompt TEXT [TEXT ...], --prompt-file FILE or --prompt-embeds FILE")
        enc = encoder()
        text = enc.encode(prompts)
        log(f"encoded {len(prompts)} prompt(s) with {enc.name} ({enc.path}, L={enc.max_length})")
    captions = [p for p in prompts for _ in range(num_videos)]
    return text.repeat_interleave(num_videos, dim=0), captions


def initial_noise(n: int, latent_shape: Optional[Sequence[int]], seed: int, noise_file: Optional[str] = None,
                  in_channels: Optional[int] = None) -> torch.Tensor:
    """The noise at t = 1: from ``noise_file`` (:func:`load_noise`) or :func:`make_noise` (``seed``).

    Raises:
        GenerationError: a file with another sample count or latent shape; no latent shape at all;
            latents whose channels differ from ``in_channels``.
    """
    if noise_file:
        noise = load_noise(noise_file)
        if noise.shape[0] != n:
            raise GenerationError(f"{noise_file} holds {noise.shape[0]} noise sample(s); this run has {n} "
                                  "(prompts x --num-videos)")
        if latent_shape is not None and tuple(noise.shape[1:]) != tuple(latent_shape):
            raise GenerationError(f"{noise_file}: noise {tuple(noise.shape)} does not match the latents "
                                  f"{tuple(latent_shape)} of the requested video size")
    else:
        if latent_shape is None:
            raise GenerationError("no codec and no latent size: pass --codec / --vae, --latent-shape F C H W, or "
                                  "--noise FILE")
        noise = make_noise(n, latent_shape, seed)
    if in_channels is not None and noise.shape[2] != in_channels:
        raise GenerationError(f"latents have {noise.shape[2]} channels; the model expects {in_channels}")
    return noise


def write_videos(samples: Dict[int, torch.Tensor], codec, out_dir: str, captions: Sequence[str], title: str,
                 fps: int, min_seconds: float = 4.0) -> Dict[str, str]:
    """Decode every N's latents with ``codec`` and write ``steps_<N>.mp4`` (labelled, one column per sample,
    looped to >= ``min_seconds``) and ``contact_sheet.png`` (rows = N, columns = samples) into ``out_dir``.
    Returns name -> path."""
    from megatron_anyflow.anyflow.evaluation import write_contact_sheet, write_labelled_video

    videos = {describe_steps(N): codec.decode(z.float().cpu()).clamp(-1, 1) for N, z in samples.items()}
    paths = {}
    for N, (label, v) in zip(samples, videos.items()):
        paths[f"video_{N}"] = write_labelled_video({label: v}, os.path.join(out_dir, f"steps_{N}.mp4"), captions,
                                                   title=f"{title}: {label}", fps=fps, min_seconds=min_seconds)
    paths["contact_sheet"] = write_contact_sheet(videos, os.path.join(out_dir, "contact_sheet.png"), captions,
                                                 title=f"{title}; rows = sampling steps (NFE)")
    return paths


def describe_steps(n: int) -> str:
    """Row label for N: ``"1 step"`` / ``"4 steps"``."""
    return f"{n} step" + ("" if n == 1 else "s")

