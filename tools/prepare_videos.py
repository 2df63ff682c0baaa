#!/usr/bin/env python
"""Transcode videos so DALI's CPU decoder can read them (VP9 in .webm, or MJPEG in .avi), and probe videos.

DALI's CPU video decoder reads VP8 / VP9 / MJPEG only; H.264, HEVC, MPEG-4 and AV1 need its GPU
decoder. This tool re-encodes with PyAV (FFmpeg)::

    python tools/prepare_videos.py --transcode IN OUT [--fps 16] [--max-frames 81] [--scale 0.5]
    python tools/prepare_videos.py --probe PATH...

``IN`` is a video file or a folder (searched recursively; the folder structure is mirrored under ``OUT``).
For a single file, ``OUT`` is the output file if it ends in .webm / .avi, otherwise a folder. Outputs
are written to a temporary name and renamed when complete, so an interrupted run is resumed by running
the same command again: finished outputs are skipped (``--overwrite`` redoes them).

Codec: VP9 (libvpx-vp9, realtime speed, constant quality ``--crf``) in .webm when the installed PyAV /
FFmpeg can encode it, else MJPEG in .avi (``--codec`` forces one). ``--fps`` resamples by time with the
same rule as the DALI pipeline (output frame k = source frame round(k * src_fps / fps)); ``--max-frames``
caps the output length; ``--scale`` multiplies both sides (rounded to even numbers, for yuv420p).
Exit status 1 when some inputs failed (each is reported; the others are still transcoded).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from fractions import Fraction
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anyflow.data.video import CPU_CODECS, VIDEO_EXTENSIONS, probe_video  # noqa: E402

OUTPUT_EXT = {"vp9": ".webm", "mjpeg": ".avi"}


def encoder_available(name: str) -> bool:
    """Whether PyAV's FFmpeg has an encoder called ``name`` (e.g. "libvpx-vp9", "mjpeg")."""
    import av

    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def pick_codec(requested: str = "auto") -> str:
    """"vp9" if libvpx-vp9 can encode here (or requested), else "mjpeg"."""
    if requested == "auto":
        return "vp9" if encoder_available("libvpx-vp9") else "mjpeg"
    if requested == "vp9" and not encoder_available("libvpx-vp9"):
        raise RuntimeError("this PyAV/FFmpeg build has no libvpx-vp9 encoder; use --codec mjpeg")
    return requested


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def transcode(src: str, dst: str, codec: str = "vp9", fps: Optional[float] = None, max_frames: Optional[int] = None,
              scale: float = 1.0, crf: int = 30) -> Tuple[int, float]:
    """Re-encode ``src`` to ``dst`` (written to a temporary file, renamed when complete).

    Returns (frames written, output fps). Raises ValueError for an unreadable input or empty output.
    """
    import av

    tmp = f"{os.path.splitext(dst)[0]}.tmp{os.getpid()}{os.path.splitext(dst)[1]}"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    written = 0
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                raise ValueError(f"{src}: no video stream")
            ist = inp.streams.video[0]
            ist.thread_type = "AUTO"
            src_rate = ist.average_rate or ist.guessed_rate
            if not src_rate:
                raise ValueError(f"{src}: unknown frame rate")
            src_fps = float(src_rate)
            out_rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(src_rate).limit_denominator(1001)
            step = src_fps / float(out_rate)
            w, h = _even(ist.codec_context.width * scale), _even(ist.codec_context.height * scale)
            with av.open(tmp, "w") as out:
                ost = out.add_stream("libvpx-vp9" if codec == "vp9" else "mjpeg", rate=out_rate)
                ost.width, ost.height = w, h
                tb = Fraction(1, 1) / out_rate  # fixed: the muxer may change ost.time_base (webm: 1/1000)
                ost.time_base = tb
                if codec == "vp9":
                    ost.pix_fmt = "yuv420p"
                    ost.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b:v": "0",
                                   "row-mt": "1"}
                else:
                    ost.pix_fmt = "yuvj420p"
                    ost.bit_rate = max(2_000_000, 12 * w * h * int(math.ceil(float(out_rate))))
                pix = ost.pix_fmt
                out_range = 1 if codec == "vp9" else 2  # AVCOL_RANGE_MPEG (limited) / AVCOL_RANGE_JPEG (full)
                k = 0  # next output frame; it shows source frame floor(k * step + 0.5)
                for i, frame in enumerate(inp.decode(ist)):
                    if max_frames is not None and k >= max_frames:
                        break
                    while int(math.floor(k * step + 0.5)) == i and (max_frames is None or k < max_frames):
                        # via RGB: swscale then honours the source colour range (MJPEG input is full-range)
                        rgb = frame.reformat(width=w, height=h, format="rgb24")
                        # PyAV carries the input's colour-range tag to later conversions: a full-range (JPEG)
                        # input would make swscale write full-range YUV into a limited-range VP9 stream
                        rgb.color_range = out_range
                        f = rgb.reformat(format=pix)
                        f.color_range = out_range
                        f.pts, f.time_base = k, tb
                        for p in ost.encode(f):
                            out.mux(p)
                        k += 1
                for p in ost.encode():
                    out.mux(p)
                written = k
        if written == 0:
            raise ValueError(f"{src}: no frames decoded")
        os.replace(tmp, dst)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"{src}: {type(e).__name__}: {e}") from None
    return written, float(out_rate)


