"""tools/generate.py on AnyFlow-FAR checkpoints at sizes and partitions other than the recorded ones.

A tiny random diffusers ``AnyFlowFARTransformer3DModel`` (recorded chunk partition [1, 2, 1, 1], latents
5 x 16 x 4 x 8) serves as a diffusers export and, converted with tools/convert_from_hf.py, as a training
checkpoint. Checked:

1. ``--chunk-partition`` with any partition of the latent frames ([1, 2, 2]) gives bitwise the latents of
   ``anyflow.causal.sample_chunked`` called directly with that partition (same model, noise, text, N; the
   CLI runs the same float32 ops in the same order, so equality is exact), and generation.json records it;
   the recorded default gives other latents (the flag reaches the sampler).
2. Frame-count errors name the flag that fixes them: ``--chunk-partition`` (its sum and the frame count),
   ``--latent-shape`` / the ``--noise`` file with ``--codec none``, ``--frames 4k+1`` with the Wan VAE.
3. Flags that do not apply are refused with one ``error:`` line and exit 2: ``--condition-r`` on FAR,
   ``--frames/--height/--width`` with ``--codec none`` (also through a real subprocess).
4. ``--image-latents`` = ``--video`` latents with the same first frame = ``sample_chunked(condition=...)``.
5. The V2V chunk-alignment error lists exactly the ``--condition-frames`` values the CLI accepts, and each
   of them is accepted.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from test_pipeline_export import load_tool, tiny_vae

CP = [1, 2, 1, 1]  # the partition the checkpoint records
LAT = (5, 16, 4, 8)  # f, c, h, w (compressed 4 x 4 context patches need h, w divisible by 4)


@pytest.fixture(scope="module")
def far(tmp_path_factory):
    from test_far_conversion import far_model

    root = tmp_path_factory.mktemp("far_gen")
    far_model(seed=2, chunk_partition=CP).save_pretrained(root / "hf")
    assert load_tool("convert_from_hf").main(["--input", str(root / "hf"), "--output", str(root / "ckpt")]) == 0
    g = torch.Generator().manual_seed(7)
    noise, text = torch.randn(2, *LAT, generator=g), torch.randn(2, 6, 384, generator=g)
    save_file({"noise": noise, "prompt_embeds": text}, str(root / "in.safetensors"))
    return {"root": root, "hf": str(root / "hf"), "ckpt": str(root / "ckpt"), "noise": noise, "text": text,
            "in": str(root / "in.safetensors")}


def generate(*argv):
    return load_tool("generate").main([*map(str, argv), "--no-progress"])


def latents_run(far, tmp_path, *extra, source="hf", steps=(1, 2), name="run"):
    """generate with the fixture's noise and text, --codec none; returns (latents file dict, generation.json)."""
    out = tmp_path / name
    assert generate("--checkpoint", far[source], "--noise", far["in"], "--prompt-embeds", far["in"], "--codec", "none",
                    "--steps", *steps, "--output", out, "--save-latents", out / "lat.safetensors", *extra) == 0
    return load_file(str(out / "lat.safetensors")), json.load(open(out / "generation.json"))


def direct(far, source, cp, n, condition=None):
    """anyflow.causal.sample_chunked on the model generate loads, with the partition given directly."""
    from megatron_anyflow.anyflow.causal import sample_chunked
    from megatron_anyflow.anyflow.generation import load_model
    from megatron_anyflow.models.wan.far import FarModelRunner

    lm = load_model(far[source])
    assert lm.model.config.far and list(lm.model.config.chunk_partition) == CP and lm.shift == 5.0
    return sample_chunked(FarModelRunner(lm.model), far["noise"], far["text"], cp, n, shift=lm.shift,
                          condition=condition)


