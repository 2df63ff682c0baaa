#!/usr/bin/env python
"""Videos (+ captions) or WebDataset shards -> a precomputed-latent dataset for ``LatentDataset``.

Writes the ``anyflow-latents-v1`` format of ``megatron_anyflow/data/latent_dataset.py``::

    OUTPUT/shard_00000.safetensors   "latents" [n, f, c, h, w] float32 (codec-normalised), "text" [n, L, d] float32
    OUTPUT/negative.safetensors      "text" [1, L, d]: the negative prompt's embedding
    OUTPUT/index.json                written last (atomically): format, counts, shapes, shard list with each
                                     sample's source / start frame / caption, codec and text-encoder
                                     parameters, captions, skipped videos, the run configuration
    OUTPUT/progress.json             shards finished so far (resume state); OUTPUT/probe_cache.json

Examples::

    # tiny preset: pixel codec (4x4 space-to-depth -> 48 channels) + MiniLM text encoder (L 32, d 384)
    python tools/prepare_dataset.py --input clips/ --captions examples/assets/skvideo_captions.json \\
        --output data/tiny --codec pixel --text-encoder minilm --num-frames 17 --height 64 --width 96 \\
        --clips-per-video 8
    # Wan2.1: its VAE and umT5 (local directories of the diffusers checkpoint)
    python tools/prepare_dataset.py --input shards/ --output data/wan --codec wan-vae \\
        --vae Wan2.1-T2V-1.3B-Diffusers/vae --text-encoder umt5 \\
        --text-encoder-path Wan2.1-T2V-1.3B-Diffusers/text_encoder
    # Wan2.2 TI2V-5B: its VAE (48 channels, 16x space, 4x time) and umT5, at its 24 fps, 704 x 1280
    python tools/prepare_dataset.py --input shards/ --output data/wan22 --codec wan2.2-vae \
        --vae Wan2.2-TI2V-5B-Diffusers/vae --text-encoder umt5 \
        --text-encoder-path Wan2.2-TI2V-5B-Diffusers/text_encoder --num-frames 121 --fps 24 --height 704 --width 1280

Videos are read by the DALI pipeline (``megatron_anyflow.data.video``; H.264 etc. must be transcoded
for CPU decoding: ``tools/prepare_videos.py``). ``--clips-per-video K`` takes K windows per video
(``--clip-sampling strided``: evenly spaced; ``random``: seeded by ``--seed``). Samples are written in
input order (training shuffles). Re-running the same command resumes: shards listed in progress.json
are kept and the pipeline continues at the sample after the last one; a different configuration in the
same output folder is refused unless ``--overwrite``. Corrupt, truncated or too-short videos are
skipped and listed at the end (and in index.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_anyflow.data.latent_dataset import FORMAT  # noqa: E402

PROGRESS = "progress.json"
INDEX = "index.json"
NEGATIVE = "negative.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", nargs="+", required=True,
                    help="video files, folders of videos, WebDataset .tar shards or folders of them")
    ap.add_argument("--captions", default=None, help="captions file (JSON or CSV: file -> caption) for plain videos")
    ap.add_argument("--output", required=True, help="dataset folder to write")
    ap.add_argument("--codec", choices=["pixel", "wan-vae", "wan2.2-vae"], default="pixel",
                    help="pixel (space-to-depth), wan-vae (Wan2.1 VAE: 16 channels, 8x space) or wan2.2-vae (Wan2.2 "
                         "TI2V-5B VAE: 48 channels, 16x space); both VAEs compress time 4x")
    ap.add_argument("--i2v-condition", action="store_true",
                    help="also store each clip's image condition for models that read one through input channels "
                         "(Wan2.2 I2V-A14B: the mask and the VAE latents of [frame 0, zeros], 20 channels; "
                         "--codec wan-vae)")
    ap.add_argument("--vae", default=None, help="diffusers AutoencoderKLWan directory (--codec wan-vae / wan2.2-vae)")
    ap.add_argument("--space-to-depth", type=int, default=4, help="pixel codec block size (default 4)")
    ap.add_argument("--text-encoder", choices=["minilm", "umt5"], default="minilm")
    ap.add_argument("--text-encoder-path", default=None, help="umT5 directory (--text-encoder umt5)")
    ap.add_argument("--text-max-length", type=int, default=None, help="tokens per prompt (minilm 32, umt5 512)")
    ap.add_argument("--negative-prompt", default=None,
                    help="default: Wan2.1's negative prompt (Chinese for umt5, English for minilm)")
    ap.add_argument("--num-frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    ap.add_argument("--fps", type=float, default=None,
                    help="clip frame rate (default 16; 24 with --codec wan2.2-vae, Wan2.2 TI2V-5B's rate)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--clips-per-video", type=int, default=1)
    ap.add_argument("--clip-sampling", choices=["strided", "random"], default="strided")
    ap.add_argument("--samples-per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="clips decoded and encoded together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="decoding, codec and text encoder device (auto: GPU if available)")
    ap.add_argument("--num-threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--stop-after-shards", type=int, default=None,
                    help="write at most this many new shards, then stop (resumable; for chunked runs)")
    ap.add_argument("--overwrite", action="store_true", help="discard an existing dataset / progress in --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.samples_per_shard < 1 or args.batch_size < 1 or args.clips_per_video < 1:
        ap.error("--samples-per-shard, --batch-size and --clips-per-video must be >= 1")
    # Checked here, before any model is loaded, so a typo costs a second, not an encoder load.
    for path in args.input:
        if not os.path.exists(path):
            ap.error(f"--input {path}: no such file or folder")
    if args.num_frames < 1 or args.num_frames % 4 != 1:
        ap.error(f"--num-frames {args.num_frames}: must be 4k+1 (1, 5, 9, ..., 81), so the Wan VAE's 4x temporal "
                 "compression gives whole latent frames")
    from megatron_anyflow.data.codecs import CODECS, VAE_CODECS

    if args.fps is None:  # a VAE's models' own rate (Wan2.1 16, Wan2.2 24); the pixel codec keeps 16
        args.fps = float(CODECS[args.codec].default_video["fps"]) if args.codec in VAE_CODECS else 16.0
    if not (args.fps > 0 and args.fps < float("inf")):
        ap.error(f"--fps {args.fps}: must be a positive number")
    # The VAEs' spatial compression (Wan2.1 8x, Wan2.2 16x), checked again against the loaded VAE's config.
    factor = args.space_to_depth if args.codec == "pixel" else CODECS[args.codec].spatial
    if args.space_to_depth < 1:
        ap.error(f"--space-to-depth {args.space_to_depth}: must be >= 1")
    for name in ("height", "width"):
        val = getattr(args, name)
        if val < factor or val % factor:
            ap.error(f"--{name} {val}: must be a positive multiple of {factor} (the {args.codec} codec's spatial "
                     f"compression), e.g. {max(factor, val // factor * factor)} or {(val // factor + 1) * factor}")
    return args


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _atomic_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _file_hash(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_config(args, codec, text_encoder, negative_prompt: str) -> dict:
    """What determines the dataset's content; a resumed run must match it exactly."""
    cc = codec.config()
    cc.pop("latents_mean", None), cc.pop("latents_std", None)
    return {"input": [os.path.abspath(p) for p in args.input],
            "captions": os.path.abspath(args.captions) if args.captions else None,
            "captions_sha256": _file_hash(args.captions), "codec": cc, "text_encoder": text_encoder.config(),
            "negative_prompt": negative_prompt, "num_frames": args.num_frames, "fps": args.fps,
            "height": args.height, "width": args.width, "clips_per_video": args.clips_per_video,
            "clip_sampling": args.clip_sampling, "seed": args.seed, "samples_per_shard": args.samples_per_shard,
            # recorded only when set, so that datasets prepared before the option keep their configuration
            **({"i2v_condition": "wan2.2-i2v"} if getattr(args, "i2v_condition", False) else {})}


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name == "gpu" else "cpu"


