"""tools/generate.py on the tiny preset: T2V (MiniLM prompts), I2V (--image), V2V (--video) at several N from a
training checkpoint, decoded through a tiny random Wan VAE; exact reproduction from --noise / --prompt-embeds;
TP = 2 (SP) and CP = 2 under torchrun equal one process; bad inputs give errors naming the value; --image-latents equals --video
with the same latents; flags that do not apply are refused or recorded as not applied. (Diffusers-export
inputs and the equality with diffusers' AnyFlowPipeline: tests/test_pipeline_export.py; FAR checkpoints:
tests/test_generate_far_cli.py.)

The reference rollout here is written out by hand from the paper's update ``z_r = z_t - (t - r) u(z_t, t, r)``
on the grid ``shift(linspace(1, 0, N + 1))`` (s = 5), in float32 arithmetic; the tool forms the update in
float64 and rounds once, so the two differ by float32 rounding of the update only (measured 6e-8 at
N = 3); we allow TOL = 5e-7. A wrong convention for the condition frames' r moves the result by ~6e-6
on these tiny random models, so TOL separates the two.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun
from test_pipeline_export import LATENT, VIDEO, load_tool, rel, tiny_stage1_checkpoint, tiny_vae

TOL = 5e-7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gen")
    ckpt = tiny_stage1_checkpoint(str(root / "ckpt"))
    tiny_vae(str(root / "vae"))
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    return {"root": root, "ckpt": ckpt, "vae": str(root / "vae"), "model": load_for_inference(ckpt, adapter="generator")}


def generate(*argv):
    return load_tool("generate").main([*map(str, argv), "--no-progress"])


def hand_rollout(model, noise, text, n, cond=None, cond_r_zero=False):
    """The paper's flow-map Euler rollout, written out; condition frames held clean with t = 0, r = step's r."""
    grid = [5 * x / (1 + 4 * x) for x in torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()]
    z = noise.clone()
    fc = 0 if cond is None else cond.shape[1]
    for t, r in zip(grid[:-1], grid[1:]):
        if fc:
            z[:, :fc] = cond
        T = torch.full(z.shape[:2], t * 1000.0)
        T[:, :fc] = 0.0
        R = torch.full(z.shape[:2], r * 1000.0)
        if cond_r_zero:
            R[:, :fc] = 0.0
        with torch.no_grad():
            z = z - (t - r) * model(z, T, R, text)
    if fc:
        z[:, :fc] = cond
    return z


def test_t2v_minilm_prompts_several_n_videos_and_exact_reproduction(tiny, tmp_path):
    out, lat = tmp_path / "out", tmp_path / "lat.safetensors"
    prompts = ["a rabbit eats grass in a sunny garden", "waves break on a rocky shore"]
    assert generate("--checkpoint", tiny["ckpt"], "--prompt", *prompts, "--num-videos", 2, "--vae", tiny["vae"],
                    *VIDEO, "--steps", 1, 2, 4, "--seed", 3, "--output", out, "--save-latents", lat) == 0
    saved = load_file(str(lat))
    g = torch.Generator("cpu").manual_seed(3)
    torch.testing.assert_close(saved["noise"], torch.randn(4, *LATENT, generator=g), rtol=0, atol=0)
    text = saved["prompt_embeds"]
    assert text.shape == (4, 32, 384) and torch.equal(text[0], text[1]) and not torch.equal(text[1], text[2])
    for n in (1, 2, 4):
        ref = hand_rollout(tiny["model"], saved["noise"], text, n)
        assert rel(saved[f"steps_{n}"], ref) < TOL, (n, rel(saved[f"steps_{n}"], ref))
    assert not torch.equal(saved["steps_1"][0], saved["steps_1"][1])  # two videos per prompt: two noises
    # outputs: one labelled MP4 per N, lasting >= 4 s; the contact sheet; the run record
    record = json.load(open(out / "generation.json"))
    assert record["steps"] == [1, 2, 4] and record["prompts"] == [prompts[0]] * 2 + [prompts[1]] * 2
    import av

    for n in (1, 2, 4):
        with av.open(str(out / f"steps_{n}.mp4")) as c:
            frames = sum(1 for _ in c.decode(video=0))
        assert frames >= 4 * record["fps"]
    from PIL import Image

    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 48 and sheet.height > 3 * 32
    # the saved noise and embeddings reproduce the run exactly
    assert generate("--checkpoint", tiny["ckpt"], "--noise", lat, "--prompt-embeds", lat, "--codec", "none",
                    "--steps", 4, 2, "--output", tmp_path / "again", "--save-latents", tmp_path / "again.safetensors") == 0
    again = load_file(str(tmp_path / "again.safetensors"))
    assert torch.equal(again["steps_4"], saved["steps_4"]) and torch.equal(again["steps_2"], saved["steps_2"])


def test_i2v_image_first_frame_clean(tiny, tmp_path):
    from PIL import Image

    from megatron_anyflow.data.codecs import WanVAECodec

    rgb = (np.random.default_rng(int(torch.randint(0, 10**6, (1,)))).random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "first.png")
    text = torch.randn(1, 5, 384)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": text}, str(tmp_path / "text.safetensors"))
    for cr in ("step", "zero"):
        assert generate("--checkpoint", tiny["ckpt"], "--prompt-embeds", tmp_path / "text.safetensors", "--image",
                        tmp_path / "first.png", "--vae", tiny["vae"], *VIDEO, "--steps", 1, 3, "--condition-r", cr,
                        "--output", tmp_path / cr, "--save-latents", tmp_path / f"{cr}.safetensors") == 0
    saved = load_file(str(tmp_path / "step.safetensors"))
    video = torch.from_numpy(rgb).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    cond = WanVAECodec(tiny["vae"], device="cpu").encode(video)
    assert cond.shape == (1, 1, *LATENT[1:]) and torch.equal(saved["condition_frames"], cond)
    for n in (1, 3):
        assert torch.equal(saved[f"steps_{n}"][:, :1], cond)
        ref = hand_rollout(tiny["model"], saved["noise"], saved["prompt_embeds"], n, cond)
        assert rel(saved[f"steps_{n}"], ref) < TOL
    zero = load_file(str(tmp_path / "zero.safetensors"))
    ref0 = hand_rollout(tiny["model"], saved["noise"], saved["prompt_embeds"], 3, cond, cond_r_zero=True)
    assert rel(zero["steps_3"], ref0) < TOL
    # the condition frames' r reaches the model: the conventions differ by ~6e-6 here, 100x the rounding
    assert rel(zero["steps_3"], saved["steps_3"]) > 10 * TOL


def test_v2v_video_file_clean_prefix(tiny, tmp_path):
    import av

    from megatron_anyflow.data.codecs import WanVAECodec

    rng = np.random.default_rng(int(torch.randint(0, 10**6, (1,))))
    with av.open(str(tmp_path / "clip.mp4"), mode="w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for _ in range(9):
            fr = av.VideoFrame.from_ndarray((rng.random((32, 48, 3)) * 255).astype(np.uint8), format="rgb24")
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert generate("--checkpoint", tiny["ckpt"], "--prompt", "a cyclist on a road", "--video", tmp_path / "clip.mp4",
                    "--condition-frames", 2, "--vae", tiny["vae"], *VIDEO, "--steps", 2, "--output", tmp_path / "o",
                    "--save-latents", tmp_path / "l.safetensors") == 0
    saved = load_file(str(tmp_path / "l.safetensors"))
    with av.open(str(tmp_path / "clip.mp4")) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)][:5])  # 2 latent frames = 5 frames
    video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    cond = WanVAECodec(tiny["vae"], device="cpu").encode(video)
    assert cond.shape[1] == 2 and torch.equal(saved["steps_2"][:, :2], cond)
    ref = hand_rollout(tiny["model"], saved["noise"], saved["prompt_embeds"], 2, cond)
    assert rel(saved["steps_2"], ref) < TOL


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--context-parallel-size", "2"]], ids=["tp2-sp", "cp2"])
def test_parallel_generation_equals_one_process(tiny, tmp_path, layout):
    """generate.py under torchrun (TP 2 with SP, or CP 2: the 14B layouts) gives the one-process latents."""
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(2, *LATENT), "prompt_embeds": torch.randn(2, 6, 384)}, str(tmp_path / "in.safetensors"))
    common = ["--checkpoint", tiny["ckpt"], "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
              tmp_path / "in.safetensors", "--codec", "none", "--steps", 1, 4]
    torchrun(["tools/generate.py", *map(str, common), *layout,
              "--output", str(tmp_path / "par"), "--save-latents", str(tmp_path / "par.safetensors"), "--no-progress"])
    assert generate(*common, "--output", tmp_path / "one", "--save-latents", tmp_path / "one.safetensors") == 0
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "par.safetensors"))
    for n in (1, 4):
        # TP splits the matmuls' reductions and CP the attention's softmax over key shards: float32 rounding of
        # a few sums of 1e2 terms per layer (measured ~1e-7), far below a wrong shard order or a missed gather (~1)
        assert rel(b[f"steps_{n}"], a[f"steps_{n}"]) < 1e-6


def test_bad_inputs_name_the_value(tiny, tmp_path, capsys):
    from PIL import Image

    def fails(*argv):
        assert generate("--output", tmp_path / "o", *argv) == 2
        return capsys.readouterr().err

    base = ["--checkpoint", tiny["ckpt"], "--prompt", "a rabbit"]
    err = fails(*base, "--adapter", "teacher", "--codec", "none", "--latent-shape", *LATENT)
    assert "has no adapter 'teacher'" in err and "['generator']" in err
    err = fails(*base, "--steps", 2, 0)
    assert "--steps 0" in err
    err = fails(*base, "--codec", "mpeg")
    assert "unknown codec 'mpeg'" in err
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "small.png")
    err = fails(*base, "--vae", tiny["vae"], *VIDEO, "--image", tmp_path / "small.png")
    assert "small.png is 40x32 (width x height); expected 48x32" in err
    err = fails(*base, "--vae", tiny["vae"], "--frames", 8, "--height", 32, "--width", 48)
    assert "--frames 8" in err and "4k+1" in err
    err = fails(*base, "--ema", "--adapter", "none", "--codec", "none", "--latent-shape", *LATENT)
    assert "no EMA weights of 'model'" in err


def test_sample_any_step_is_exact_for_the_exact_flow_map():
    """Library level: with the Gaussian's exact average velocity every N gives the exact sample."""
    from megatron_anyflow.anyflow.gaussian import GaussianData
    from megatron_anyflow.anyflow.generation import GenerationError, check_steps, sample_any_step

    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    data = GaussianData(torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) * 0.3, 0.5)
    noise = torch.randn(3, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = sample_any_step(data.exact_model(), noise, torch.zeros(3, 2, 4, dtype=torch.float64), [1, 3, 8],
                          progress=False, batch_size=2)
    exact = data.flow_map(noise, 1.0, 0.0)
    for n in (1, 3, 8):  # the model sees float32 times (0..1000, spacing 6e-5): ~1e-8 error, far below 1e-6
        torch.testing.assert_close(out[n], exact, rtol=0, atol=1e-6)
    assert (out[1] - noise).abs().max() > 0.1  # it moved
    with pytest.raises(GenerationError, match="--steps -1"):
        check_steps([4, -1])
    with pytest.raises(GenerationError, match="at least one"):
        check_steps([])


def test_sample_any_step_ti2v_layout_is_exact_for_the_exact_flow_map():
    """The Wan2.2 TI2V-5B layout (48-channel latents, the first latent frame an image held clean at t = 0,
    r = the step's r as diffusers' AnyFlowPipeline): with the Gaussian's exact average velocity, whose
    coordinates are independent, every N gives the image frame back bit for bit and the exact flow map on
    the other frames (float64 closed form; the model sees float32 times: ~1e-8, far below 1e-6)."""
    from megatron_anyflow.anyflow.gaussian import GaussianData
    from megatron_anyflow.anyflow.generation import sample_any_step

    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    data = GaussianData(torch.randn(3, 48, 2, 2, generator=g, dtype=torch.float64) * 0.3, 0.5)
    noise = torch.randn(2, 3, 48, 2, 2, generator=g, dtype=torch.float64)
    image = torch.randn(1, 1, 48, 2, 2, generator=g, dtype=torch.float64)
    seen = []

    def model(z, T, R, text):
        seen.append((T.clone(), R.clone()))
        return data.exact_model()(z, T, R, text)

    out = sample_any_step(model, noise, torch.zeros(2, 2, 4, dtype=torch.float64), [1, 4], condition_frames=image,
                          progress=False)
    exact = data.flow_map(noise, 1.0, 0.0)
    for n in (1, 4):
        assert torch.equal(out[n][:, :1], image.expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(out[n][:, 1:], exact[:, 1:], rtol=0, atol=1e-6)
    assert all(bool((T[:, 0] == 0).all() and (T[:, 1:] > 0).all() and (R[:, 0] == R[:, 1]).all()) for T, R in seen)


def test_diffusers_export_rejects_adapter_options(tiny, tmp_path, capsys):
    """A transformer-only export (tools/convert_to_hf.py) is a generate source; --ema cannot apply to it."""
    assert load_tool("convert_to_hf").main(["--input", tiny["ckpt"], "--output", str(tmp_path / "hf"),
                                            "--merge-lora", "generator"]) == 0
    assert generate("--checkpoint", tmp_path / "hf", "--prompt", "a rabbit", "--ema", "--output", tmp_path / "o") == 2
    assert "is a diffusers export" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(1, *LATENT), "prompt_embeds": torch.randn(1, 4, 384)}, str(tmp_path / "in.safetensors"))
    for src in (tiny["ckpt"], tmp_path / "hf"):
        assert generate("--checkpoint", src, "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
                        tmp_path / "in.safetensors", "--codec", "none", "--steps", 2, "--output", tmp_path / "o",
                        "--save-latents", tmp_path / "lat.safetensors") == 0
        z = load_file(str(tmp_path / "lat.safetensors"))["steps_2"]
        if src == tiny["ckpt"]:
            first = z
    assert rel(z, first) < 1e-6  # the export's scheduler_config.json gives shift 5, the merged weights the same model


