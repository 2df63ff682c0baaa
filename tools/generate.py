#!/usr/bin/env python
"""Generate videos with an AnyFlow student at any number of steps.

    python tools/generate.py --checkpoint outputs/tiny/ckpt/stage2 --ema --prompt "a rabbit in the grass" \
        --steps 1 2 4 8 --output outputs/tiny/generate
    python tools/generate.py --checkpoint export/anyflow-pipeline --prompt "..." --steps 4 --output out/
    torchrun --nproc_per_node 4 tools/generate.py --checkpoint ckpt/stage2 --tensor-model-parallel-size 4 ...

Source: a training checkpoint of any stage (the ``generator`` adapter is merged when present; ``--adapter``,
``--ema``) or a diffusers export (``tools/convert_to_hf.py``; a transformer or a full pipeline directory).
Text: ``--prompt`` (encoded with the run's text encoder: umT5 for Wan, MiniLM for the tiny presets) or
``--prompt-embeds FILE``. Image-to-video: ``--image`` (the first latent frame held clean);
video-to-video: ``--video`` (a clean prefix of latent frames, from a video file or a safetensors of
latents); condition frames follow diffusers' ``AnyFlowPipeline`` (t = 0, r = the step's r).
Defaults (codec, text encoder, video size, fps, time shift) come from the dataset and arguments the
checkpoint recorded, or from the pipeline's components.

Writes into ``--output``: ``steps_<N>.mp4`` per step count (labelled grid, one column per sample, looped
to >= 4 s), ``contact_sheet.png`` (rows = step counts, columns = prompts) and ``generation.json`` (the
settings and paths). ``--save-latents FILE`` writes the final latents per N with the noise and prompt
embeddings, which ``--noise FILE --prompt-embeds FILE`` read back to reproduce a run exactly.
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
    g.add_argument("--bf16", action="store_true", help="bf16 weights (times stay float32, the update float64)")
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
    g.add_argument("--codec", default=None, help="pixel, wan-vae or none (latents only); default: the dataset's")
    g.add_argument("--vae", default=None, help="Wan VAE directory (diffusers AutoencoderKLWan)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--frames", type=int, default=None, help="video frames (Wan VAE: 4k + 1)")
    g.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("F", "C", "H", "W"),
                   help="latent size when there is no codec (--codec none)")
    g.add_argument("--fps", type=int, default=None)
    g.add_argument("--image", default=None, help="image-to-video: the first frame (PNG / JPEG of --width x --height)")
    g.add_argument("--video", default=None, help="video-to-video: a clip (or safetensors 'latents') whose latent "
                                                 "frames are kept as a clean prefix")
    g.add_argument("--condition-frames", type=int, default=None, help="--video: how many latent frames to keep")
    g.add_argument("--condition-r", choices=["step", "zero"], default="step",
                   help="r fed for condition frames: the step's r (diffusers AnyFlowPipeline) or 0")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_anyflow.anyflow.generation import GenerationError

    try:
        return run(args)
    except (GenerationError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2


def run(args):
    import torch
    import torch.distributed as dist

    from megatron_anyflow.anyflow import generation as G
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat

    steps = G.check_steps(args.steps)
    if args.image and args.video:
        raise G.GenerationError("give --image (image-to-video) or --video (video-to-video), not both")
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
                      bf16=args.bf16, device=device)
    shift = args.shift if args.shift is not None else lm.shift
    log(f"model: {lm.kind} {lm.path}" + (f", adapter {lm.adapter!r}" if lm.adapter else "") + (" (EMA)" if lm.ema else "")
        + f", shift {shift:g}, TP {args.tensor_model_parallel_size}, CP {args.context_parallel_size}")
    index = G.dataset_index(args.data_path or lm.data_path)

    # 2. codec and sizes
    codec = G.resolve_codec(args.codec, args.vae, index, lm.pipeline_dir, lm.in_channels)
    height, width, frames, latent_shape = G.video_size(codec, index, args.height, args.width, args.frames,
                                                       args.latent_shape)
    wan = codec is not None and codec.name == "wan-vae"
    fps = args.fps or int(round((index.get("video") or {}).get("fps", 16 if wan else 8)))

    # 3. text, 4. noise (prompt-major: prompt 0 video 0, prompt 0 video 1, ...)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip()]
    text, captions = G.prompt_embeddings(
        prompts, args.prompt_embeds, args.num_videos, lm.text_dim, log=log,
        encoder=lambda: G.resolve_text_encoder(args.text_encoder, args.text_encoder_path, args.tokenizer,
                                               args.text_max_length, index, lm.pipeline_dir, lm.text_dim, device))
    noise = G.initial_noise(text.shape[0], latent_shape, args.seed, args.noise, lm.in_channels)

    # 5. condition frames (I2V / V2V)
    cond = None
    if args.image:
        cond = G.image_condition(args.image, codec, height, width)
        log(f"image-to-video: {args.image} -> 1 clean latent frame")
    elif args.video:
        cond = G.video_condition(args.video, codec, height, width, noise.shape[1], args.condition_frames)
        log(f"video-to-video: {args.video} -> {cond.shape[1]} clean latent frame(s)")

    # 6. sample
    log(f"sampling {noise.shape[0]} video(s) of latents {tuple(noise.shape[1:])} at N = {steps}")
    samples = G.sample_any_step(lm.model, noise.to(device), text.to(device, lm.model.dtype), steps, shift=shift,
                                condition_frames=None if cond is None else cond.to(device),
                                condition_r=args.condition_r, batch_size=args.batch_size,
                                progress=rank == 0 and not args.no_progress)
    if rank != 0:
        return 0

    # 7. write
    os.makedirs(args.output, exist_ok=True)
    paths = {}
    if args.save_latents:
        paths["latents"] = G.save_run_tensors(args.save_latents, samples, noise, text, cond)
    mode = "image-to-video" if args.image else "video-to-video" if args.video else "text-to-video"
    if codec is not None:
        src = os.path.basename(os.path.normpath(args.checkpoint))
        paths.update(G.write_videos(samples, codec, args.output, captions, fps=fps, min_seconds=args.min_seconds,
                                    title=f"AnyFlow {src} ({mode}, shift {shift:g}, seed {args.seed})"))
    else:
        log("no codec: latents only (--save-latents FILE keeps them)")
    paths["record"] = os.path.join(args.output, "generation.json")
    record = {"checkpoint": os.path.abspath(args.checkpoint), "kind": lm.kind, "adapter": lm.adapter, "ema": lm.ema,
              "mode": mode, "steps": steps, "shift": shift, "seed": None if args.noise else args.seed,
              "noise": args.noise, "prompt_embeds": args.prompt_embeds, "prompts": captions,
              "latent_shape": list(noise.shape[1:]), "height": height, "width": width, "frames": frames, "fps": fps,
              "codec": codec.name if codec is not None else None, "image": args.image, "video": args.video,
              "condition_r": args.condition_r, "condition_frames": None if cond is None else int(cond.shape[1]),
              "tensor_model_parallel_size": args.tensor_model_parallel_size,
              "context_parallel_size": args.context_parallel_size, "outputs": paths, "command": " ".join(sys.argv)}
    with open(paths["record"], "w") as f:
        json.dump(record, f, indent=1)
    log("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
