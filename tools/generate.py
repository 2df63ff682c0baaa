#!/usr/bin/env python
"""Generate videos with an AnyFlow student at any number of steps.

    python tools/generate.py --checkpoint outputs/tiny/ckpt/stage2 --ema --prompt "a rabbit in the grass" \
        --steps 1 2 4 8 --output outputs/tiny/generate
    python tools/generate.py --checkpoint export/anyflow-pipeline --prompt "..." --steps 4 --output out/
    torchrun --nproc_per_node 4 tools/generate.py --checkpoint ckpt/stage2 --tensor-model-parallel-size 4 ...

Source: a training checkpoint of any stage (the ``generator`` adapter is merged when present; ``--adapter``,
``--ema``) or a diffusers export (``tools/convert_to_hf.py``; a transformer or a full pipeline directory).
Text: ``--prompt`` (encoded with the run's text encoder: umT5 for Wan, MiniLM for the tiny presets) or
``--prompt-embeds FILE``. Image-to-video: ``--image`` (the first latent frame held clean) or
``--image-latents FILE`` (the first latent frame(s) given as latents, no codec needed); video-to-video:
``--video`` (a clean prefix of latent frames, from a video file or a safetensors of latents); condition
frames follow diffusers' ``AnyFlowPipeline`` (t = 0, r = the step's r; ``--condition-r``). A Wan2.2 I2V-A14B
model (a two-expert stage-2 checkpoint of it) takes ``--image`` through its condition channels instead
(``WanImageToVideoPipeline``'s mask + the VAE latents of [image, 0, ...], at every step; needs the Wan VAE).
Defaults (codec, text encoder, video size, fps, time shift) come from the dataset and arguments the
checkpoint recorded, or from the pipeline's components. Sizes: ``--frames/--height/--width`` (video
pixels, a codec) or, with ``--codec none``, ``--latent-shape F C H W`` (latents); a size flag that does not
apply is refused, not ignored.

AnyFlow-FAR checkpoints (causal) are sampled chunk by chunk with the KV cache, N steps per chunk, with
``--chunk-partition`` (latent frames per chunk, any positive ints summing to the latent frames; default:
the checkpoint's partition when it fits). Their condition frames are whole chunks (``--image`` needs a
first chunk of 1 frame; ``--video --condition-frames K`` a K that ends a chunk), copied clean and prefilled
into the KV cache at t = r = 0, so ``--condition-r`` does not apply to them:

    python tools/generate.py --checkpoint runs/anyflow-far-1.3b/ckpt/stage2 --ema --prompt "..." --codec none \
        --latent-shape 5 16 60 104 --chunk-partition 1 2 2 --image-latents first_frame.safetensors \
        --steps 1 4 --output out/ --save-latents out/latents.safetensors

Writes into ``--output``: ``steps_<N>.mp4`` per step count (labelled grid, one column per sample, looped
to >= 4 s), ``contact_sheet.png`` (rows = step counts, columns = prompts) and ``generation.json`` (the
settings used, e.g. ``chunk_partition`` for FAR; a setting that had no effect is recorded as null and
named in ``not_applied``, and the paths). ``--save-latents FILE`` writes the final latents per N with the
noise and prompt embeddings, which ``--noise FILE --prompt-embeds FILE`` read back to reproduce a run
exactly.
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="training checkpoint (root or directory) or diffusers export")
    g.add_argument("--adapter", default="auto",
                   help="LoRA adapter to merge (default: 'generator' when the checkpoint has it; 'none': the base)")
    g.add_argument("--ema", action="store_true", help="use the EMA weights of the adapter (or of the full model)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights, activations and FAR KV cache (diffusers' fp32 modules stay fp32; times float32, "
                        "the update float64)")
    g.add_argument("--attention-impl", default="auto", metavar="IMPL",
                   help="attention kernel, training's --attention-impl choices (models.wan.config.ATTENTION_IMPLS; "
                        "checked before the weights load); auto: cuDNN on Hopper, else FA3, flash-attn, SDPA "
                        "(CPU: SDPA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional, as training's --compile; the first call "
                        "traces)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA, bidirectional checkpoints: --compile with mode reduce-overhead (each block call "
                        "replayed as a CUDA graph)")
    g.add_argument("--shift", type=float, default=None, help="time shift (default: the run's, else 5)")
    g = p.add_argument_group("text")
    g.add_argument("--prompt", nargs="+", default=None, help="one or more prompts (one column each)")
    g.add_argument("--prompt-file", default=None, help="a text file with one prompt per line")
    g.add_argument("--prompt-embeds", default=None,
                   help="safetensors with 'prompt_embeds' [n, L, d] (e.g. a --save-latents file); skips encoding")
    g.add_argument("--text-encoder", default=None, choices=["minilm", "umt5"], help="default: the dataset's")
    g.add_argument("--text-encoder-path", default=None)
    g.add_argument("--tokenizer", default=None, help="umT5 tokenizer directory (default: next to the encoder)")
    g.add_argument("--text-max-length", type=int, default=None, help="L (default: the dataset's; 512 umT5, 32 MiniLM)")
    g = p.add_argument_group("video")
    g.add_argument("--data-path", default=None, help="dataset whose codec / text encoder / sizes are the defaults "
                                                     "(default: the one the checkpoint trained on)")
    g.add_argument("--codec", default=None,
                   help="pixel, wan-vae, wan2.2-vae or none (latents only); default: the dataset's")
    g.add_argument("--vae", default=None, help="Wan VAE directory (diffusers AutoencoderKLWan)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--frames", type=int, default=None, help="video frames (Wan VAE: 4k + 1)")
    g.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("F", "C", "H", "W"),
                   help="latent size when there is no codec (--codec none; with a codec the size follows "
                        "--frames/--height/--width)")
    g.add_argument("--fps", type=int, default=None, help="fps of the written videos (not with --codec none)")
    g.add_argument("--image", default=None, help="image-to-video: the first frame (PNG / JPEG of --width x --height)")
    g.add_argument("--image-latents", default=None, metavar="FILE",
                   help="image-to-video from latents: safetensors with 'latents' [C, H, W] or [F0, C, H, W] (the "
                        "run's latent C, H, W; F0 >= 1 frames, FAR: whole chunks) held clean as the first latent "
                        "frame(s); no codec needed")
    g.add_argument("--video", default=None, help="video-to-video: a clip (or safetensors 'latents') whose latent "
                                                 "frames are kept as a clean prefix")
    g.add_argument("--condition-frames", type=int, default=None,
                   help="--video: how many latent frames to keep (FAR: a whole-chunk prefix, e.g. 1 or 3 for "
                        "--chunk-partition 1 2 2)")
    g.add_argument("--condition-r", choices=["step", "zero"], default=None,
                   help="bidirectional models with condition frames: r fed for them, the step's r (default, "
                        "diffusers AnyFlowPipeline) or 0; refused for FAR checkpoints (condition chunks are "
                        "prefilled at t = r = 0, never stepped)")
    g.add_argument("--chunk-partition", type=int, nargs="+", default=None, metavar="K",
                   help="FAR checkpoints: latent frames per chunk, positive ints summing to the latent frames "
                        "(e.g. 1 2 2 for 5); default: the checkpoint's partition when it sums to them")
    g = p.add_argument_group("sampling and output")
    g.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts N (one video each)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    g.add_argument("--noise", default=None, help="safetensors with 'noise' [n, f, c, h, w] (replaces the seed)")
    g.add_argument("--batch-size", type=int, default=None, help="samples per model call (default: all)")
    g.add_argument("--output", required=True, help="directory for the videos, contact sheet and generation.json")
    g.add_argument("--save-latents", default=None, help="safetensors file for the final latents (+ noise, embeds)")
    g.add_argument("--min-seconds", type=float, default=4.0, help="loop short clips to last this long")
    g.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Sizes and counts are checked before anything loads (a typo costs a second, not a model load).
    for flag in ("frames", "height", "width", "fps", "num_videos", "batch_size", "condition_frames", "text_max_length"):
        val = getattr(args, flag)
        if val is not None and val < 1:
            p.error(f"--{flag.replace('_', '-')} {val}: must be >= 1")
    if args.latent_shape is not None and min(args.latent_shape) < 1:
        p.error(f"--latent-shape {' '.join(map(str, args.latent_shape))}: F, C, H and W must all be >= 1")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        p.error(f"--output {args.output}: is a file; give a directory (created if missing) for the videos, the "
                "contact sheet and generation.json")
    if args.min_seconds < 0 or args.min_seconds != args.min_seconds:
        p.error(f"--min-seconds {args.min_seconds}: must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_anyflow.anyflow.generation import GenerationError, NonFiniteSampleError

    try:
        return run(args)
    except (GenerationError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except NonFiniteSampleError as err:
        # The run was valid but its result is not: exit 1, and nothing that looks like a finished output.
        print(f"error: {err}", file=sys.stderr)
        return 1


def _refuse_video_sizes(args, why):
    """--frames/--height/--width/--fps size or play a decoded video: refused where there is none."""
    given = [f"--{n} {v}" for n, v in (("frames", args.frames), ("height", args.height), ("width", args.width),
                                        ("fps", args.fps)) if v is not None]
    if given:
        from megatron_anyflow.anyflow.generation import GenerationError

        raise GenerationError(f"{' '.join(given)}: video sizes do not apply {why}; give the latent size with "
                              "--latent-shape F C H W (or a --noise FILE), or pass --codec / --vae to make videos")


def run(args):
    import torch
    import torch.distributed as dist

    from megatron_anyflow.anyflow import generation as G
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

    # 0. flags that cannot apply, refused before anything is loaded
    steps = G.check_steps(args.steps)
    given = [f for f, v in (("--image", args.image), ("--image-latents", args.image_latents), ("--video", args.video))
             if v]
    if len(given) > 1:
        raise G.GenerationError(f"give one condition, --image or --image-latents (image-to-video) or --video "
                                f"(video-to-video), not {' and '.join(given)}")
    if args.condition_frames is not None and not args.video:
        raise G.GenerationError(f"--condition-frames {args.condition_frames} applies to --video only (how many of "
                                "its latent frames to keep)")
    if args.codec == "none":
        _refuse_video_sizes(args, "with --codec none (latents only: nothing is encoded or decoded)")
    if not torch.cuda.is_available():
        enable_megatron_cpu_compat()
    initialize_parallel(args.tensor_model_parallel_size, args.context_parallel_size)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.time()
    log = (lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)) if rank == 0 else (lambda s: None)

    # 1. model, and the dataset its run recorded (codec, text encoder, sizes)
    lm = G.load_model(args.checkpoint, adapter=args.adapter, ema=args.ema,
                      tensor_model_parallel_size=args.tensor_model_parallel_size,
                      context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
                      bf16=args.bf16, device=device, attention_impl=args.attention_impl, compile=args.compile,
                      cuda_graphs=args.cuda_graphs)
    far = G.is_far(lm.model)
    cc = lm.condition_channels  # Wan2.2 I2V-A14B: the image enters through 20 input channels, not a clean frame
    if cc and not args.image:
        raise G.GenerationError(f"{lm.path} reads a {cc}-channel image condition besides its latents (Wan2.2 "
                                "I2V-A14B): pass --image (the first frame, PNG / JPEG of --width x --height)")
    if cc and (args.image_latents or args.video or args.condition_r is not None):
        flag = "--image-latents" if args.image_latents else "--video" if args.video else "--condition-r"
        raise G.GenerationError(f"{flag} holds clean latent frames; {lm.path} takes its image through its {cc} "
                                "condition channels (Wan2.2 I2V-A14B): pass --image only")
    if far and args.condition_r is not None:
        raise G.GenerationError(f"--condition-r {args.condition_r} does not apply to a FAR checkpoint: its condition "
                                "frames are whole chunks, copied clean and prefilled into the KV cache at t = r = 0, "
                                "never stepped (anyflow.causal.sample_chunked); drop --condition-r")
    if not far and args.chunk_partition is not None:
        raise G.GenerationError(f"--chunk-partition {' '.join(map(str, args.chunk_partition))} applies to "
                                f"AnyFlow-FAR (causal) checkpoints only; {lm.path} is bidirectional (it samples all "
                                "latent frames at once): drop --chunk-partition")
    shift = args.shift if args.shift is not None else lm.shift
    log(f"model: {lm.kind} {lm.path}" + (f", adapter {lm.adapter!r}" if lm.adapter else "") + (" (EMA)" if lm.ema else "")
        + f", shift {shift:g}, TP {args.tensor_model_parallel_size}, CP {args.context_parallel_size}"
        + (", AnyFlow-FAR (chunk by chunk)" if far else ""))
    log(f"{'bf16' if args.bf16 else 'fp32'}, {lm.model.describe_kernels(device)}"
        + (", blocks compiled" + (" (CUDA graphs)" if args.cuda_graphs else "") if args.compile or args.cuda_graphs
           else "") + (f", adapter {lm.adapter!r} merged into the base weights" if lm.adapter else ""))
    index = G.dataset_index(args.data_path or lm.data_path)

    # 2. codec and sizes; the FAR chunk partition (checked before the text encoder loads)
    codec = G.resolve_codec(args.codec, args.vae, index, lm.pipeline_dir, lm.latent_channels)
    if codec is None and args.codec != "none":
        _refuse_video_sizes(args, "without a codec (none given, and the checkpoint records no dataset codec or VAE)")
    height, width, frames, latent_shape = G.video_size(codec, index, args.height, args.width, args.frames,
                                                       args.latent_shape)
    if codec is not None and args.latent_shape is not None and tuple(args.latent_shape) != tuple(latent_shape):
        raise G.GenerationError(f"--latent-shape {' '.join(map(str, args.latent_shape))} does not apply with the "
                                f"{codec.name} codec: the latent size follows --frames/--height/--width ({frames} x "
                                f"{height} x {width} -> latents {list(latent_shape)}); drop it, or pass --codec none")
    if latent_shape is not None:
        pt, ph, pw = lm.model.config.patch_size  # a WanModel for training checkpoints and diffusers exports
        f_, _, h_, w_ = latent_shape
        if f_ % pt or h_ % ph or w_ % pw:
            flag = (f"--latent-shape {' '.join(map(str, latent_shape))}" if codec is None else
                    f"--frames/--height/--width {frames} {height} {width} (latents {list(latent_shape)})")
            raise G.GenerationError(f"{flag}: the latent F x H x W must be divisible by the model's patch size "
                                    f"{tuple(lm.model.config.patch_size)}")
    fps = None if codec is None else args.fps or int(round((index.get("video") or {}).get(
        "fps", codec.default_video["fps"])))
    num_latent_frames = (latent_shape[0] if latent_shape is not None else
                         G.load_noise(args.noise).shape[1] if args.noise else None)
    cp = None
    if far and num_latent_frames is not None:  # (no size at all: initial_noise names what to pass)
        source = (f" ({frames} video frames, {codec.name} codec)" if codec is not None else
                  f" (--latent-shape {' '.join(map(str, latent_shape))})" if latent_shape is not None else
                  f" (--noise {args.noise})")
        cp = G.resolve_chunk_partition(
            lm.model, num_latent_frames, args.chunk_partition, flag="--chunk-partition", source=source,
            frames_hint=lambda S: G.latent_frames_hint(codec, S, latent_shape, None if latent_shape else args.noise))
        log(f"FAR chunk partition {list(cp)}" + (" (the checkpoint's)" if args.chunk_partition is None else ""))

    # 3. text, 4. noise (prompt-major: prompt 0 video 0, prompt 0 video 1, ...)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    text, captions = G.prompt_embeddings(
        prompts, args.prompt_embeds, args.num_videos, lm.text_dim, log=log,
        encoder=lambda: G.resolve_text_encoder(args.text_encoder, args.text_encoder_path, args.tokenizer,
                                               args.text_max_length, index, lm.pipeline_dir, lm.text_dim, device))
    noise = G.initial_noise(text.shape[0], latent_shape, args.seed, args.noise, lm.latent_channels)

    # 5. condition frames (I2V / V2V; FAR: whole chunks)
    cond = y = None
    if args.image and cc:
        y = G.image_channel_condition(args.image, codec, height, width, frames, cc)
        log(f"image-to-video: {args.image} -> a {cc}-channel condition at every step (Wan2.2 I2V-A14B)")
    elif args.image:
        if cp is not None:
            G.check_condition_frames(1, noise.shape[1], cp, what=f"--image {args.image} gives 1 latent frame",
                                     flag="--image-latents")
        cond = G.image_condition(args.image, codec, height, width)
        log(f"image-to-video: {args.image} -> 1 clean latent frame")
    elif args.image_latents:
        cond = G.image_latents_condition(args.image_latents, noise.shape[1:], cp)
        log(f"image-to-video: {args.image_latents} -> {cond.shape[1]} clean latent frame(s)")
    elif args.video:
        cond = G.video_condition(args.video, codec, height, width, noise.shape[1], args.condition_frames, cp)
        log(f"video-to-video: {args.video} -> {cond.shape[1]} clean latent frame(s)")
    # the condition frames' r: bidirectional models with condition frames only (FAR refused it above)
    condition_r = (args.condition_r or "step") if cond is not None and not far else None
    not_applied = {}
    if args.condition_r is not None and condition_r is None:
        not_applied["--condition-r"] = "no condition frames (text-to-video)"

    # 6. sample
    log(f"sampling {noise.shape[0]} video(s) of latents {tuple(noise.shape[1:])} at N = {steps}")
    samples = G.sample_any_step(lm.model, noise.to(device), text.to(device, lm.model.dtype), steps, shift=shift,
                                condition_frames=None if cond is None else cond.to(device),
                                condition_r=condition_r or "step", batch_size=args.batch_size,
                                progress=rank == 0 and not args.no_progress, chunk_partition=cp,
                                channel_condition=None if y is None else y.to(device))
    if rank != 0:
        return 0

    # 7. write
    os.makedirs(args.output, exist_ok=True)
    paths = {}
    if args.save_latents:
        paths["latents"] = G.save_run_tensors(args.save_latents, samples, noise, text, cond)
    mode = ("image-to-video" if args.image or args.image_latents else "video-to-video" if args.video
            else "text-to-video")
    if codec is not None:
        src = os.path.basename(os.path.normpath(args.checkpoint))
        paths.update(G.write_videos(samples, codec, args.output, captions, fps=fps, min_seconds=args.min_seconds,
                                    title=f"AnyFlow{'-FAR' if far else ''} {src} ({mode}, shift {shift:g}, "
                                          f"seed {args.seed})"))
    else:
        log("no codec: latents only (--save-latents FILE keeps them)")
    paths["record"] = os.path.join(args.output, "generation.json")
    record = {"checkpoint": os.path.abspath(args.checkpoint), "kind": lm.kind, "adapter": lm.adapter, "ema": lm.ema,
              "far": far, "mode": mode, "steps": steps, "shift": shift, "seed": None if args.noise else args.seed,
              "noise": args.noise, "prompt_embeds": args.prompt_embeds, "prompts": captions,
              "latent_shape": list(noise.shape[1:]), "height": height, "width": width, "frames": frames, "fps": fps,
              "codec": codec.name if codec is not None else None, "image": args.image,
              "image_latents": args.image_latents, "video": args.video,
              "chunk_partition": None if cp is None else list(cp),
              "chunk_partition_from": (None if cp is None else "checkpoint" if args.chunk_partition is None
                                       else "argument"),
              "condition_r": condition_r, "condition_frames": None if cond is None else int(cond.shape[1]),
              "not_applied": not_applied, "tensor_model_parallel_size": args.tensor_model_parallel_size,
              "context_parallel_size": args.context_parallel_size, "bf16": args.bf16,
              "attention_impl": args.attention_impl, "compile": bool(args.compile or args.cuda_graphs),
              "cuda_graphs": args.cuda_graphs, "outputs": paths, "command": " ".join(sys.argv)}
    with open(paths["record"], "w") as f:
        json.dump(record, f, indent=1)
    log("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # any other user error (a damaged checkpoint, a full disk): one line, exit 2
