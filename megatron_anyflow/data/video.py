"""The DALI video pipeline: videos (+ captions) or WebDataset shards -> clips ``[b, c, f, h, w]`` in [-1, 1].

Design (why it looks like this)
-------------------------------
DALI's file readers stop the whole pipeline on a bad file. To skip corrupt, truncated or too-short
videos without ever crashing mid-run, every video is **probed once up front** with PyAV (codec, frame
rate, frame count; results cached in memory and optionally in a JSON file keyed by size + mtime), the
unusable ones are set aside (logged with their path, counted in :attr:`VideoClipPipeline.skipped`), and
the good ones are **decoded by DALI**: the encoded bytes and the chosen frame indices are fed through
``fn.external_source`` into ``fn.decoders.video`` (``device="mixed"``, NVDEC, when CUDA is present;
``device="cpu"``, libavcodec, otherwise), then ``fn.resize`` and ``fn.crop_mirror_normalize``. Should
DALI still fail on a batch (a file that probed fine but does not decode), the batch is re-decoded one
sample at a time, the failing sample is skipped and counted, and the rest of the batch is served.

PyAV is only used to probe (and, in ``tools/prepare_videos.py``, to transcode); DALI is the decoder.

Clip definition
---------------
A clip is ``num_frames`` frames at ``fps`` frames per second (default 81 at 16 fps, Wan2.1's setting;
``num_frames`` must be ``4k + 1`` so the Wan VAE's 4x temporal compression gives whole latent frames).
Output frame ``k`` shows time ``k / fps`` after the clip start, so it is source frame
``start + round(k * src_fps / fps)`` (round half up; :func:`resample_indices`). Down-sampling drops
frames, up-sampling repeats them; a constant frame rate is assumed (the nominal ``average_rate``).
Frames are resized preserving aspect ratio so that they cover ``(height, width)`` (for a source with
the target's orientation this is "shorter side to the target", in general ``scale = max(H / h, W / w)``),
centre-cropped to ``(height, width)`` and scaled from uint8 to ``x / 127.5 - 1`` in [-1, 1].

Sharding, order and resume
--------------------------
The sample list (``clips_per_video`` windows per good video) is the same on every rank. Each epoch it is
permuted with a generator seeded by ``(seed, epoch)`` (unless ``shuffle=False``); data-parallel rank
``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` of that order, so ranks are disjoint and their
union is the whole list (rank sizes differ by at most one; ``even_shards=True`` drops the tail so all
ranks have the same count). :meth:`VideoClipPipeline.state_dict` records ``(epoch, position)``;
:meth:`VideoClipPipeline.load_state_dict` continues at exactly the same sample.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

#: Codecs the CPU backend of DALI's video decoder reads (libavcodec inside DALI).
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
#: Codecs the mixed (GPU, NVDEC) backend reads.
GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
#: File name endings treated as videos.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
TRANSCODE_HINT = "python tools/prepare_videos.py --transcode {src} OUT"


class UnsupportedCodecError(ValueError):
    """A video's codec cannot be decoded by the selected DALI backend (e.g. H.264 on the CPU)."""


