"""Wan2.2 on the existing layer: diffusers' `WanTransformer3DModel` with Wan2.2 configs (TI2V-5B's 48
channels, I2V-A14B's 36 in / 16 out) and per-token timesteps ``[b, S]``, AnyFlow's (t, r) per token,
the presets, the two-expert refusal and the conversion of Wan2.2 checkpoints.

Tolerance (float32, relative Frobenius error < 1e-5): both sides run the same operations up to
summation order (fused q/k/v and k/v GEMMs, a different LayerNorm / RMSNorm kernel, ``emb_t + g (emb_r -
emb_t)`` for ``(1 - g) emb_t + g emb_r``). A reordered sum of k terms differs by <= k u |terms| with
u = 2^-24 = 6e-8, ~ sqrt(k) u typically; the widest reduction here is the FFN (k = 136) and each block
chains ~6 such reductions, with LayerNorm / RMSNorm renormalising between them, so per layer ~ 6 x
sqrt(136) x 6e-8 = 4e-6 worst-case-ish, 3 layers stay < 1e-5 (the Wan2.1 tests use the same bound).
The plain Wan comparisons come out bitwise equal on CPU (same kernels); the bound is what is allowed.
"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel

from conftest import REPO
from megatron_anyflow.models.wan.config import PRESETS, expert_time_range, wan_config
from megatron_anyflow.models.wan.convert import hf_to_megatron, load_full_state_dict
from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir, two_expert_boundary
from megatron_anyflow.models.wan.model import WanModel, token_time_runs
from megatron_anyflow.checkpoint.store import read_meta

# Odd tiny sizes: 3 heads of 20 (RoPE split 8:6:6), 3 layers, FFN 136, text 72.
ODD = dict(num_attention_heads=3, attention_head_dim=20, text_dim=72, freq_dim=32, ffn_dim=136, num_layers=3)
FAMILIES = {"ti2v-5b": (48, 48), "i2v-a14b": (36, 16)}  # (in_channels, out_channels)
SHAPES = [(1, 1, 4, 6), (2, 3, 6, 10), (3, 5, 2, 14)]  # (b, f, H, W): one frame, odd frames, batch 3


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def pair(family, delta=False, seed=0):
    """A diffusers Wan2.2-config transformer and this project's model with the same weights."""
    c_in, c_out = FAMILIES[family]
    torch.manual_seed(seed)
    hf = WanTransformer3DModel(in_channels=c_in, out_channels=c_out, **ODD).eval()
    model = WanModel(wan_config(None, hidden_size=60, num_attention_heads=3, num_layers=3, ffn_hidden_size=136,
                                text_dim=72, freq_dim=32, in_channels=c_in, out_channels=c_out,
                                delta_embedder=delta)).eval()
    load_full_state_dict(model, hf_to_megatron(hf.state_dict(), 20), "diffusers", strict=not delta)
    return hf, model


