"""Two-expert models (Wan2.2 A14B), trained expert by expert and exported as one pipeline.

* The range-restricted (t, r) draw equals a float64 evaluation of its formula (uniforms mapped onto the
  unshifted range, then shifted), and its distribution is the full sampler's conditioned on the range
  (two-sample Kolmogorov-Smirnov against rejection sampling of the unrestricted sampler).
* `expert_time_range`: the ranges and the refusals.
* The trainer: a stage-1 run of one expert calls the model only inside its range (t, r recorded by a hook),
  and its checkpoint names the expert; a resume as the other expert is refused.
* `convert_to_hf --expert-2 --pipeline`: the export loads as ``AnyFlowTwoExpertPipeline`` in diffusers
  (``trust_remote_code``), its grid is the library's two-expert grid, its latents equal this project's
  two-expert sampler (``--verify``, 1e-4; the measured error is ~1e-7, as for one transformer:
  tests/test_pipeline_export.py), a crossing jump is refused, and bad pairs are refused by name.
"""

import json
import math
import os

import pytest
import torch

from megatron_anyflow.anyflow.timesteps import (KIND_BOUNDARY, KIND_FREE, KIND_R_ZERO, TimeSamplerConfig, sample_t_r,
                                                shift_time, two_expert_time_grid)
from megatron_anyflow.models.wan.config import expert_time_range, wan_config

B = 0.875
RANGES = [(B, 1.0), (0.0, B), (0.3, 0.6)]