def error_of(capsys, *argv):
    """Run generate expecting the one-line refusal: exit code 2, exactly one 'error:' line; returns it."""
    assert generate(*argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("source", ["hf", "ckpt"])
def test_chunk_partition_any_partition_equals_sample_chunked(far, tmp_path, source):
    lat, record = latents_run(far, tmp_path, "--chunk-partition", 1, 2, 2, source=source)
    for n in (1, 2):
        assert torch.equal(lat[f"steps_{n}"], direct(far, source, [1, 2, 2], n)), n
    assert record["far"] and record["chunk_partition"] == [1, 2, 2] and record["chunk_partition_from"] == "argument"
    assert record["condition_r"] is None
    # the default is the checkpoint's partition, and the partition changes the samples
    default, rec0 = latents_run(far, tmp_path, source=source, steps=(2,), name="default")
    assert rec0["chunk_partition"] == CP and rec0["chunk_partition_from"] == "checkpoint"
    assert torch.equal(default["steps_2"], direct(far, source, CP, 2))
    assert not torch.allclose(default["steps_2"], lat["steps_2"], rtol=0, atol=1e-4)


def test_frame_count_errors_name_the_flag(far, tmp_path, capsys):
    base = ["--checkpoint", far["hf"], "--prompt-embeds", far["in"], "--output", tmp_path / "o", "--steps", 1]
    err = error_of(capsys, *base, "--noise", far["in"], "--codec", "none", "--chunk-partition", 1, 2)
    assert "--chunk-partition [1, 2] sums to 3 latent frames but the video has 5 latent frames" in err, err
    assert "e.g. --chunk-partition 1 2 2" in err, err
    err = error_of(capsys, *base, "--noise", far["in"], "--codec", "none", "--chunk-partition", 1, 0, 4)
    assert "--chunk-partition [1, 0, 4]" in err and "positive" in err, err
    # recorded partition vs --latent-shape: both named, and both ways out
    err = error_of(capsys, *base, "--num-videos", 2, "--codec", "none", "--latent-shape", 4, 16, 4, 8)
    assert "chunk_partition [1, 2, 1, 1] covers 5 latent frames; the video has 4 (--latent-shape 4 16 4 8)" in err, err
    assert "--chunk-partition with chunks summing to 4" in err and "--latent-shape 5 16 4 8" in err, err
    assert "--frames" not in err, err
    # ... vs a --noise file
    save_file({"noise": torch.randn(2, 4, *LAT[1:])}, str(tmp_path / "n4.safetensors"))
    err = error_of(capsys, *base, "--codec", "none", "--noise", tmp_path / "n4.safetensors")
    assert "the video has 4 (--noise" in err and "a --noise file with 5 latent frames" in err, err
    # ... vs --frames through the Wan VAE (x4 in time, x8 in space): 13 frames = 4 latent frames; 17 fit
    tiny_vae(str(tmp_path / "vae"))
    err = error_of(capsys, *base, "--vae", tmp_path / "vae", "--frames", 13, "--height", 32, "--width", 64)
    assert "the video has 4 (13 video frames, wan-vae codec)" in err, err
    assert "--frames 17 (Wan-VAE video frames must be 4k+1; 17 frames give 5 latent frames)" in err, err
    assert "--latent-shape" not in err, err
    err = error_of(capsys, *base, "--vae", tmp_path / "vae", "--frames", 15, "--height", 32, "--width", 64)
    assert "--frames 15" in err and "4k+1" in err and "--frames 13 (4 latent frames) or --frames 17 (5" in err, err


def test_flags_that_do_not_apply_are_refused(far, tmp_path, capsys):
    base = ["--checkpoint", far["hf"], "--noise", far["in"], "--prompt-embeds", far["in"], "--output", tmp_path / "o"]
    save_file({"latents": far["noise"][0, :1]}, str(tmp_path / "img.safetensors"))
    for cr in ("step", "zero"):  # FAR condition chunks are prefilled at t = r = 0: no r to choose, even 'step'
        err = error_of(capsys, *base, "--codec", "none", "--condition-r", cr, "--image-latents",
                       tmp_path / "img.safetensors")
        assert f"--condition-r {cr} does not apply to a FAR checkpoint" in err and "t = r = 0" in err, err
    err = error_of(capsys, *base, "--codec", "none", "--frames", 17)
    assert err.startswith("error: --frames 17: video sizes do not apply with --codec none"), err
    assert "--latent-shape F C H W" in err, err
    err = error_of(capsys, *base, "--codec", "none", "--height", 32, "--width", 64)
    assert err.startswith("error: --height 32 --width 64: video sizes do not apply with --codec none"), err
    assert not (tmp_path / "o" / "generation.json").exists()
    # the real command line: exit status 2 and the one-line message
    proc = subprocess.run([sys.executable, "tools/generate.py", *map(str, base), "--codec", "none", "--condition-r",
                           "zero", "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: --condition-r zero does not apply to a FAR checkpoint: its condition frames are whole chunks, copied "
        "clean and prefilled into the KV cache at t = r = 0, never stepped (anyflow.causal.sample_chunked); drop "
        "--condition-r"], proc.stderr[-2000:]


def test_image_latents_equal_video_latents_and_sample_chunked(far, tmp_path, capsys):
    first = torch.randn(LAT[1:], generator=torch.Generator().manual_seed(5))
    save_file({"latents": first}, str(tmp_path / "img.safetensors"))  # [C, H, W]
    save_file({"latents": first[None]}, str(tmp_path / "vid.safetensors"))  # [1, C, H, W]: a 1-frame --video
    lat, record = latents_run(far, tmp_path, "--image-latents", tmp_path / "img.safetensors", "--chunk-partition",
                              1, 2, 2, name="img")
    via_video, _ = latents_run(far, tmp_path, "--video", tmp_path / "vid.safetensors", "--chunk-partition", 1, 2, 2,
                               name="vid")
    cond = first[None, None].expand(2, 1, *LAT[1:])
    for n in (1, 2):
        assert torch.equal(lat[f"steps_{n}"], via_video[f"steps_{n}"]), n
        assert torch.equal(lat[f"steps_{n}"], direct(far, "hf", [1, 2, 2], n, condition=cond)), n
        assert torch.equal(lat[f"steps_{n}"][:, :1], cond)
    assert record["mode"] == "image-to-video" and record["condition_frames"] == 1
    assert record["image_latents"] == str(tmp_path / "img.safetensors") and record["chunk_partition"] == [1, 2, 2]
    # [F0, C, H, W]: three whole chunks of [1, 2, 1, 1] as the first frames
    save_file({"latents": far["noise"][1, :3] * 0.5}, str(tmp_path / "three.safetensors"))
    three, _ = latents_run(far, tmp_path, "--image-latents", tmp_path / "three.safetensors", steps=(2,), name="three")
    cond3 = (far["noise"][1, :3] * 0.5)[None].expand(2, 3, *LAT[1:])
    assert torch.equal(three["steps_2"], direct(far, "hf", CP, 2, condition=cond3))
    # a wrong shape names the file, the key, the shape found and the one expected
    save_file({"latents": torch.zeros(16, 4, 6)}, str(tmp_path / "bad.safetensors"))
    err = error_of(capsys, "--checkpoint", far["hf"], "--noise", far["in"], "--prompt-embeds", far["in"], "--codec",
                   "none", "--image-latents", tmp_path / "bad.safetensors", "--output", tmp_path / "o")
    assert f"--image-latents {tmp_path / 'bad.safetensors'}: 'latents' has shape [16, 4, 6]" in err, err
    assert "expected [16, 4, 8] or [F0, 16, 4, 8]" in err, err
    # one image latent frame needs a first chunk of one frame
    err = error_of(capsys, "--checkpoint", far["hf"], "--noise", far["in"], "--prompt-embeds", far["in"], "--codec",
                   "none", "--image-latents", tmp_path / "img.safetensors", "--chunk-partition", 2, 2, 1,
                   "--output", tmp_path / "o")
    assert "--image-latents accepts [2, 4] latent frames" in err, err


def accepted_in(err):
    m = re.search(r"--condition-frames accepts (\[[0-9, ]*\]) latent frames", err)
    assert m, err
    return json.loads(m.group(1))


def test_v2v_error_lists_exactly_the_accepted_lengths(far, tmp_path, capsys):
    save_file({"latents": far["noise"][0, :4] * 0.5}, str(tmp_path / "v4.safetensors"))  # 4 clean latent frames
    base = ["--checkpoint", far["hf"], "--noise", far["in"], "--prompt-embeds", far["in"], "--codec", "none",
            "--video", tmp_path / "v4.safetensors", "--output", tmp_path / "o", "--steps", 1]
    err = error_of(capsys, *base, "--chunk-partition", 1, 2, 2, "--condition-frames", 2)
    assert err.startswith("error: --condition-frames 2: 2 condition latent frame(s) are not whole chunks"), err
    assert accepted_in(err) == [1, 3]  # not 5: the last chunk is always generated
    err = error_of(capsys, *base, "--condition-frames", 2)  # the recorded [1, 2, 1, 1]
    assert accepted_in(err) == [1, 3, 4]
    for k in accepted_in(err):  # every value listed is accepted, and holds that prefix clean
        lat, record = latents_run(far, tmp_path, "--video", tmp_path / "v4.safetensors", "--condition-frames", k,
                                  steps=(1,), name=f"k{k}")
        assert record["condition_frames"] == k, k
        assert torch.equal(lat["steps_1"][:, :k], (far["noise"][0, :k] * 0.5).expand(2, k, *LAT[1:])), k
    # a file as long as the video: the whole video is not a prefix the CLI accepts (a chunk must be generated)
    save_file({"latents": far["noise"][0]}, str(tmp_path / "v5.safetensors"))
    err = error_of(capsys, *[tmp_path / "v5.safetensors" if a == tmp_path / "v4.safetensors" else a for a in base],
                   "--chunk-partition", 1, 2, 2)
    assert "holds 5 latent frame(s)" in err and accepted_in(err) == [1, 3], err
    # a file of 2 frames without --condition-frames: only the prefixes it holds are listed
    save_file({"latents": far["noise"][0, :2]}, str(tmp_path / "v2.safetensors"))
    err = error_of(capsys, *[tmp_path / "v2.safetensors" if a == tmp_path / "v4.safetensors" else a for a in base])
    assert "holds 2 latent frame(s)" in err and accepted_in(err) == [1], err