def ti2v_timesteps(b, f, hw, g):
    """diffusers WanPipeline(expand_timesteps=True): the first latent frame's tokens at 0, the rest at t."""
    t = (torch.rand(b, 1, generator=g) * 1000).expand(b, f * hw).clone()
    t[:, :hw] = 0.0
    return t


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["random-per-token", "ti2v"])
def test_matches_diffusers_wan22_with_per_token_timesteps(family, shape, layout):
    hf, model = pair(family)
    b, f, H, W = shape
    hw = (H // 2) * (W // 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, f, FAMILIES[family][0], H, W, generator=g)
    txt = torch.randn(b, 7, 72, generator=g)
    t = torch.rand(b, f * hw, generator=g) * 1000 if layout == "random-per-token" else ti2v_timesteps(b, f, hw, g)
    with torch.no_grad():
        ref = hf(x.permute(0, 2, 1, 3, 4), t, txt, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        out = model(x, t, None, txt)
    assert out.shape == (b, f, FAMILIES[family][1], H, W)
    assert rel(out, ref) < 1e-5


class _FusedTimeEmbedder(torch.nn.Module):
    """diffusers' `TimestepEmbedding` replaced by AnyFlow's fused embedding per token,
    ``(1 - g) emb_t(t) + g emb_r(r)`` (diffusers `AnyFlowTransformer3DModel`'s formula), r's sinusoid given."""

    def __init__(self, time_embedder, delta_embedder, r_sinusoid, gate):
        super().__init__()
        self.time_embedder, self.delta_embedder, self.gate = time_embedder, delta_embedder, gate
        self.r_sinusoid = r_sinusoid

    def forward(self, t_sinusoid):
        return (1 - self.gate) * self.time_embedder(t_sinusoid) + self.gate * self.delta_embedder(self.r_sinusoid)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_anyflow_per_token_t_and_r_match_diffusers_with_the_fused_embedding(shape):
    """AnyFlow's second time input per token: diffusers' Wan2.2 forward whose time embedder is AnyFlow's
    fused embedding of the per-token (t, r) is the reference."""
    import copy

    from diffusers.models.embeddings import Timesteps

    hf, model = pair("ti2v-5b", delta=True)
    with torch.no_grad():  # a trained-looking delta embedder, not a copy of the time embedder
        for p in model.condition_embedder.delta_embedder.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    b, f, H, W = shape
    hw = (H // 2) * (W // 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, f, 48, H, W, generator=g)
    txt = torch.randn(b, 7, 72, generator=g)
    t = torch.rand(b, f * hw, generator=g) * 1000
    r = t * torch.rand(b, f * hw, generator=g)
    delta = copy.deepcopy(hf.condition_embedder.time_embedder)
    delta.load_state_dict({k.replace("condition_embedder.delta_embedder.", ""): v
                           for k, v in model.state_dict().items() if k.startswith("condition_embedder.delta_embedder.")})
    r_sin = Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)(r.flatten()).unflatten(0, (b, -1))
    hf.condition_embedder.time_embedder = _FusedTimeEmbedder(hf.condition_embedder.time_embedder, delta, r_sin, 0.25)
    with torch.no_grad():
        ref = hf(x.permute(0, 2, 1, 3, 4), t, txt, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        out = model(x, t, r, txt)
        out_t = model(x, t, t, txt)
    assert rel(out, ref) < 1e-5
    assert rel(out_t, ref) > 1e-3  # r matters: the check would catch r being ignored


def test_per_token_times_constant_per_frame_equal_per_frame_times_bitwise():
    """Per-token t, r that are constant within each frame run the per-frame computation: same rows, same
    segments, same result bit for bit (and a per-frame r mixes with a per-token t)."""
    torch.manual_seed(0)
    model = WanModel(wan_config("tiny-wan2.2-ti2v")).eval()
    g = torch.Generator().manual_seed(3)
    b, f, H, W = 2, 3, 6, 10
    hw = (H // 2) * (W // 2)
    x, txt = torch.randn(b, f, 48, H, W, generator=g), torch.randn(b, 5, 384, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    r = t * torch.rand(b, f, generator=g)
    with torch.no_grad():
        per_frame = model(x, t, r, txt)
        per_token = model(x, t.repeat_interleave(hw, 1), r.repeat_interleave(hw, 1), txt)
        mixed = model(x, t.repeat_interleave(hw, 1), r, txt)
    assert torch.equal(per_frame, per_token)
    assert torch.equal(per_frame, mixed)


def test_token_time_runs_encode_the_ti2v_layout_in_two_rows():
    g = torch.Generator().manual_seed(4)
    t = ti2v_timesteps(2, 4, 6, g)
    t_rows, r_rows, runs = token_time_runs(t, t)
    assert runs == [(0, 6), (1, 18)]
    assert torch.equal(t_rows, t[:, [0, 6]])
    t2 = torch.rand(2, 24, generator=g)
    t2[:, 5:9] = 0.5  # one run of 4 equal tokens in both samples
    assert len(token_time_runs(t2, t2)[2]) == 24 - 3
    _, _, runs = token_time_runs(t, t.flip(0))  # equal within one sample only: no merge across samples
    assert sum(n for _, n in runs) == 24


def test_per_token_time_shape_errors_are_named():
    model = WanModel(wan_config("tiny-wan2.2-ti2v"))
    x, txt = torch.randn(1, 2, 48, 4, 6), torch.randn(1, 7, 384)
    with pytest.raises(ValueError, match=r"t must be \[b\], \[b, f\] or per token \[b, S\] = \[1\], \[1, 2\] or \[1, 12\]"):
        model(x, torch.rand(1, 11), None, txt)
    with pytest.raises(ValueError, match="latents have 16 channels; the model expects in_channels=48"):
        model(torch.randn(1, 2, 16, 4, 6), torch.rand(1), None, txt)


@pytest.mark.parametrize("preset, hf_kw, boundary", [
    ("wan2.2-ti2v-5b", dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
     None),
    ("wan2.2-t2v-a14b", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
     0.875),
    ("wan2.2-i2v-a14b", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16),
     0.9),
])
def test_released_presets_have_diffusers_parameter_shapes(preset, hf_kw, boundary):
    """The presets against diffusers' released transformer configs (attention_head_dim 128, text 4096,
    freq 256), built on the meta device: every tensor name and shape (5.00e9 / 14.29e9 parameters)."""
    with torch.device("meta"):
        ours = WanModel(wan_config(preset, perform_initialization=False, delta_embedder=False))
        hf = WanTransformer3DModel(attention_head_dim=128, text_dim=4096, freq_dim=256, **hf_kw)
    theirs = {k: tuple(v.shape) for k, v in hf_to_megatron(hf.state_dict(), 128).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if v is not None} == theirs
    assert ours.config.boundary_ratio == boundary
    n = sum(p.numel() for p in ours.parameters())
    assert abs(n - (5.0e9 if boundary is None else 14.29e9)) / n < 0.01, n


def test_tiny_presets_are_the_same_family():
    for tiny, full in (("tiny-wan2.2-ti2v", "wan2.2-ti2v-5b"), ("tiny-wan2.2-i2v-a14b", "wan2.2-i2v-a14b")):
        a, b = wan_config(tiny), wan_config(full, perform_initialization=False)
        assert (a.in_channels, a.out_channels, a.patch_size, a.boundary_ratio) == \
               (b.in_channels, b.out_channels, b.patch_size, b.boundary_ratio)


def test_boundary_is_recorded_only_for_experts_and_checked():
    assert "boundary_ratio" not in wan_config("wan2.1-1.3b").arch_dict()  # Wan2.1 checkpoints keep their format
    assert "boundary_ratio" not in wan_config("tiny-wan2.2-ti2v").arch_dict()
    arch = wan_config("tiny-wan2.2-i2v-a14b").arch_dict()
    assert arch["boundary_ratio"] == 0.9
    assert wan_config(None, **arch).boundary_ratio == 0.9
    with pytest.raises(ValueError, match="boundary_ratio=1.5; expected None"):
        wan_config("tiny", boundary_ratio=1.5)
    with pytest.raises(ValueError, match=r"two-expert Wan2.2 A14B model \(boundary_ratio=0.875.*t >= 875"):
        expert_time_range(wan_config("wan2.2-t2v-a14b", perform_initialization=False).arch_dict(), "teacher", None,
                          "--model-preset wan2.2-t2v-a14b")
    assert expert_time_range(wan_config("wan2.2-ti2v-5b", perform_initialization=False).arch_dict(), "teacher", None,
                             "x") is None


def test_trainer_refuses_a_two_expert_preset():
    from megatron_anyflow.training import dry_run as D
    from megatron_anyflow.training.arguments import parse_args

    args = parse_args(["--stage", "teacher", "--model-preset", "wan2.2-i2v-a14b", "--mock-data", "--train-iters", "1"])
    lines = []
    assert D.dry_run(args, log=lines.append) == 1
    assert any("two-expert Wan2.2 A14B" in line for line in lines), lines


# ---------------------------------------------------------------------------------------------------
# Conversion of Wan2.2 checkpoints
# ---------------------------------------------------------------------------------------------------
KW = dict(num_attention_heads=4, attention_head_dim=16, text_dim=384, freq_dim=32, ffn_dim=160, num_layers=2)


def tool(name, argv, capsys):
    """``python tools/NAME.py ARGV`` in-process (a subprocess costs ~20 s of imports on 2 shared cores):
    (exit status, stdout, stderr) with the CLI's error policy (megatron_anyflow/cli.py) applied."""
    from megatron_anyflow.cli import run_main

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    rc = run_main(mod.main, [str(a) for a in argv], prog=f"{name}.py")
    out = capsys.readouterr()
    return rc or 0, out.out, out.err


def ok(name, argv, capsys):
    rc, out, err = tool(name, argv, capsys)
    assert rc == 0, (out[-2000:], err[-2000:])
    return out


@pytest.fixture(scope="module")
def wan22_dirs(tmp_path_factory):
    """A tiny random TI2V-5B-shaped transformer, and a two-expert (A14B-shaped) pipeline index with
    two tiny I2V experts."""
    root = tmp_path_factory.mktemp("wan22")
    torch.manual_seed(0)
    WanTransformer3DModel(in_channels=48, out_channels=48, **KW).save_pretrained(root / "ti2v")
    pipe = root / "a14b"
    for name in ("transformer", "transformer_2"):
        WanTransformer3DModel(in_channels=36, out_channels=16, **KW).save_pretrained(pipe / name)
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9,
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return root


def test_ti2v_convert_load_compare_and_back(wan22_dirs, tmp_path, capsys):
    """convert_from_hf -> load -> the same outputs as diffusers with per-token timesteps; convert_to_hf
    --verify -> the same tensors bit for bit."""
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    ok("convert_from_hf", ["--input", wan22_dirs / "ti2v", "--output", tmp_path / "ckpt"], capsys)
    model = load_for_inference(str(tmp_path / "ckpt")).eval()
    assert (model.config.in_channels, model.config.out_channels) == (48, 48)
    hf = WanTransformer3DModel.from_pretrained(wan22_dirs / "ti2v").eval()
    g = torch.Generator().manual_seed(5)
    x, txt = torch.randn(2, 3, 48, 6, 4, generator=g), torch.randn(2, 6, 384, generator=g)
    t = ti2v_timesteps(2, 3, 6, g)
    with torch.no_grad():
        ref = hf(x.permute(0, 2, 1, 3, 4), t, txt, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        assert rel(model(x, t, None, txt), ref) < 1e-5
    out = ok("convert_to_hf", ["--input", tmp_path / "ckpt", "--output", tmp_path / "out", "--verify"], capsys)
    assert float(out.split("relative error")[1].split()[0]) < 1e-5
    ca, a = read_hf_transformer_dir(str(wan22_dirs / "ti2v"), progress=False)
    cb, b = read_hf_transformer_dir(str(tmp_path / "out"), progress=False)
    assert cb["_class_name"] == "WanTransformer3DModel" and (cb["in_channels"], cb["out_channels"]) == (48, 48)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_two_expert_pipeline_is_refused_and_an_expert_records_the_boundary(wan22_dirs, tmp_path, capsys):
    pipe = wan22_dirs / "a14b"
    assert two_expert_boundary(str(pipe)) == (0.9, "pipeline")
    assert two_expert_boundary(str(pipe / "transformer_2")) == (0.9, "transformer_2")
    assert two_expert_boundary(str(wan22_dirs / "ti2v")) == (None, None)
    rc, _, err = tool("convert_from_hf", ["--input", pipe, "--output", tmp_path / "c1"], capsys)
    assert rc == 2 and "two-expert Wan2.2 pipeline" in err, err[-2000:]
    out = ok("convert_from_hf", ["--input", pipe / "transformer", "--output", tmp_path / "c2"], capsys)
    assert "high-noise expert" in out
    meta = read_meta(str(tmp_path / "c2" / "release"))
    assert meta["wan_config"]["boundary_ratio"] == 0.9 and meta["wan_config"]["in_channels"] == 36
    assert meta["wan_config"]["expert"] == "high"
    out = ok("convert_to_hf", ["--input", tmp_path / "c2", "--output", tmp_path / "o2", "--verify"], capsys)
    assert float(out.split("relative error")[1].split()[0]) < 1e-5


def test_pretrain_refuses_a_two_expert_preset_before_building_it(capsys):
    from conftest import pretrain_cli

    assert pretrain_cli(["--stage", "teacher", "--model-preset", "wan2.2-t2v-a14b", "--mock-data",
                         "--train-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "--model-preset wan2.2-t2v-a14b is one expert of a two-expert Wan2.2 A14B model" in err, err[-2000:]


@pytest.mark.parametrize("start, length", [(0, 45), (7, 11), (15, 15), (40, 5)])
def test_per_token_segments_of_a_local_token_slice_match_the_per_frame_ones(start, length):
    """Under CP / SP a rank holds tokens [start, start + length): the per-token path's segments for times
    constant per frame are the per-frame path's (whose CP / SP slicing tests/test_context_parallel.py
    checks), rows included."""
    from megatron_anyflow.models.wan.layer import FrameSegments

    model = WanModel(wan_config("tiny-wan2.2-ti2v"))
    f, grid = 3, (3, 3, 5)
    t = torch.tensor([[0.0, 500.0, 250.0], [0.0, 400.0, 100.0]])
    r = t * 0.5
    t_rows, r_rows, segs = model._per_token_time_rows(t.repeat_interleave(15, 1), r, f, grid, start, length)
    assert segs.segments == FrameSegments.build(3, 15, start, length, uniform=False).segments
    assert torch.equal(t_rows, t) and torch.equal(r_rows, r)


# ---------------------------------------------------------------------------------------------------
# Generation through the Wan2.2 VAE codec
# ---------------------------------------------------------------------------------------------------
def test_generate_decodes_with_the_wan22_vae_codec(wan22_dirs, tmp_path, capsys):
    """tools/generate.py --codec wan2.2-vae on the tiny TI2V-shaped transformer: 48-channel latents of the
    codec's size (5 frames of 64 x 96 -> 2 x 4 x 6), decoded to a video at Wan2.2's 24 fps. The codec
    choice (`resolve_codec`, what generate.py calls): a VAE given alone is recognised as Wan2.2's, a
    16-channel model or a Wan2.2 VAE named as wan-vae is refused with the reason. (The codec's decode
    itself equals diffusers': tests/test_prepare_dataset.py.)"""
    from safetensors.torch import load_file

    from test_pipeline_export import tiny_wan22_vae

    from megatron_anyflow.anyflow import generation as G

    vae = tmp_path / "vae"
    tiny_wan22_vae(str(vae))
    out = tmp_path / "out"
    ok("generate", ["--checkpoint", wan22_dirs / "ti2v", "--codec", "wan2.2-vae", "--vae", vae, "--prompt",
                    "a red panda", "--frames", "5", "--height", "64", "--width", "96", "--steps", "2", "--no-progress",
                    "--output", out, "--save-latents", out / "lat.safetensors"], capsys)
    lat = load_file(str(out / "lat.safetensors"))["steps_2"]
    assert lat.shape == (1, 2, 48, 4, 6) and bool(torch.isfinite(lat).all())
    record = json.loads((out / "generation.json").read_text())
    assert (record["codec"], record["fps"], record["frames"]) == ("wan2.2-vae", 24, 5)
    assert os.path.getsize(out / "steps_2.mp4") > 0
    codec = G.resolve_codec(None, str(vae), {}, None, 48, device="cpu")
    assert codec.name == "wan2.2-vae"
    assert G.video_size(codec, {}, None, None, None) == (704, 1280, 121, (31, 48, 44, 80))  # TI2V-5B's default
    with pytest.raises(G.GenerationError, match="'wan2.2-vae' has 48 latent channels .* in_channels=16"):
        G.resolve_codec("wan2.2-vae", str(vae), {}, None, 16, device="cpu")
    with pytest.raises(G.GenerationError, match="use --codec wan2.2-vae"):
        G.resolve_codec("wan-vae", str(vae), {}, None, 48, device="cpu")