def plan(src: str, dst: str, codec: str) -> List[Tuple[str, str]]:
    """(input, output) pairs: a folder is searched recursively and mirrored; a file maps to a file."""
    ext = OUTPUT_EXT[codec]
    if os.path.isdir(src):
        pairs = []
        for root, _, names in os.walk(src):
            for n in sorted(names):
                if n.lower().endswith(VIDEO_EXTENSIONS) and ".tmp" not in n:
                    p = os.path.join(root, n)
                    rel = os.path.splitext(os.path.relpath(p, src))[0] + ext
                    pairs.append((p, os.path.join(dst, rel)))
        return sorted(pairs)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist")
    if dst.lower().endswith((".webm", ".avi", ".mkv")):
        return [(src, dst)]
    return [(src, os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ext))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transcode", nargs=2, metavar=("IN", "OUT"), help="re-encode a file or a folder")
    ap.add_argument("--probe", nargs="+", metavar="PATH", help="print codec / fps / frames of videos")
    ap.add_argument("--codec", choices=["auto", "vp9", "mjpeg"], default="auto")
    ap.add_argument("--fps", type=float, default=None, help="output frame rate (default: keep the source's)")
    ap.add_argument("--max-frames", type=int, default=None, help="keep at most this many output frames")
    ap.add_argument("--scale", type=float, default=1.0, help="resize factor for both sides (default 1)")
    ap.add_argument("--crf", type=int, default=30, help="VP9 constant quality (lower is better; default 30)")
    ap.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.transcode and not args.probe:
        ap.error("give --transcode IN OUT or --probe PATH...")
    if args.scale <= 0 or (args.fps is not None and args.fps <= 0) or (args.max_frames is not None and args.max_frames < 1):
        ap.error("--scale and --fps must be positive, --max-frames >= 1")

    if args.probe:
        for p in args.probe:
            try:
                info = probe_video(p)
                ok = "yes" if info.codec in CPU_CODECS else "no (transcode it)"
                print(f"{p}: codec {info.codec}, {info.width}x{info.height}, {info.fps:g} fps, "
                      f"{info.num_frames} frames; DALI CPU decoder: {ok}")
            except ValueError as e:
                print(f"{p}: unreadable: {e}")
        if not args.transcode:
            return 0

    from tqdm import tqdm

    codec = pick_codec(args.codec)
    src, dst = args.transcode
    pairs = plan(src, dst, codec)
    if not pairs:
        print(f"no videos found in {src}", file=sys.stderr)
        return 1
    failed, done, skipped = [], 0, 0
    bar = tqdm(pairs, desc=f"transcode -> {codec}", unit="video", disable=args.quiet)
    for i, o in bar:
        bar.set_postfix_str(os.path.basename(i))
        if os.path.isfile(o) and not args.overwrite:
            skipped += 1
            continue
        try:
            transcode(i, o, codec=codec, fps=args.fps, max_frames=args.max_frames, scale=args.scale, crf=args.crf)
            done += 1
        except ValueError as e:
            failed.append(str(e))
            tqdm.write(f"FAILED {e}", file=sys.stderr)
    print(f"transcoded {done}, already done {skipped}, failed {len(failed)} ({codec}, output {dst})")
    for f in failed:
        print(f"  failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
