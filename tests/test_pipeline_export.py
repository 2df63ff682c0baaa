"""tools/convert_to_hf.py --pipeline: a complete AnyFlowPipeline directory (tiny random Wan VAE, umT5 and
tokenizer built offline) whose output latents equal tools/generate.py's for the same noise and text
(T2V, V2V; N in {1, 4}); the scheduler carries shift 5; non-finite weights are refused and --verify fails.

Tolerance of the pipeline equality (float32): the two transformer implementations (diffusers'
``AnyFlowTransformer3DModel``, this project's ``WanModel``) agree per forward to ~1e-7 relative (``--verify``
measures 9e-8 on these models: different op order of float32 matmuls, fused vs separate q/k/v); the
scheduler update and the sampler's are bitwise equal (tests/test_sampler.py). N steps add N such
per-step errors, each scaled by the step size (sum of step sizes = 1), and the tiny random models are
well-conditioned, so the final latents must agree to a small multiple of 1e-7; we assert 1e-5
(relative, Frobenius): 100x margin over the measured error, far below any real mismatch (a wrong time,
shift or condition convention gives > 1e-2).
"""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

# the tiny random components live in the library (the tiny end-to-end scripts build them too); re-exported
# here for the other test modules
from megatron_anyflow.testing.tiny_components import CORPUS, tiny_umt5, tiny_vae, tiny_wan22_vae  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = (3, 16, 4, 6)  # f, c, h, w -> video 9 x 32 x 48 through the tiny Wan VAE (x4 time, x8 space)
VIDEO = ["--frames", "9", "--height", "32", "--width", "48"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_stage1_checkpoint(root, iters=2, extra=()):
    """A stage-1 checkpoint of the tiny preset whose 'generator' adapter moved (lr 1e-2, no warm-up);
    ``extra``: more trainer arguments (a repeated flag overrides the one here)."""
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    args = parse_args(["--stage", "stage1", "--mock-data", "--mock-num-samples", "8", "--mock-latent-shape",
                       *map(str, LATENT), "--micro-batch-size", "2", "--global-batch-size", "2", "--lora-rank", "4",
                       "--lora-alpha", "4", "--lr", "1e-2", "--lr-warmup-iters", "0", "--train-iters", str(iters),
                       "--log-interval", "100", "--save", root, *extra])
    Trainer(args, log=lambda *a, **k: None).train()
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    ckpt = tiny_stage1_checkpoint(str(root / "ckpt"))
    tiny_vae(str(root / "wan" / "vae"))
    tiny_umt5(str(root / "wan"))
    convert = load_tool("convert_to_hf")
    out = str(root / "pipeline")
    rc = convert.main(["--input", ckpt, "--output", out, "--merge-lora", "generator", "--pipeline", "--verify",
                       "--vae", str(root / "wan" / "vae"), "--text-encoder", str(root / "wan" / "text_encoder")])
    assert rc == 0
    return {"root": root, "ckpt": ckpt, "pipeline": out, "vae": str(root / "wan" / "vae")}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_generate(*argv):
    rc = load_tool("generate").main([*map(str, argv), "--no-progress"])
    assert rc == 0
    return rc


def fresh_inputs(latent, n, tmp_path):
    """(generator, noise [n, *latent], prompt embeddings [n, 7, 384]) from a fresh random seed, saved as
    ``tmp_path/inputs.safetensors`` for generate's --noise / --prompt-embeds."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    noise = torch.randn(n, *latent, generator=g)
    text = torch.randn(n, 7, 384, generator=g)
    save_file({"noise": noise, "prompt_embeds": text}, str(tmp_path / "inputs.safetensors"))
    return g, noise, text


def generate_both(exported, tmp_path, extra):
    """tools/generate.py at N = 1, 4 on ``fresh_inputs`` from the checkpoint and from the pipeline export
    (latents only, ``extra`` arguments); returns their ``--save-latents`` dicts (checkpoint, export)."""
    for source in ("ckpt", "pipeline"):
        run_generate("--checkpoint", exported[source], "--prompt-embeds", tmp_path / "inputs.safetensors", "--noise",
                     tmp_path / "inputs.safetensors", "--steps", 1, 4, "--output", tmp_path / source, "--save-latents",
                     tmp_path / f"{source}.safetensors", "--codec", "none", *extra)
    return load_file(str(tmp_path / "ckpt.safetensors")), load_file(str(tmp_path / "pipeline.safetensors"))


def test_pipeline_directory_and_scheduler(exported):
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    index = json.load(open(os.path.join(exported["pipeline"], "model_index.json")))
    assert index["_class_name"] == "AnyFlowPipeline"
    assert index["transformer"] == ["diffusers", "AnyFlowTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    pipe = AnyFlowPipeline.from_pretrained(exported["pipeline"], local_files_only=True)
    assert pipe.scheduler.config.shift == 5.0
    # the transformer-only export (and the pipeline's transformer/) carry the scheduler config next to them
    sched = FlowMapEulerDiscreteScheduler.from_pretrained(os.path.join(exported["pipeline"], "transformer"))
    assert sched.config.shift == 5.0


@pytest.mark.parametrize("mode", ["t2v", "v2v"])
def test_pipeline_latents_equal_generate(exported, tmp_path, mode):
    from diffusers import AnyFlowPipeline

    pipe = AnyFlowPipeline.from_pretrained(exported["pipeline"], local_files_only=True)
    n = 2
    g, noise, text = fresh_inputs(LATENT, n, tmp_path)
    extra, kwargs = [], {}
    if mode == "v2v":
        cond = torch.randn(1, 2, *LATENT[1:], generator=g)  # a clean prefix of 2 of the 3 latent frames
        save_file({"latents": cond}, str(tmp_path / "cond.safetensors"))
        extra = ["--video", tmp_path / "cond.safetensors"]
        kwargs = {"video_latents": cond.expand(n, -1, -1, -1, -1)}
    ours, from_export = generate_both(exported, tmp_path, extra)
    for N in (1, 4):
        ref = pipe(prompt_embeds=text, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=N, height=32,
                   width=48, num_frames=9, output_type="latent", **kwargs).frames.permute(0, 2, 1, 3, 4)
        assert rel(ours[f"steps_{N}"], ref) < 1e-5, (N, rel(ours[f"steps_{N}"], ref))
        # the export holds the checkpoint's merged float32 weights: the same model, the same numbers
        assert rel(from_export[f"steps_{N}"], ours[f"steps_{N}"]) < 1e-6
        if mode == "v2v":
            assert torch.equal(ours[f"steps_{N}"][:, :2], cond.expand(n, -1, -1, -1, -1))
    assert rel(ours["steps_1"], ours["steps_4"]) > 1e-3  # N matters: the test can see a wrong grid


def test_pipeline_prompts_through_umt5_equal_generate(exported, tmp_path):
    """Prompts encoded by the pipeline's own umT5 (generate finds text_encoder/ and tokenizer/ in the export)."""
    from diffusers import AnyFlowPipeline

    pipe = AnyFlowPipeline.from_pretrained(exported["pipeline"], local_files_only=True)
    prompts = CORPUS[:2]
    noise = torch.randn(2, *LATENT)
    save_file({"noise": noise}, str(tmp_path / "noise.safetensors"))
    run_generate("--checkpoint", exported["pipeline"], "--prompt", *prompts, "--text-max-length", 16, "--noise",
                 tmp_path / "noise.safetensors", "--steps", 2, "--output", tmp_path / "out", "--save-latents",
                 tmp_path / "lat.safetensors", *VIDEO)
    ours = load_file(str(tmp_path / "lat.safetensors"))
    ref = pipe(prompt=prompts, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=2, height=32, width=48,
               num_frames=9, output_type="latent", max_sequence_length=16).frames.permute(0, 2, 1, 3, 4)
    assert rel(ours["steps_2"], ref) < 1e-5
    # decoded through the pipeline's VAE: one labelled MP4 per N and the contact sheet
    assert (tmp_path / "out" / "steps_2.mp4").stat().st_size > 0
    assert open(tmp_path / "out" / "contact_sheet.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _poisoned(monkeypatch, value):
    """load_for_inference returning the real model with one weight set to ``value``."""
    import megatron_anyflow.checkpoint.model_io as model_io

    real = model_io.load_for_inference

    def load(*a, **k):
        model = real(*a, **k)
        with torch.no_grad():
            model.proj_out.weight[0, 0] = value
        return model

    monkeypatch.setattr(model_io, "load_for_inference", load)


def test_export_refuses_non_finite_weights(exported, tmp_path, monkeypatch, capsys):
    _poisoned(monkeypatch, float("nan"))
    rc = load_tool("convert_to_hf").main(["--input", exported["ckpt"], "--output", str(tmp_path / "o"), "--verify"])
    err = capsys.readouterr().err
    assert rc != 0 and not (tmp_path / "o").exists()
    assert "non-finite" in err and "proj_out.weight" in err  # names the tensor


def test_verify_fails_on_non_finite_output_and_above_tolerance(exported, tmp_path, monkeypatch, capsys):
    _poisoned(monkeypatch, 3e38)  # a finite weight whose products overflow float32
    convert = load_tool("convert_to_hf")
    rc = convert.main(["--input", exported["ckpt"], "--output", str(tmp_path / "o"), "--verify"])
    err = capsys.readouterr().err
    assert rc == 1 and "not finite" in err and not (tmp_path / "o").exists()  # a failed check leaves no export
    monkeypatch.undo()
    convert = load_tool("convert_to_hf")
    rc = convert.main(["--input", exported["ckpt"], "--output", str(tmp_path / "o2"), "--verify",
                       "--verify-tolerance", "1e-12"])
    err = capsys.readouterr().err
    assert rc == 1 and "exceeds the tolerance 1e-12" in err


def test_pipeline_needs_its_components(exported, tmp_path, capsys):
    rc = load_tool("convert_to_hf").main(["--input", exported["ckpt"], "--output", str(tmp_path / "p"),
                                          "--merge-lora", "generator", "--pipeline", "--vae", exported["vae"]])
    assert rc == 2 and "--pipeline needs --text-encoder, --tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Wan2.2 TI2V-5B
# The 5B family's tiny member (48-channel latents) exported with a tiny random Wan2.2 VAE (z_dim 48, 16x space,
# 4x time): diffusers' AnyFlowPipeline runs it as is (it sizes latents from the VAE config and the transformer's
# in_channels, and normalises with the VAE's 48 latents_mean / latents_std). Same tolerances as above.
LATENT_22 = (3, 48, 2, 4)  # f, c, h, w -> video 9 x 32 x 64 through the tiny Wan2.2 VAE


@pytest.fixture(scope="module")
def exported_wan22(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export22")
    ckpt = tiny_stage1_checkpoint(str(root / "ckpt"), extra=["--model-preset", "tiny-wan2.2-ti2v",
                                                             "--mock-latent-shape", *map(str, LATENT_22)])
    tiny_wan22_vae(str(root / "wan" / "vae"))
    tiny_umt5(str(root / "wan"))
    out = str(root / "pipeline")
    rc = load_tool("convert_to_hf").main(["--input", ckpt, "--output", out, "--merge-lora", "generator", "--pipeline",
                                          "--verify", "--vae", str(root / "wan" / "vae"), "--text-encoder",
                                          str(root / "wan" / "text_encoder")])
    assert rc == 0
    return {"root": root, "ckpt": ckpt, "pipeline": out, "vae": str(root / "wan" / "vae")}


def test_wan22_ti2v_pipeline_loads_as_is(exported_wan22, capsys):
    from diffusers import AnyFlowPipeline

    index = json.load(open(os.path.join(exported_wan22["pipeline"], "model_index.json")))
    assert index["_class_name"] == "AnyFlowPipeline" and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    pipe = AnyFlowPipeline.from_pretrained(exported_wan22["pipeline"], local_files_only=True)
    assert pipe.transformer.config.in_channels == pipe.transformer.config.out_channels == 48
    assert (pipe.vae.config.z_dim, pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (48, 16, 4)


@pytest.mark.parametrize("mode", ["t2v", "ti2v"])
def test_wan22_ti2v_pipeline_equals_generate(exported_wan22, tmp_path, mode):
    """Latents: tools/generate.py on the checkpoint and on the export == AnyFlowPipeline (T2V; TI2V with the
    first latent frame held clean, as --image-latents / video_latents); pixels: the pipeline's decode of its
    latents == Wan22VAECodec.decode of generate's (the 48-channel de-normalisation and the 16x VAE)."""
    from diffusers import AnyFlowPipeline

    from megatron_anyflow.data.codecs import Wan22VAECodec

    pipe = AnyFlowPipeline.from_pretrained(exported_wan22["pipeline"], local_files_only=True)
    n = 2
    g, noise, text = fresh_inputs(LATENT_22, n, tmp_path)
    extra, kwargs = [], {}
    if mode == "ti2v":
        cond = torch.randn(1, 1, *LATENT_22[1:], generator=g)  # the image's latent frame
        save_file({"latents": cond[0]}, str(tmp_path / "image.safetensors"))
        extra = ["--image-latents", tmp_path / "image.safetensors"]
        kwargs = {"video_latents": cond.expand(n, -1, -1, -1, -1)}
    ours, from_export = generate_both(exported_wan22, tmp_path, extra)
    size = dict(height=32, width=64, num_frames=9)
    for N in (1, 4):
        ref = pipe(prompt_embeds=text, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=N, **size,
                   output_type="latent", **kwargs).frames.permute(0, 2, 1, 3, 4)
        assert rel(ours[f"steps_{N}"], ref) < 1e-5, (N, rel(ours[f"steps_{N}"], ref))
        assert rel(from_export[f"steps_{N}"], ours[f"steps_{N}"]) < 1e-6
        if mode == "ti2v":
            assert torch.equal(ours[f"steps_{N}"][:, :1], cond.expand(n, -1, -1, -1, -1))
    assert rel(ours["steps_1"], ours["steps_4"]) > 1e-3
    # Pixels: diffusers decodes z * std + mean (its 48-entry latents_mean / latents_std) through the VAE and maps
    # [-1, 1] to [0, 1]; the codec does the same in [-1, 1]. Same float32 VAE on the same latents (to 1e-5),
    # the decoder is Lipschitz-bounded, and the clamps agree: 1e-4 of the video's norm.
    video = pipe(prompt_embeds=text, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=4, **size,
                 output_type="pt", **kwargs).frames  # [n, f, 3, H, W] in [0, 1]
    codec = Wan22VAECodec(exported_wan22["vae"], device="cpu")
    mine = (codec.decode(ours["steps_4"]) + 1) / 2  # [n, 3, f, H, W]
    assert mine.shape == (n, 3, 9, 32, 64)
    assert rel(mine.permute(0, 2, 1, 3, 4), video) < 1e-4


def test_wan22_pipeline_refuses_the_wrong_vae(exported_wan22, tmp_path, capsys):
    """The 5B student with a Wan2.1 VAE (z_dim 16) is refused before anything is written, by name."""
    tiny_vae(str(tmp_path / "vae21"))
    rc = load_tool("convert_to_hf").main(["--input", exported_wan22["ckpt"], "--output", str(tmp_path / "p"),
                                          "--merge-lora", "generator", "--pipeline", "--vae", str(tmp_path / "vae21"),
                                          "--text-encoder", str(exported_wan22["root"] / "wan" / "text_encoder")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "p").exists() and not (tmp_path / "p.tmp").exists()
    assert "z_dim 16, but the transformer predicts 48 latent channels" in err


def test_pipeline_verify_sizes_latents_with_the_vae(exported_wan22, monkeypatch, tmp_path, capsys):
    """--verify's pipeline check draws the noise in the pipeline (sized by its VAE's factors): a pipeline
    whose VAE reported 8x space (Wan2.1's) for the 16x Wan2.2 VAE fails it, and no export is left."""
    import functools

    from diffusers import AnyFlowPipeline

    real = AnyFlowPipeline.__init__

    @functools.wraps(real)  # from_pretrained reads the components off __init__'s signature
    def init(self, *a, **k):
        real(self, *a, **k)
        self.vae_scale_factor_spatial = 8

    monkeypatch.setattr(AnyFlowPipeline, "__init__", init)
    rc = load_tool("convert_to_hf").main(["--input", exported_wan22["ckpt"], "--output", str(tmp_path / "p"),
                                          "--merge-lora", "generator", "--pipeline", "--vae", exported_wan22["vae"],
                                          "--text-encoder", str(exported_wan22["root"] / "wan" / "text_encoder")])
    cap = capsys.readouterr()
    err = cap.err
    assert rc == 1 and not (tmp_path / "p").exists(), cap.out + err
    assert "the pipeline's latents have shape (2, 3, 48, 8, 12), the sampler's (2, 3, 48, 4, 6)" in err