def test_image_latents_equal_video_latents(tiny, tmp_path, capsys):
    """--image-latents (first latent frame(s) given directly, no codec) = --video with the same latents = the
    hand rollout with that condition; generation.json records the condition's r as applied."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    first = torch.randn(LATENT[1:], generator=g)
    save_file({"noise": torch.randn(2, *LATENT, generator=g), "prompt_embeds": torch.randn(2, 5, 384, generator=g)},
              str(tmp_path / "in.safetensors"))
    save_file({"latents": first}, str(tmp_path / "img.safetensors"))  # [C, H, W]
    save_file({"latents": first[None]}, str(tmp_path / "vid.safetensors"))  # [1, C, H, W]
    common = ["--checkpoint", tiny["ckpt"], "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
              tmp_path / "in.safetensors", "--codec", "none", "--steps", 2]
    for flag, f in (("--image-latents", "img"), ("--video", "vid")):
        assert generate(*common, flag, tmp_path / f"{f}.safetensors", "--output", tmp_path / f,
                        "--save-latents", tmp_path / f / "lat.safetensors") == 0
    a, b = (load_file(str(tmp_path / f / "lat.safetensors")) for f in ("img", "vid"))
    assert torch.equal(a["steps_2"], b["steps_2"]) and torch.equal(a["condition_frames"], first[None, None])
    ref = hand_rollout(tiny["model"], a["noise"], a["prompt_embeds"], 2, first[None, None])
    assert rel(a["steps_2"], ref) < TOL
    record = json.load(open(tmp_path / "img" / "generation.json"))
    assert record["mode"] == "image-to-video" and record["condition_r"] == "step" and record["condition_frames"] == 1
    assert record["chunk_partition"] is None and not record["far"] and record["not_applied"] == {}
    # the latent size is checked against the run's: the file, the key, the shape found and the one expected
    save_file({"latents": torch.zeros(2, 16, 4, 5)}, str(tmp_path / "bad.safetensors"))
    assert generate(*common, "--image-latents", tmp_path / "bad.safetensors", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert (f"--image-latents {tmp_path / 'bad.safetensors'}: 'latents' has shape [2, 16, 4, 5] (torch.float32); "
            f"expected [16, 4, 6] or [F0, 16, 4, 6] with 1 <= F0 < 3") in err, err


def test_flags_that_do_not_apply_are_refused_or_recorded(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(1, *LATENT), "prompt_embeds": torch.randn(1, 4, 384)},
              str(tmp_path / "in.safetensors"))
    base = ["--checkpoint", tiny["ckpt"], "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
            tmp_path / "in.safetensors", "--steps", 1, "--output", tmp_path / "o"]

    def fails(*argv):
        assert generate(*base, *argv) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    err = fails("--codec", "none", "--chunk-partition", 1, 2)
    assert "--chunk-partition 1 2 applies to AnyFlow-FAR (causal) checkpoints only" in err, err
    err = fails("--codec", "none", "--frames", 9, "--height", 32, "--width", 48)
    assert "--frames 9 --height 32 --width 48: video sizes do not apply with --codec none" in err, err
    err = fails("--codec", "none", "--fps", 8)
    assert "--fps 8: video sizes do not apply with --codec none" in err, err
    err = fails("--vae", tiny["vae"], *VIDEO, "--latent-shape", 5, 16, 4, 6)
    assert "--latent-shape 5 16 4 6 does not apply with the wan-vae codec" in err and "[3, 16, 4, 6]" in err, err
    err = fails("--codec", "none", "--condition-frames", 1)
    assert "--condition-frames 1 applies to --video only" in err, err
    # text-to-video: --condition-r has nothing to act on; recorded as not applied
    assert generate(*base, "--codec", "none", "--condition-r", "zero") == 0
    record = json.load(open(tmp_path / "o" / "generation.json"))
    assert record["condition_r"] is None and "--condition-r" in record["not_applied"], record
    assert record["frames"] is None and record["fps"] is None