def _f64_draw(seed, n, cfg):
    """The documented draw in float64: u ~ U(a, c) (the same uniforms), max / min, shift, the split."""
    s, (lo, hi) = cfg.shift, cfg.time_range
    u = torch.rand((2, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    a, c = lo / (s - (s - 1) * lo), hi / (s - (s - 1) * hi)
    u = a + (c - a) * u
    t, r = shift_time(u.max(0).values, s), shift_time(u.min(0).values, s)
    nb, nr = math.floor(cfg.boundary_fraction * n + 1e-9), math.floor(cfg.r_zero_fraction * n + 1e-9)
    r[:nb] = t[:nb]
    r[nb:nb + nr] = lo
    return t, r


@pytest.mark.parametrize("time_range", RANGES)
def test_range_draw_equals_its_float64_formula(time_range):
    cfg = TimeSamplerConfig(time_range=time_range)
    for seed in (3, 11):
        t, r, kind = sample_t_r(64, torch.Generator().manual_seed(seed), cfg)
        t64, r64 = _f64_draw(seed, 64, cfg)
        # float32 rounding of u, of the affine map and of the shift: a few units of 2^-24 relative
        assert torch.allclose(t.double(), t64, rtol=0, atol=1e-6) and torch.allclose(r.double(), r64, rtol=0, atol=1e-6)
        lo, hi = time_range
        assert bool(((t >= lo) & (t <= hi) & (r >= lo) & (r <= t)).all())
        assert bool((r[kind == KIND_R_ZERO] == lo).all()) and torch.equal(r[kind == KIND_BOUNDARY], t[kind == KIND_BOUNDARY])
    # the full range keeps the unrestricted draw bit for bit
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full, default = sample_t_r(32, g1, TimeSamplerConfig(time_range=(0.0, 1.0))), sample_t_r(32, g2)
    assert all(torch.equal(a, b) for a, b in zip(full, default))


def _ks(a, b):
    a, b = torch.sort(a).values, torch.sort(b).values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


@pytest.mark.parametrize("time_range", [(B, 1.0), (0.0, B)])
def test_range_draw_is_the_full_sampler_conditioned_on_the_range(time_range):
    """Free samples of the restricted draw against the unrestricted draw's free samples with both times in
    range (rejection). Fixed seeds; the bound is the two-sample KS critical value at alpha = 1e-4,
    sqrt(-ln(alpha / 2) / 2) * sqrt((n + m) / (n m)), which a wrong density (e.g. an affine map of the
    shifted times onto the range) exceeds many times over."""
    lo, hi = time_range
    n = 40000
    free = slice(int(0.75 * n), n)
    t, r, kind = sample_t_r(n, torch.Generator().manual_seed(1), TimeSamplerConfig(time_range=time_range))
    assert bool((kind[free] == KIND_FREE).all())
    T, R, K = sample_t_r(400000, torch.Generator().manual_seed(2), TimeSamplerConfig(boundary_fraction=0.0,
                                                                                    r_zero_fraction=0.0))
    keep = (T >= lo) & (T <= hi) & (R >= lo) & (R <= hi)
    m = int(keep.sum())
    bound = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt((n / 4 + m) / (n / 4 * m))
    assert m > 5000
    assert _ks(t[free], T[keep]) < bound and _ks(r[free], R[keep]) < bound
    # the control: mapping the shifted times affinely onto the range is another distribution
    wrong = lo + (hi - lo) * sample_t_r(n, torch.Generator().manual_seed(1))[0][free]
    assert _ks(wrong, T[keep]) > 3 * bound


def test_expert_time_range_rules():
    a14b = wan_config("tiny-wan2.2-t2v-a14b").arch_dict()
    assert expert_time_range(a14b, "stage1", "high", "x") == (B, 1.0)
    assert expert_time_range(a14b, "stage1", "low", "x") == (0.0, B)
    assert expert_time_range(dict(a14b, expert="low"), "stage1", None, "x") == (0.0, B)
    assert expert_time_range(wan_config("tiny").arch_dict(), "stage1", None, "x") is None
    with pytest.raises(ValueError, match="name the expert this run trains: --expert high"):
        expert_time_range(a14b, "stage1", None, "--model-preset tiny-wan2.2-t2v-a14b")
    with pytest.raises(ValueError, match="--expert high contradicts ckpt, which is the low-noise expert"):
        expert_time_range(dict(a14b, expert="low"), "stage1", "high", "ckpt")
    for stage, model in (("stage2", "far"), ("teacher", "bidirectional"), ("stage1", "far")):
        with pytest.raises(ValueError, match=f"--stage {stage} --model {model} is not supported for two experts"):
            expert_time_range(a14b, stage, "high", "x", model)
    assert expert_time_range(a14b, "stage2", None, "x") is None  # stage 2 trains both experts (the whole range)
    with pytest.raises(ValueError, match="stage 2 of a two-expert model trains both experts together"):
        expert_time_range(a14b, "stage2", "high", "x")
    with pytest.raises(ValueError, match="--expert low names one expert of a two-expert model, but x is a single"):
        expert_time_range(wan_config("tiny").arch_dict(), "stage1", "low", "x")
    with pytest.raises(ValueError, match="expert='mid'"):
        wan_config("tiny-wan2.2-t2v-a14b", expert="mid")
    with pytest.raises(ValueError, match="needs a boundary_ratio"):
        wan_config("tiny", expert="high")
    assert "expert" not in wan_config("wan2.1-1.3b").arch_dict()  # single models keep their checkpoint format


LATENT = (3, 16, 4, 6)


def _expert_args(root, expert, iters=2, extra=()):
    from megatron_anyflow.training.arguments import parse_args

    return parse_args(["--stage", "stage1", "--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", expert,
                       "--mock-data", "--mock-num-samples", "8", "--mock-latent-shape", *map(str, LATENT),
                       "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters",
                       "0", "--train-iters", str(iters), "--log-interval", "100", "--save", str(root), *extra])


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two tiny stage-1 expert checkpoints (their adapters moved: lr 1e-2), and the (T, R) of every model
    call of each run."""
    from megatron_anyflow.training.trainer import Trainer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("experts")
    calls = {}
    for expert in ("high", "low"):
        trainer = Trainer(_expert_args(root / expert, expert), log=lambda *a, **k: None)
        seen = calls[expert] = []
        trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append((a[1].detach().clone(),
                                                                                a[2].detach().clone())),
                                                with_kwargs=True)
        trainer.train()
    return root, calls


def test_an_expert_run_calls_the_model_only_inside_its_range(experts):
    """Stage 1's four forwards per micro-batch (u_c, u_null, u_+- at T +- e, e = 5): R in the expert's range
    on the 0..1000 scale, T within e of it; the checkpoint records the expert."""
    root, calls = experts
    e = 5.0
    for expert, (lo, hi) in (("high", (875.0, 1000.0)), ("low", (0.0, 875.0))):
        T = torch.cat([t.flatten() for t, _ in calls[expert]])
        R = torch.cat([r.flatten() for _, r in calls[expert]])
        assert len(calls[expert]) == 2 * 4  # 2 iterations x 4 forwards
        assert float(R.min()) >= lo and float(R.max()) <= hi, (expert, R.min(), R.max())
        assert float(T.min()) >= lo - e and float(T.max()) <= hi + e, (expert, T.min(), T.max())
        meta = json.load(open(root / expert / "iter_0000002" / "anyflow_meta.json"))
        assert meta["wan_config"]["expert"] == expert and meta["wan_config"]["boundary_ratio"] == B


def test_resuming_an_expert_as_the_other_is_refused(experts, capsys):
    from conftest import pretrain_cli

    root, _ = experts
    argv = ["--stage", "stage1", "--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", "low", "--mock-data",
            "--mock-latent-shape", *map(str, LATENT), "--train-iters", "3", "--load", str(root / "high"),
            "--save", str(root / "high")]
    assert pretrain_cli(argv) == 2
    assert "wan_config.expert differs" in capsys.readouterr().err


def _convert(argv, capsys):
    from test_pipeline_export import load_tool

    capsys.readouterr()
    rc = load_tool("convert_to_hf").main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def export(experts, tmp_path_factory):
    from test_pipeline_export import load_tool, tiny_umt5, tiny_vae

    root, _ = experts
    wan = tmp_path_factory.mktemp("wan")
    tiny_vae(str(wan / "vae"))
    tiny_umt5(str(wan))
    out = root / "a14b"
    # --input the low expert, --expert-2 the high one: the order comes from the checkpoints
    rc = load_tool("convert_to_hf").main(["--input", str(root / "low"), "--expert-2", str(root / "high"), "--output",
                                          str(out), "--merge-lora", "generator", "--ema", "--pipeline", "--vae",
                                          str(wan / "vae"), "--text-encoder", str(wan / "text_encoder")])
    assert rc == 0
    return out, wan


def test_two_expert_export_loads_in_diffusers_with_the_library_grid(export):
    from diffusers import DiffusionPipeline

    out, _ = export
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == ["pipeline_anyflow_two_expert", "AnyFlowTwoExpertPipeline"]
    assert index["boundary_ratio"] == B and index["transformer_2"] == ["diffusers", "AnyFlowTransformer3DModel"]
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True, local_files_only=True)
    assert type(pipe).__name__ == "AnyFlowTwoExpertPipeline" and pipe.config.boundary_ratio == B
    for n in (1, 2, 3, 4, 8):
        sig = torch.tensor(pipe.two_expert_sigmas(n), dtype=torch.float64)
        grid = two_expert_time_grid(n, 5.0, B)
        assert torch.allclose(shift_time(sig, 5.0), grid[:-1], rtol=0, atol=1e-12), n
    # the high expert's weights are --input's other checkpoint (the high one): its adapter moved differently
    hi, lo = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert any(not torch.equal(hi[k], lo[k]) for k in hi)


def test_the_pipeline_refuses_a_jump_across_the_boundary(export):
    from diffusers import DiffusionPipeline

    out, _ = export
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True, local_files_only=True,
                                             text_encoder=None, tokenizer=None)
    text = torch.randn(1, 4, 384)
    with pytest.raises(ValueError, match="crosses the expert boundary 875"):
        pipe(prompt_embeds=text, sigmas=[1.0, 0.5], num_inference_steps=2, height=32, width=48, num_frames=9,
             output_type="latent")


def test_bad_two_expert_pairs_are_refused(experts, export, tmp_path, capsys):
    root, _ = experts
    _, wan = export
    common = ["--pipeline", "--vae", wan / "vae", "--text-encoder", wan / "text_encoder", "--no-verify"]
    rc, _, err = _convert(["--input", root / "high", "--expert-2", root / "high", "--output", tmp_path / "a",
                           *common], capsys)
    assert rc == 2 and "both the high-noise expert" in err
    from test_pipeline_export import tiny_stage1_checkpoint

    single = tiny_stage1_checkpoint(str(tmp_path / "single"))
    rc, _, err = _convert(["--input", root / "high", "--expert-2", single, "--output", tmp_path / "b", *common], capsys)
    assert rc == 2 and "is not one expert of a two-expert model" in err
    rc, _, err = _convert(["--input", root / "high", "--expert-2", root / "low", "--output", tmp_path / "c"], capsys)
    assert rc == 2 and "pass --pipeline" in err
    assert not any(os.path.exists(tmp_path / x) for x in "abc")