def require_dali():
    """Import ``nvidia.dali`` (lazily) or raise an ImportError that says what to install."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without DALI
        raise ImportError(
            "NVIDIA DALI is required for the video pipeline: pip install nvidia-dali-cuda120 "
            "(or pip install -e .[data]); it also runs on CPU-only machines") from e
    return nvidia.dali


def _require_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover
        raise ImportError("PyAV is required to probe videos: pip install av (or pip install -e .[data])") from e
    return av


# ---------------------------------------------------------------------------------------------------------
# frame selection


def validate_num_frames(num_frames: int) -> int:
    """Check ``num_frames`` is ``4k + 1`` (1, 5, 9, ..., 81); return it. Raises ValueError otherwise."""
    if int(num_frames) != num_frames or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (e.g. 81, 33, 17, 9, 5, 1) so the Wan VAE's 4x temporal "
                         f"compression gives whole latent frames; got {num_frames}")
    return int(num_frames)


def resample_indices(num_frames: int, src_fps: float, target_fps: float, start: int = 0) -> List[int]:
    """Source frame indices of a clip resampled by time.

    Output frame ``k`` (k = 0 .. num_frames - 1) is shown at ``k / target_fps`` seconds after the clip
    start, so it is source frame ``start + floor(k * src_fps / target_fps + 0.5)`` (round half up, not
    Python's banker's rounding). Example: 30 fps -> 16 fps gives 0, 2, 4, 6, 8, 9, 11, 13, 15, ...;
    25 -> 16 gives 0, 2, 3, 5, 6, 8, 9, 11, 13, ...; 8 -> 16 repeats frames: 0, 1, 1, 2, 2, 3, ...

    Raises:
        ValueError: a non-positive frame rate or frame count.
    """
    if src_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got src {src_fps} target {target_fps}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    step = float(src_fps) / float(target_fps)
    return [int(start) + int(math.floor(k * step + 0.5)) for k in range(int(num_frames))]


def source_frames_needed(num_frames: int, src_fps: float, target_fps: float) -> int:
    """How many source frames one clip spans (last index + 1) at ``start = 0``."""
    return resample_indices(num_frames, src_fps, target_fps)[-1] + 1


def clip_starts(num_src_frames: int, needed: int, clips: int, mode: str = "strided",
                rng: Optional[random.Random] = None) -> List[int]:
    """Start frames of ``clips`` windows of ``needed`` source frames in a video of ``num_src_frames``.

    ``mode="strided"``: evenly spaced from the first to the last possible start
    (``round(i * max_start / (clips - 1))``; a single clip starts at 0). ``mode="random"``: uniform
    random starts from ``rng`` (deterministic for a seeded ``rng``), sorted. Windows may overlap when the
    video is short. Returns ``[]`` when the video is shorter than ``needed``.
    """
    if clips < 1:
        raise ValueError(f"clips per video must be >= 1, got {clips}")
    max_start = num_src_frames - needed
    if max_start < 0:
        return []
    if mode == "strided":
        if clips == 1:
            return [0]
        return [int(math.floor(i * max_start / (clips - 1) + 0.5)) for i in range(clips)]
    if mode == "random":
        rng = rng or random.Random(0)
        return sorted(rng.randint(0, max_start) for _ in range(clips))
    raise ValueError(f"clip sampling mode must be 'strided' or 'random', got {mode!r}")


def cover_size(src_h: int, src_w: int, height: int, width: int) -> Tuple[int, int]:
    """(h, w) after an aspect-preserving resize so the frame covers ``(height, width)`` (before the crop)."""
    scale = max(height / src_h, width / src_w)
    return max(height, int(round(src_h * scale))), max(width, int(round(src_w * scale)))


# ---------------------------------------------------------------------------------------------------------
# sources, captions and probing


@dataclass
class VideoSource:
    """One input video: a file, or a member of a WebDataset tar shard.

    ``key`` is unique: the file path, or ``"TAR::MEMBER"``. For a tar member, ``offset`` / ``size`` locate
    its bytes inside ``path`` (read directly, without unpacking).
    """

    key: str
    path: str
    caption: str = ""
    offset: Optional[int] = None
    size: Optional[int] = None

    def read_bytes(self) -> np.ndarray:
        """The encoded video as a 1-D uint8 array."""
        with open(self.path, "rb") as f:
            if self.offset is None:
                data = f.read()
            else:
                f.seek(self.offset)
                data = f.read(self.size)
        return np.frombuffer(data, dtype=np.uint8)

    def fingerprint(self) -> List[int]:
        st = os.stat(self.path)
        return [int(st.st_size), int(st.st_mtime_ns), int(self.offset or 0), int(self.size or 0)]


@dataclass
class VideoInfo:
    """What probing found: codec name (FFmpeg's, e.g. "vp9", "h264"), frame rate (frames / s), frame count,
    frame size in pixels."""

    codec: str
    fps: float
    num_frames: int
    width: int
    height: int


@dataclass
class SkippedVideo:
    """A video left out: its key (path), why, and when ("probe" up front or "decode" at run time)."""

    path: str
    reason: str
    stage: str = "probe"


def probe_video(src: Union[str, bytes, np.ndarray, VideoSource]) -> VideoInfo:
    """Probe a video with PyAV: codec, frame rate, frame count (counted by demuxing, not from the header),
    size. The first frame is decoded to check the stream really decodes.

    Raises:
        ValueError: the file cannot be opened, has no video stream, does not decode, has no frames, or is
            truncated (fewer packets than the container's duration implies).
    """
    av = _require_av()
    if isinstance(src, VideoSource):
        target = src.path if src.offset is None else io.BytesIO(src.read_bytes().tobytes())
    elif isinstance(src, (bytes, np.ndarray)):
        target = io.BytesIO(bytes(src))
    else:
        target = src
    try:
        with av.open(target) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            width, height = stream.codec_context.width, stream.codec_context.height
            header_frames = int(stream.frames or 0)
            # the video stream's own duration; the container's only when nothing else (audio) could be longer
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration and len(container.streams) == 1:
                duration = float(container.duration) / 1e6
            else:
                duration = 0.0
            count, decoded_first = 0, False
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                count += 1
                if not decoded_first:
                    for _ in packet.decode():
                        decoded_first = True
            if not decoded_first:  # a decoder with delay may only emit after flushing
                for _ in stream.codec_context.decode(None):
                    decoded_first = True
                    break
    except ValueError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
        raise ValueError(f"cannot read video: {type(e).__name__}: {e}") from None
    if count == 0 or not decoded_first:
        raise ValueError("no decodable frames")
    if fps <= 0:
        fps = count / duration if duration > 0 else 0.0
        if fps <= 0:
            raise ValueError("unknown frame rate")
    expected = max(header_frames, int(duration * fps) if duration > 0 else 0)
    if expected and count < expected - max(2, int(0.02 * expected)):
        raise ValueError(f"truncated: the container says ~{expected} frames, only {count} present")
    return VideoInfo(codec=codec, fps=fps, num_frames=count, width=width, height=height)


def load_captions(path: str) -> Dict[str, str]:
    """Read a captions file: file name -> caption.

    Accepted: JSON ``{"clip.mp4": "caption", ...}`` or ``[{"file": ..., "caption": ...}, ...]`` (keys
    "file" / "video" / "path" and "caption" / "text"); CSV with a header naming the same columns.

    Raises:
        ValueError: an unrecognised layout.
    """
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
        rows = data
    elif path.lower().endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
    else:
        raise ValueError(f"{path}: captions must be a .json or .csv file")
    out = {}
    for row in rows:
        name = next((row[k] for k in ("file", "video", "path", "filename") if k in row), None)
        text = next((row[k] for k in ("caption", "text", "prompt") if k in row), None)
        if name is None or text is None:
            raise ValueError(f"{path}: each row needs a file column (file/video/path) and a caption column "
                             f"(caption/text/prompt); got {sorted(row)}")
        out[str(name)] = str(text)
    return out


def _lookup_caption(captions: Dict[str, str], rel: str) -> Optional[str]:
    """Caption for a video by relative path, then file name, then file stem (so captions written for
    ``clip.mp4`` also match the transcoded ``clip.webm``)."""
    rel = rel.replace(os.sep, "/")
    base = os.path.basename(rel)
    for k in (rel, base):
        if k in captions:
            return captions[k]
    stem = os.path.splitext(base)[0]
    rel_stem = os.path.splitext(rel)[0]
    for k, v in captions.items():
        ks = os.path.splitext(k.replace(os.sep, "/"))[0]
        if ks in (rel_stem, stem):
            return v
    return None


def _wds_key(name: str) -> Tuple[str, str]:
    """WebDataset grouping: ``dir/sample.ext1.ext2`` -> key ``dir/sample``, extension ``ext1.ext2``."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def list_webdataset(tar_path: str) -> List[VideoSource]:
    """The videos of one WebDataset tar shard with their captions (``.json`` key "caption", or ``.txt``)."""
    groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        for m in members:
            key, ext = _wds_key(m.name)
            groups.setdefault(key, {})[ext] = m
        out = []
        for key, parts in groups.items():
            vid = next(((e, m) for e, m in parts.items() if ("." + e).endswith(VIDEO_EXTENSIONS)), None)
            if vid is None:
                continue
            caption = ""
            if "json" in parts:
                try:
                    meta = json.loads(tf.extractfile(parts["json"]).read().decode("utf-8"))
                    caption = str(meta.get("caption", meta.get("text", "")))
                except (ValueError, AttributeError):
                    logger.warning("%s: unreadable caption json for sample %s", tar_path, key)
            elif "txt" in parts:
                caption = tf.extractfile(parts["txt"]).read().decode("utf-8").strip()
            e, m = vid
            out.append(VideoSource(key=f"{tar_path}::{m.name}", path=tar_path, caption=caption,
                                   offset=m.offset_data, size=m.size))
    return out


def list_sources(inputs: Union[str, Sequence[str]], captions: Optional[Union[str, Dict[str, str]]] = None
                 ) -> List[VideoSource]:
    """Resolve inputs to a sorted list of :class:`VideoSource`.

    Each input is a video file, a WebDataset ``.tar`` shard, or a folder (searched recursively for videos
    and, if it holds no videos, for ``.tar`` shards). ``captions`` (a file for :func:`load_captions`, or
    a dict) gives captions for plain video files; WebDataset samples carry their own. A video without a
    caption gets "" (logged).

    Raises:
        FileNotFoundError: an input does not exist. ValueError: no videos found.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    cap = load_captions(captions) if isinstance(captions, str) else dict(captions or {})
    out: List[VideoSource] = []
    missing = []
    for inp in inputs:
        if not os.path.exists(inp):
            raise FileNotFoundError(f"input {inp} does not exist")
        files: List[Tuple[str, str]] = []  # (path, path relative to the input folder)
        tars: List[str] = []
        if os.path.isdir(inp):
            for root, _, names in os.walk(inp):
                for n in names:
                    p = os.path.join(root, n)
                    if n.lower().endswith(VIDEO_EXTENSIONS):
                        files.append((p, os.path.relpath(p, inp)))
                    elif n.lower().endswith(".tar"):
                        tars.append(p)
            if files:
                tars = []
        elif inp.lower().endswith(".tar"):
            tars = [inp]
        else:
            files = [(inp, os.path.basename(inp))]
        for p, rel in sorted(files):
            c = _lookup_caption(cap, rel)
            if c is None:
                missing.append(p)
                c = ""
            out.append(VideoSource(key=p, path=p, caption=c))
        for t in sorted(tars):
            out.extend(list_webdataset(t))
    if missing and cap:
        logger.warning("%d video(s) have no caption (using \"\"): %s", len(missing), ", ".join(missing[:10]))
    if not out:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) or WebDataset .tar shards found in {list(inputs)}")
    return out


class ProbeCache:
    """Probe results keyed by source key and fingerprint (size, mtime, tar offset); optional JSON file.

    A failed probe is cached too (as its error message), so a bad file is read once.
    """

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self._dirty = False
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f)
            except ValueError:
                logger.warning("probe cache %s is unreadable; starting a new one", path)

    def probe(self, src: VideoSource) -> Union[VideoInfo, str]:
        """VideoInfo, or the error message (str) for an unreadable video."""
        fp = src.fingerprint()
        e = self.entries.get(src.key)
        if e is not None and e.get("fingerprint") == fp:
            return VideoInfo(**e["info"]) if "info" in e else e["error"]
        try:
            info: Union[VideoInfo, str] = probe_video(src)
            self.entries[src.key] = {"fingerprint": fp, "info": asdict(info)}
        except ValueError as err:
            info = str(err)
            self.entries[src.key] = {"fingerprint": fp, "error": info}
        self._dirty = True
        return info

    def save(self):
        """Write the JSON file atomically (tmp + rename), if there is one and something changed."""
        if not (self.path and self._dirty):
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.path)
        self._dirty = False


# ---------------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class ClipSpec:
    """One sample: which video (index into ``sources``), its first source frame, the frame indices."""

    source: int
    start: int
    frames: List[int]
    out_size: Tuple[int, int]  # (h, w) after the covering resize, before the centre crop


@dataclass
class VideoBatch:
    """A decoded batch.

    ``video``: float32 ``[b, 3, f, h, w]`` in [-1, 1] (RGB; on the GPU when the pipeline decodes there);
    ``captions``, ``keys`` (source path or ``TAR::MEMBER``), ``start_frames`` (first source frame),
    ``positions`` (rank-local sample positions in this epoch), one entry per row. ``b`` can be smaller
    than the batch size at the end of an epoch or when a sample failed to decode.
    """

    video: "object"
    captions: List[str]
    keys: List[str]
    start_frames: List[int]
    positions: List[int]
    epoch: int = 0
    frame_indices: List[List[int]] = field(default_factory=list)


class VideoClipPipeline:
    """Videos -> batches of clips ``[b, 3, num_frames, height, width]`` float32 in [-1, 1], decoded by DALI.

    Args:
        inputs: video file(s), folder(s) of videos, WebDataset ``.tar`` shard(s) or folders of them
            (see :func:`list_sources`), or a list of :class:`VideoSource`.
        captions: captions file (JSON / CSV, file -> caption) or dict, for plain video files.
        num_frames: frames per clip, ``4k + 1`` (default 81).
        fps: target frame rate in frames / s (default 16); see :func:`resample_indices`.
        height, width: output frame size in pixels (resize to cover, then centre crop).
        batch_size: samples per batch.
        dp_rank, dp_size: data-parallel rank and world size; ranks get disjoint samples.
        seed: seeds the per-epoch order and random clip starts.
        shuffle: permute the samples each epoch (``False``: source order, then clip order).
        clips_per_video: windows taken from each video (:func:`clip_starts`).
        clip_sampling: "strided" (evenly spaced) or "random" (seeded) window starts.
        device: "auto" (GPU if CUDA is available), "gpu" or "cpu": DALI decoder backend ("mixed" / "cpu").
        device_id: CUDA device for "gpu" (default: the current torch device).
        num_threads: DALI CPU threads.
        probe_cache: JSON file caching probe results across runs (optional).
        on_unsupported: "error" (default) raises :class:`UnsupportedCodecError` for videos the backend
            cannot decode; "skip" skips and counts them instead.
        even_shards: drop the last ``len % dp_size`` samples each epoch so all ranks have equal counts.
        drop_last: drop a final batch smaller than ``batch_size``.

    Attributes:
        sources: all inputs. skipped: :class:`SkippedVideo` list (probe-time ones on every rank,
        decode-time ones on the rank that hit them). num_skipped: ``len(skipped)``.

    Raises:
        ValueError: bad ``num_frames`` / sizes / rank. UnsupportedCodecError: see ``on_unsupported``;
        the message names each file, its codec and the transcode command. ImportError: DALI or PyAV missing.
    """

    def __init__(self, inputs, captions=None, *, num_frames: int = 81, fps: float = 16.0, height: int = 480,
                 width: int = 832, batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, clips_per_video: int = 1, clip_sampling: str = "strided",
                 device: str = "auto", device_id: Optional[int] = None, num_threads: int = 2,
                 probe_cache: Optional[str] = None, on_unsupported: str = "error", even_shards: bool = False,
                 drop_last: bool = False):
        self.num_frames = validate_num_frames(num_frames)
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_unsupported not in ("error", "skip"):
            raise ValueError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
        self.fps, self.height, self.width = float(fps), int(height), int(width)
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.shuffle, self.even_shards, self.drop_last = shuffle, even_shards, drop_last
        self.clips_per_video, self.clip_sampling = clips_per_video, clip_sampling
        self.num_threads = num_threads
        require_dali()
        self.device = self._resolve_device(device)
        self.device_id = device_id
        self.codecs = GPU_CODECS if self.device == "gpu" else CPU_CODECS

        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], VideoSource):
            self.sources = list(inputs)
        else:
            self.sources = list_sources(inputs, captions)
        self.skipped: List[SkippedVideo] = []
        self.infos: Dict[int, VideoInfo] = {}
        self._plan(ProbeCache(probe_cache), on_unsupported)
        self.epoch, self.position = 0, 0
        self._pipe = None
        self._order_cache: Tuple[int, List[int]] = (-1, [])

    # -- setup --------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_device(device: str) -> str:
        if device not in ("auto", "cpu", "gpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "auto":
            try:
                import torch

                return "gpu" if torch.cuda.is_available() else "cpu"
            except ImportError:  # pragma: no cover
                return "cpu"
        return "gpu" if device in ("gpu", "cuda") else "cpu"

    def _plan(self, cache: ProbeCache, on_unsupported: str):
        unsupported = []
        self.samples: List[ClipSpec] = []
        for i, src in enumerate(self.sources):
            info = cache.probe(src)
            if isinstance(info, str):
                self._skip(src.key, f"corrupt or unreadable ({info})", "probe")
                continue
            if info.codec not in self.codecs:
                if on_unsupported == "error":
                    unsupported.append((src, info))
                else:
                    self._skip(src.key, f"codec {info.codec} not decodable by DALI's {self.device} decoder",
                               "probe")
                continue
            needed = source_frames_needed(self.num_frames, info.fps, self.fps)
            rng = random.Random(f"{self.seed}:{src.key}")
            starts = clip_starts(info.num_frames, needed, self.clips_per_video, self.clip_sampling, rng)
            if not starts:
                self._skip(src.key, f"too short: {self.num_frames} frames at {self.fps:g} fps need {needed} source "
                                    f"frames at {info.fps:g} fps, the video has {info.num_frames}", "probe")
                continue
            self.infos[i] = info
            out_size = cover_size(info.height, info.width, self.height, self.width)
            for s in starts:
                self.samples.append(ClipSpec(i, s, resample_indices(self.num_frames, info.fps, self.fps, s),
                                             out_size))
        cache.save()
        if unsupported:
            lines = [f"  {s.key}: codec {info.codec} -> {TRANSCODE_HINT.format(src=s.path)}" for s, info in unsupported]
            backend = ("DALI's CPU video decoder reads only " + ", ".join(sorted(CPU_CODECS)).upper()
                       if self.device == "cpu" else "DALI's GPU video decoder cannot read these codecs")
            raise UnsupportedCodecError(
                f"{len(unsupported)} video(s) cannot be decoded here ({backend}). Transcode them to VP9 "
                f"(or MJPEG) first, e.g. python tools/prepare_videos.py --transcode IN_DIR OUT_DIR:\n"
                + "\n".join(lines))
        if not self.samples:
            logger.warning("no usable clips: all %d video(s) were skipped", len(self.sources))

    def _skip(self, key: str, reason: str, stage: str):
        logger.warning("skipping video %s: %s", key, reason)
        self.skipped.append(SkippedVideo(key, reason, stage))

    @property
    def num_skipped(self) -> int:
        """How many videos were skipped so far (probe time + decode time)."""
        return len(self.skipped)

    # -- order, sharding, resume -----------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> List[int]:
        """Indices into :attr:`samples` this rank reads in ``epoch``, in order."""
        if self._order_cache[0] != epoch:
            n = len(self.samples)
            order = list(range(n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            if self.even_shards:
                order = order[: n - n % self.dp_size]
            self._order_cache = (epoch, order[self.dp_rank::self.dp_size])
        return self._order_cache[1]

    def __len__(self) -> int:
        """Samples this rank reads per epoch."""
        return len(self.epoch_order(self.epoch))

    def num_batches(self) -> int:
        n = len(self)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "num_samples", "dp_rank", "dp_size"}``: where the next batch starts."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": len(self.samples), "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict):
        """Continue at the sample recorded by :meth:`state_dict` (same inputs, seed and rank layout).

        Raises:
            ValueError: the state was saved with another seed, sample count or data-parallel layout.
        """
        for k in ("seed", "num_samples", "dp_size", "dp_rank"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                raise ValueError(f"cannot resume: state has {k}={state[k]}, this pipeline has {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # -- decoding ---------------------------------------------------------------------------------------

    def _build(self):
        dali = require_dali()
        from nvidia.dali import fn, types

        device_id = None
        if self.device == "gpu":
            import torch

            device_id = self.device_id if self.device_id is not None else torch.cuda.current_device()
        # one batch in flight: each run() decodes exactly the batch fed just before it
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                             prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            video = fn.decoders.video(encoded, frames=frames, device="mixed" if self.device == "gpu" else "cpu")
            video = fn.resize(video, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            video = fn.crop_mirror_normalize(video, crop=(self.height, self.width), crop_pos_x=0.5, crop_pos_y=0.5,
                                             mean=127.5, std=127.5, dtype=types.FLOAT, output_layout="CFHW")
            pipe.set_outputs(video)
        pipe.build()
        return pipe

    def _run(self, specs: List[ClipSpec], data: List[np.ndarray]) -> list:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", data)
        self._pipe.feed_input("frames", [np.asarray(s.frames, dtype=np.int32) for s in specs])
        self._pipe.feed_input("size", [np.asarray(s.out_size, dtype=np.float32) for s in specs])
        (out,) = self._pipe.run()
        return self._to_torch(out)

    def _to_torch(self, out) -> list:
        import torch

        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            res = []
            for i in range(len(out)):
                t = out[i]
                buf = torch.empty(tuple(t.shape()), dtype=torch.float32, device=torch.device("cuda", self._pipe.device_id))
                feed_ndarray(t, buf, cuda_stream=torch.cuda.current_stream(buf.device))
                res.append(buf)
            return res
        return [torch.from_numpy(np.array(out[i])) for i in range(len(out))]

    def _decode(self, specs: List[ClipSpec]) -> Tuple[list, List[int]]:
        """Decode ``specs``; returns (clips [3, f, h, w], indices into specs that succeeded)."""
        data, ok_idx = [], []
        for j, s in enumerate(specs):
            try:
                data.append(self.sources[s.source].read_bytes())
                ok_idx.append(j)
            except OSError as e:
                self._skip(self.sources[s.source].key, f"unreadable at decode time ({e})", "decode")
        specs_ok = [specs[j] for j in ok_idx]
        if not specs_ok:
            return [], []
        try:
            return self._run(specs_ok, data), ok_idx
        except Exception as batch_error:  # DALI raises RuntimeError; isolate the bad sample(s)
            logger.warning("DALI failed on a batch (%s); decoding its %d samples one by one",
                           str(batch_error).splitlines()[0] if str(batch_error) else type(batch_error).__name__,
                           len(specs_ok))
            self._pipe = None  # start from a fresh pipeline after an error
            clips, good = [], []
            for j, s, d in zip(ok_idx, specs_ok, data):
                try:
                    clips.extend(self._run([s], [d]))
                    good.append(j)
                except Exception as e:
                    self._pipe = None
                    msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and "Error" in ln), str(e)[:200])
                    self._skip(self.sources[s.source].key, f"DALI could not decode frames {s.frames[0]}..{s.frames[-1]}: "
                                                         f"{msg}", "decode")
            return clips, good

    def __iter__(self) -> Iterator[VideoBatch]:
        """Batches from the current position to the end of the current epoch; then the epoch advances.

        A sample that fails to decode is skipped (logged, counted); its batch is served without it.
        """
        import torch

        order = self.epoch_order(self.epoch)
        while self.position < len(order):
            end = min(self.position + self.batch_size, len(order))
            if self.drop_last and end - self.position < self.batch_size:
                break
            positions = list(range(self.position, end))
            specs = [self.samples[order[p]] for p in positions]
            clips, good = self._decode(specs)
            self.position = end
            if not clips:
                continue
            specs = [specs[j] for j in good]
            yield VideoBatch(video=torch.stack(clips), captions=[self.sources[s.source].caption for s in specs],
                             keys=[self.sources[s.source].key for s in specs], start_frames=[s.start for s in specs],
                             positions=[positions[j] for j in good], epoch=self.epoch,
                             frame_indices=[list(s.frames) for s in specs])
        self.epoch += 1
        self.position = 0
        self._order_cache = (-1, [])

    def sample_ids(self, epoch: Optional[int] = None) -> List[Tuple[str, int]]:
        """(key, start frame) of each sample this rank reads in ``epoch`` (default: the current one), in order."""
        order = self.epoch_order(self.epoch if epoch is None else epoch)
        return [(self.sources[self.samples[i].source].key, self.samples[i].start) for i in order]