def prepare(args: argparse.Namespace, codec=None, text_encoder=None) -> dict:
    """Run (or resume) the preparation; returns a summary dict.

    ``codec`` / ``text_encoder`` may be passed pre-built (tests reuse one); otherwise they are built from
    ``args``. Summary keys: "status" ("complete", "already_complete", "stopped"), "num_samples",
    "new_shards", "skipped" (list of {"path", "reason"}), "output".

    Raises:
        SystemExit: the output holds another configuration (without --overwrite), the inputs changed
            under an interrupted run, or no usable clip was found.
    """
    from tqdm import tqdm

    from megatron_anyflow.data.channel_condition import encode_i2v_condition
    from megatron_anyflow.data.codecs import build_codec
    from megatron_anyflow.data.text import build_text_encoder
    from megatron_anyflow.data.video import VideoClipPipeline, validate_num_frames

    validate_num_frames(args.num_frames)
    out = args.output
    os.makedirs(out, exist_ok=True)
    device = _device(args.device)
    codec = codec or build_codec(args.codec, args.vae, args.space_to_depth, device=device)
    text_encoder = text_encoder or build_text_encoder(args.text_encoder, args.text_encoder_path,
                                                      args.text_max_length, device=device)
    negative_prompt = args.negative_prompt if args.negative_prompt is not None else text_encoder.default_negative_prompt
    latent_shape = list(codec.latent_shape(args.num_frames, args.height, args.width))
    i2v = bool(getattr(args, "i2v_condition", False))
    if i2v and getattr(codec, "name", None) != "wan-vae":
        raise SystemExit(f"--i2v-condition: the image condition of Wan2.2 I2V-A14B is made by the Wan2.1 VAE "
                         f"(--codec wan-vae --vae DIR); got --codec {getattr(codec, 'name', args.codec)}")
    cfg = run_config(args, codec, text_encoder, negative_prompt)
    index_path, progress_path = os.path.join(out, INDEX), os.path.join(out, PROGRESS)

    if args.overwrite:
        for n in os.listdir(out):
            if n in (INDEX, PROGRESS, NEGATIVE, "probe_cache.json") or (n.startswith("shard_") and n.endswith(".safetensors")):
                os.remove(os.path.join(out, n))
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("config") == cfg:
            print(f"{out}: already complete ({index['num_samples']} samples); nothing to do")
            return {"status": "already_complete", "num_samples": index["num_samples"], "new_shards": 0,
                    "skipped": index.get("skipped", []), "output": out}
        raise SystemExit(f"{out} holds a dataset prepared with another configuration; use another --output "
                         f"or --overwrite")
    progress = {"config": cfg, "shards": [], "skipped": []}
    if os.path.isfile(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            progress = json.load(f)
        if progress.get("config") != cfg:
            raise SystemExit(f"{out} holds an interrupted run with another configuration; use another --output "
                             f"or --overwrite")
        missing = [s["file"] for s in progress["shards"] if not os.path.isfile(os.path.join(out, s["file"]))]
        if missing:
            raise SystemExit(f"{out}: shards {missing} listed in {PROGRESS} are missing; rerun with --overwrite")

    pipe = VideoClipPipeline(args.input, args.captions, num_frames=args.num_frames, fps=args.fps, height=args.height,
                             width=args.width, batch_size=args.batch_size, seed=args.seed, shuffle=False,
                             clips_per_video=args.clips_per_video, clip_sampling=args.clip_sampling,
                             device=args.device, num_threads=args.num_threads,
                             probe_cache=os.path.join(out, "probe_cache.json"))
    planned = len(pipe)
    if progress.get("num_planned", planned) != planned:
        raise SystemExit(f"{out}: the inputs changed since the interrupted run ({progress['num_planned']} clips "
                         f"planned then, {planned} now); rerun with --overwrite")
    progress["num_planned"] = planned
    if planned == 0:
        _report_skipped(pipe.skipped)
        raise SystemExit("no usable clips in the input (all videos skipped)")
    start = progress["shards"][-1]["end_position"] if progress["shards"] else 0
    pipe.load_state_dict({"epoch": 0, "position": start})
    if start:
        print(f"resuming after {len(progress['shards'])} shard(s) ({start}/{planned} clips done)")

    text_cache: Dict[str, torch.Tensor] = {}

    def embed(captions: List[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in text_cache})
        if new:
            for c, e in zip(new, text_encoder.encode(new)):
                text_cache[c] = e
        return torch.stack([text_cache[c] for c in captions])

    def merge_skipped():
        seen = {(s["path"], s["reason"]) for s in progress["skipped"]}
        for s in pipe.skipped:
            if s.stage == "decode" and (s.path, s.reason) not in seen:
                progress["skipped"].append({"path": s.path, "reason": s.reason, "stage": s.stage})
                seen.add((s.path, s.reason))

    def write_shard(items) -> None:
        k = len(progress["shards"])
        name = f"shard_{k:05d}.safetensors"
        fields = {"latents": torch.stack([it[0] for it in items]), "text": torch.stack([it[1] for it in items])}
        if items[0][3] is not None:
            fields["condition"] = torch.stack([it[3] for it in items])
        _atomic_safetensors(os.path.join(out, name), fields)
        progress["shards"].append({"file": name, "num_samples": len(items), "end_position": items[-1][2]["position"] + 1,
                                   "samples": [{kk: v for kk, v in it[2].items() if kk != "position"} for it in items]})
        merge_skipped()
        _atomic_json(progress_path, progress)

    pending = []
    new_shards, stopped = 0, False
    t0 = time.time()
    bar = tqdm(total=planned, initial=start, unit="clip", desc="prepare", disable=args.quiet)
    for batch in pipe:
        lat = codec.encode(batch.video).float().cpu()
        if list(lat.shape[1:]) != latent_shape:
            raise RuntimeError(f"codec produced latents {list(lat.shape[1:])}, expected {latent_shape}")
        txt = embed(batch.captions)
        # Wan2.2 I2V-A14B: the clip's frame 0 as the condition image, encoded as the pipeline does
        cond = encode_i2v_condition(codec, batch.video[:, :, 0], args.num_frames).cpu() if i2v else None
        for j in range(lat.shape[0]):
            pending.append((lat[j].clone(), txt[j], {"key": batch.keys[j], "start_frame": batch.start_frames[j],
                                                      "caption": batch.captions[j], "position": batch.positions[j]},
                            None if cond is None else cond[j].clone()))
        bar.update(pipe.position - bar.n)
        while len(pending) >= args.samples_per_shard:
            write_shard(pending[:args.samples_per_shard])
            pending = pending[args.samples_per_shard:]
            new_shards += 1
            if args.stop_after_shards is not None and new_shards >= args.stop_after_shards:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    if stopped and (pending or progress["shards"][-1]["end_position"] < planned):
        print(f"stopped after {new_shards} new shard(s) ({progress['shards'][-1]['end_position']}/{planned} clips); "
              f"run the same command again to continue")
        return {"status": "stopped", "num_samples": sum(s["num_samples"] for s in progress["shards"]),
                "new_shards": new_shards, "skipped": progress["skipped"], "output": out}
    if pending:
        write_shard(pending)
        new_shards += 1
    merge_skipped()

    _atomic_safetensors(os.path.join(out, NEGATIVE), {"text": text_encoder.encode([negative_prompt])})
    skipped = [{"path": s.path, "reason": s.reason, "stage": s.stage} for s in pipe.skipped if s.stage == "probe"]
    skipped += progress["skipped"]
    shards = [{"file": s["file"], "num_samples": s["num_samples"], "samples": s["samples"]} for s in progress["shards"]]
    num_samples = sum(s["num_samples"] for s in shards)
    if num_samples == 0:
        _report_skipped(skipped)
        raise SystemExit("no clip could be decoded (all skipped)")
    captions = {}
    for s in shards:
        for smp in s["samples"]:
            captions[smp["key"]] = smp["caption"]
    index = {"format": FORMAT, "num_samples": num_samples, "latent_shape": latent_shape,
             "text_len": text_encoder.max_length, "text_dim": text_encoder.dim, "shards": shards,
             "negative": NEGATIVE, "negative_prompt": negative_prompt, "codec": codec.config(),
             "text_encoder": text_encoder.config(),
             "video": {"num_frames": args.num_frames, "fps": args.fps, "height": args.height, "width": args.width,
                       "clips_per_video": args.clips_per_video, "clip_sampling": args.clip_sampling,
                       "seed": args.seed, "layout": "latents [n, f, c, h, w] frame-major; video in [-1, 1]"},
             "captions": captions, "skipped": skipped, "config": cfg, "created_by": "tools/prepare_dataset.py"}
    if i2v:  # LatentDataset then reads (latents, text, condition) per sample
        index["condition"] = {"kind": "wan2.2-i2v", "channels": 4 + latent_shape[1]}
    _atomic_json(index_path, index)
    print(f"wrote {num_samples} samples in {len(shards)} shard(s) to {out} "
          f"(latents {latent_shape}, text [{text_encoder.max_length}, {text_encoder.dim}]) in {time.time() - t0:.1f}s")
    _report_skipped(skipped)
    return {"status": "complete", "num_samples": num_samples, "new_shards": new_shards, "skipped": skipped,
            "output": out}


def _report_skipped(skipped) -> None:
    skipped = [s if isinstance(s, dict) else {"path": s.path, "reason": s.reason} for s in skipped]
    if skipped:
        print(f"skipped {len(skipped)} video(s):")
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}")
    else:
        print("skipped 0 videos")


def main(argv=None) -> int:
    prepare(parse_args(argv))
    return 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
