"""Teacher-synthesised data from a two-expert teacher (Wan2.2 A14B): ``tools/synthesize_dataset.py --teacher
--teacher-2`` and the library's routed ``TeacherEulerSampler(boundary=, guidance_scale_2=)``.

Two tiny random experts of the ``tiny-wan2.2-t2v-a14b`` family (diffusers ``WanTransformer3DModel`` at its
sizes, different weights) are saved as a two-expert pipeline's ``transformer/`` and ``transformer_2/`` and
converted with ``convert_from_hf`` (which records ``wan_config.expert`` and ``boundary_ratio``), as
examples/pretrain_anyflow_wan22_a14b.sh does with the released ones.

(a) The reference is diffusers' ``WanPipeline`` with ``transformer`` + ``transformer_2`` + ``boundary_ratio``
    on the same weights, fp32, given latents and prompt / negative embeddings, with
    ``FlowMapEulerDiscreteScheduler(shift=5)``: its ``set_timesteps(N)`` is the project's grid
    (tests/test_sampler.py) and its step without ``r_timestep`` is the Euler step to the next grid point,
    formed in float64 like ours. WanPipeline's routing (``t >= boundary_ratio * 1000``: the high expert) and
    CFG (``guidance_scale`` for ``transformer``, ``guidance_scale_2`` for ``transformer_2``) are then the
    only things under test besides the forward.

    Tolerance. The update and the CFG combination are the same float operations on both sides; the
    forwards run the same operations up to summation order (fused q/k/v GEMMs, another norm kernel:
    tests/test_wan22.py). A reordered reduction of width k <= 160 differs by ~ sqrt(k) u (u = 2^-24 =
    6e-8), ~6 reductions per layer and 2 layers: ~1e-6 relative per forward at worst, typically less. A
    velocity error e (relative) enters the state as dt * e * |v| with sum(dt) = 1 over the N steps, the CFG
    combination ``v_u + g (v_c - v_u)`` scaling it by up to 1 + 2g (g <= 4 here), and the tiny DiTs barely
    amplify state differences over one unit of time: a few 1e-6 relative at most. Bound: 5e-6 (relative,
    Frobenius). Measured: 2.1e-7 (N = 4) and 2.7e-7 (N = 12), a few float32 ulp. The controls are off by
    1e-1 (the experts' guidance scales swapped) and 5e-2 (N = 12's step from exactly b given to the low
    expert), four to five orders above the bound.
(b) The CLI writes a dataset equal to the library's sampler on the CLI's noise stream, records the pair in
    ``index.json``; the swapped argument order gives the same dataset.
(c) Each bad request exits 2 with one line naming the path and the field, and writes nothing.
"""

import importlib.util
import json
import os

import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from conftest import REPO
from test_wan22 import tool  # in-process tools/NAME.py under the CLI error policy
from megatron_anyflow.anyflow.sampler import TeacherEulerSampler
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, to_model_scale

# tiny-wan2.2-t2v-a14b's sizes in diffusers' terms: 4 heads x 16 = 64 wide, FFN 160, text 384, 2 layers.
KW = dict(num_attention_heads=4, attention_head_dim=16, text_dim=384, freq_dim=32, ffn_dim=160, num_layers=2,
          in_channels=16, out_channels=16)
B = 0.875
LATENT = (3, 16, 4, 6)  # [f, c, h, w]: 9 video frames of 32 x 48


def _random_expert(seed, **overrides):
    """A diffusers expert (``KW``, with ``overrides``) with its default random init, every tensor perturbed (norm
    gains and biases off their constants too), so that the two experts' fields and so a misrouting clearly
    differ."""
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**dict(KW, **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Converted checkpoints: ``high`` / ``low`` (boundary 0.875), ``low9`` (a low expert with boundary 0.9),
    ``single`` (one model, no boundary); and the diffusers pipeline directory of high + low."""
    root = tmp_path_factory.mktemp("a14b")
    pipes = {0.875: root / "pipe", 0.9: root / "pipe9"}
    for (b, pipe), seeds in zip(pipes.items(), ((1, 2), (3, 4))):
        for sub, seed in zip(("transformer", "transformer_2"), seeds):
            _random_expert(seed).save_pretrained(pipe / sub)
        (pipe / "model_index.json").write_text(json.dumps({
            "_class_name": "WanPipeline", "boundary_ratio": b,
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    _random_expert(5).save_pretrained(root / "single_hf")
    out = {}
    from megatron_anyflow.cli import run_main

    spec = importlib.util.spec_from_file_location("convert_from_hf", os.path.join(REPO, "tools", "convert_from_hf.py"))
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    for name, src in (("high", pipes[0.875] / "transformer"), ("low", pipes[0.875] / "transformer_2"),
                      ("low9", pipes[0.9] / "transformer_2"), ("single", root / "single_hf")):
        out[name] = root / "ckpt" / name
        rc = run_main(conv.main, ["--input", str(src), "--output", str(out[name]), "--add-delta-embedder"],
                      prog="convert_from_hf.py")
        assert not rc, name
    from megatron_anyflow.checkpoint.store import read_meta, resolve_checkpoint_dir
    from megatron_anyflow.models.wan.config import wan_config

    arch, preset = read_meta(resolve_checkpoint_dir(str(out["high"])))["wan_config"], wan_config("tiny-wan2.2-t2v-a14b")
    assert (arch["hidden_size"], arch["num_layers"], arch["ffn_hidden_size"], arch["expert"], arch["boundary_ratio"]) \
        == (preset.hidden_size, preset.num_layers, preset.ffn_hidden_size, "high", preset.boundary_ratio)
    out["pipe"] = pipes[0.875]
    return out


def _load(path):
    from megatron_anyflow.checkpoint.model_io import load_as_model

    return load_as_model(str(path))  # what the CLI samples


def _inputs(seed, b=2):
    """Fresh random latents at t = 1, prompt embeddings and a negative embedding (float32)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((b, *LATENT), generator=g), torch.randn(b, 7, 384, generator=g),
            torch.randn(b, 5, 384, generator=g))


def _wan_pipeline(pipe_dir, n, noise, text, neg, g, g2):
    """diffusers' WanPipeline (two experts, boundary_ratio) on the project's grid: final latents [b, f, c, h, w]."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMapEulerDiscreteScheduler(shift=5.0),
                       transformer=WanTransformer3DModel.from_pretrained(pipe_dir / "transformer").eval(),
                       transformer_2=WanTransformer3DModel.from_pretrained(pipe_dir / "transformer_2").eval(),
                       boundary_ratio=B)
    pipe.set_progress_bar_config(disable=True)
    f, _, h, w = LATENT
    with torch.no_grad():
        out = pipe(latents=noise.permute(0, 2, 1, 3, 4).clone(), prompt_embeds=text, negative_prompt_embeds=neg,
                   guidance_scale=g, guidance_scale_2=g2, num_inference_steps=n, height=8 * h, width=8 * w,
                   num_frames=4 * (f - 1) + 1, output_type="latent", return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_two_expert_step_assignment_is_wan_pipelines():
    """The per-step experts: ``T >= to_model_scale(b)`` on the plain grid. Wan's shift-5 grid hits 0.875 exactly
    at N = 12 (shift(7/12)): that step is the high expert's (WanPipeline's ``>=``). The float32 comparison (the
    timestep the expert is fed) and WanPipeline's with a float64 scheduler agree on every grid N <= 200."""
    s = TeacherEulerSampler(12, boundary=B)
    assert s.times[5].item() == B and s.experts == ["high"] * 6 + ["low"] * 6
    # N = 4: 1, 0.9375 | 0.833, 0.625: the step 0.9375 -> 0.833 crosses b and runs on the high expert
    assert TeacherEulerSampler(4, boundary=B).experts == ["high", "high", "low", "low"]
    for b in (0.875, 0.9):
        for n in range(1, 201):
            grid = flow_map_time_grid(n, 5.0)[:-1]
            by64 = ["high" if t * 1000 >= b * 1000 else "low" for t in grid.tolist()]
            assert TeacherEulerSampler(n, boundary=b).experts == by64, (b, n)
    assert TeacherEulerSampler(4).experts is None


def test_routed_sampler_refusals():
    def m(*a):
        raise AssertionError("not called")

    z = torch.zeros(1, *LATENT)
    with pytest.raises(ValueError, match="needs model_2"):
        TeacherEulerSampler(2, boundary=B)(m, z, None, None)
    with pytest.raises(ValueError, match="model_2 .* needs a boundary"):
        TeacherEulerSampler(2)(m, z, None, None, model_2=m)
    with pytest.raises(ValueError, match="guidance_scale_2 .* needs a boundary"):
        TeacherEulerSampler(2, guidance_scale_2=2.0)
    for bad in (0.0, 1.0, "x"):
        with pytest.raises(ValueError, match="boundary"):
            TeacherEulerSampler(2, boundary=bad)
    with pytest.raises(ValueError, match="guidance_scale_2 must be finite"):
        TeacherEulerSampler(2, boundary=B, guidance_scale_2=float("inf"))
    # CFG on only the low expert still needs the negative embedding
    with pytest.raises(ValueError, match="negative_text is required"):
        TeacherEulerSampler(2, guidance_scale=1.0, boundary=B, guidance_scale_2=2.0)(m, z, None, None, model_2=m)


@pytest.mark.parametrize("n, g, g2", [(4, 3.0, 2.0), (12, 2.5, 4.0)])
def test_routed_teacher_equals_diffusers_wan_pipeline(ckpts, n, g, g2):
    high, low = _load(ckpts["high"]), _load(ckpts["low"])
    noise, text, neg = _inputs(100 + n)
    ref = _wan_pipeline(ckpts["pipe"], n, noise, text, neg, g, g2)
    out = TeacherEulerSampler(n, boundary=B, guidance_scale=g, guidance_scale_2=g2)(high, noise, text, neg,
                                                                                    model_2=low)
    err = rel(out, ref)
    print(f"N={n}: relative difference to WanPipeline {err:.3e} (max abs {float((out - ref).abs().max()):.3e})")
    assert err < 5e-6
    # controls: a wrong routing or CFG assignment is far outside the bound
    swapped = TeacherEulerSampler(n, boundary=B, guidance_scale=g2, guidance_scale_2=g)(high, noise, text, neg,
                                                                                        model_2=low)
    print(f"  control, guidance scales swapped: {rel(swapped, ref):.3e}")
    assert rel(swapped, ref) > 1e-3
    if n == 12:  # the step starting exactly on b given to the low expert (a boundary one float32 ulp higher)
        above = float(torch.nextafter(to_model_scale(B), torch.tensor(2000.0))) / 1000
        tie_low = TeacherEulerSampler(n, boundary=above, guidance_scale=g, guidance_scale_2=g2)
        assert tie_low.experts == ["high"] * 5 + ["low"] * 7
        tie = rel(tie_low(high, noise, text, neg, model_2=low), ref)
        print(f"  control, the step from b on the low expert: {tie:.3e}")
        assert tie > 1e-3


def _source(tmp_path):
    from megatron_anyflow.data.latent_dataset import MockLatentDataset, write_latent_dataset

    mock = MockLatentDataset(3, LATENT, 5, 384, seed=2)
    src = tmp_path / "src"
    write_latent_dataset(str(src), torch.stack([mock[i][0] for i in range(3)]),
                         torch.stack([mock[i][1] for i in range(3)]), mock.negative_text, {"note": "test"},
                         dtype=torch.float32)  # float32: the written samples are the sampler's exactly
    return src, mock


def test_cli_writes_the_routed_teacher_samples_in_either_order(ckpts, tmp_path, capsys):
    from megatron_anyflow.data.latent_dataset import LatentDataset

    src, mock = _source(tmp_path)
    common = ["--data-path", src, "--steps", "4", "--guidance", "3", "--guidance-2", "2", "--samples-per-prompt",
              "2", "--batch-size", "4", "--seed", "5"]
    outs = {}
    for name, (a, b) in (("hl", ("high", "low")), ("lh", ("low", "high"))):
        rc, _, err = tool("synthesize_dataset", ["--teacher", ckpts[a], "--teacher-2", ckpts[b],
                                                 "--output", tmp_path / name, *common], capsys)
        assert rc == 0, err[-2000:]
        outs[name] = LatentDataset(str(tmp_path / name))
    syn = outs["hl"]
    assert len(syn) == 6 and syn.latent_shape == LATENT
    rec = syn.index["synthesized"]
    assert (rec["teacher"], rec["teacher_2"]) == (str(ckpts["high"]), str(ckpts["low"]))
    assert (rec["boundary_ratio"], rec["guidance"], rec["guidance_2"], rec["steps"]) == (B, 3.0, 2.0, 4)
    assert outs["lh"].index == syn.index  # the roles come from the checkpoints, not the order
    lat = {k: torch.stack([d[i][0] for i in range(6)]) for k, d in outs.items()}
    assert torch.equal(lat["hl"], lat["lh"])
    # the library sampler on the CLI's noise stream: batches of 4 and 2 from one generator seeded 5
    high, low = _load(ckpts["high"]), _load(ckpts["low"])
    texts = torch.stack([mock[i % 3][1] for i in range(6)])
    gen = torch.Generator().manual_seed(5)
    sampler = TeacherEulerSampler(4, guidance_scale=3.0, boundary=B, guidance_scale_2=2.0)
    ref = torch.cat([sampler(high, torch.randn((len(t), *LATENT), generator=gen), t,
                             mock.negative_text.expand(len(t), -1, -1), model_2=low)
                     for t in (texts[:4], texts[4:])])
    assert torch.equal(lat["hl"], ref)
    assert torch.equal(syn[4][1], mock[1][1]) and torch.equal(syn.negative_text, mock.negative_text)


def test_bf16_teacher_samples_are_the_bf16_models_samples(ckpts, tmp_path, capsys):
    """``--bf16``: the samples are the library sampler's with both experts loaded in bf16 (``WanConfig.bf16``:
    the same operations, bitwise), recorded as such, and close to the float32 teacher's: bf16 rounds weights and
    activations to 2^-9 relative, a few 1e-3 on a forward of these widths, amplified by CFG (1 + 2g = 7) over 4
    steps to ~1e-2; the bound 0.1 is an order above that, and the difference is far above float32 rounding
    (> 1e-4): it really ran in bf16."""
    from megatron_anyflow.checkpoint.model_io import load_as_model
    from megatron_anyflow.data.latent_dataset import LatentDataset

    src, mock = _source(tmp_path)
    common = ["--teacher", ckpts["high"], "--teacher-2", ckpts["low"], "--data-path", src, "--steps", "4",
              "--guidance", "3", "--batch-size", "3", "--seed", "2"]
    for name, extra in (("bf16", ["--bf16"]), ("fp32", [])):
        rc, _, err = tool("synthesize_dataset", [*common, "--output", tmp_path / name, *extra], capsys)
        assert rc == 0, err[-2000:]
    bf, fp = (LatentDataset(str(tmp_path / n)) for n in ("bf16", "fp32"))
    assert bf.index["synthesized"]["dtype"] == "bf16" and fp.index["synthesized"]["dtype"] == "fp32"
    high, low = (load_as_model(str(ckpts[e]), bf16=True) for e in ("high", "low"))
    assert high.dtype == torch.bfloat16
    texts = torch.stack([mock[i][1] for i in range(3)])
    ref = TeacherEulerSampler(4, guidance_scale=3.0, boundary=B)(
        high, torch.randn((3, *LATENT), generator=torch.Generator().manual_seed(2)), texts,
        mock.negative_text.expand(3, -1, -1), model_2=low)
    a, b = (torch.stack([d[i][0] for i in range(3)]) for d in (bf, fp))
    assert torch.equal(a, ref.to(a.dtype))
    diff = float((a.double() - b.double()).norm() / b.double().norm())
    assert 1e-4 < diff < 0.1, diff


@pytest.mark.parametrize("case", ["same-expert", "single-with-teacher-2", "expert-alone", "boundaries-differ",
                                  "guidance-2-alone"])
def test_bad_teacher_pairs_are_refused_by_name(ckpts, tmp_path, capsys, case):
    src, _ = _source(tmp_path)
    h, lo, lo9, single = (str(ckpts[k]) for k in ("high", "low", "low9", "single"))
    argv, needles = {
        "same-expert": (["--teacher", h, "--teacher-2", h], [h, "wan_config.expert high", "both the high-noise"]),
        "single-with-teacher-2": (["--teacher", single, "--teacher-2", lo],
                                  [f"--teacher {single} is not one expert", "wan_config.boundary_ratio None"]),
        "expert-alone": (["--teacher", lo], [f"--teacher {lo} is one expert", "wan_config.expert low",
                                             "--teacher-2"]),
        "boundaries-differ": (["--teacher", h, "--teacher-2", lo9],
                              ["wan_config.boundary_ratio", f"0.875 in {h}", f"0.9 in {lo9}"]),
        "guidance-2-alone": (["--teacher", single, "--guidance-2", "2"], ["--guidance-2", "needs --teacher-2"]),
    }[case]
    out = tmp_path / "out"
    rc, _, err = tool("synthesize_dataset", [*argv, "--data-path", src, "--output", out, "--steps", "2"], capsys)
    assert rc == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert all(s in line for s in needles), line
    assert not out.exists()
    if case == "single-with-teacher-2":  # the other order names the other path
        rc, _, err = tool("synthesize_dataset", ["--teacher", lo, "--teacher-2", single, "--data-path", src,
                                                 "--output", out], capsys)
        assert rc == 2 and f"--teacher-2 {single} is not one expert" in err


def test_only_the_called_expert_is_on_the_device():
    """`two_expert.one_resident` (the CLIs on a GPU: two float32 14B experts do not fit one 80 GB GPU together):
    the expert being called is moved onto the device and the other off it, twice per rollout; the result is
    the sampler's with the experts called directly. The moves are recorded, not made (no GPU needed)."""
    from megatron_anyflow.anyflow.two_expert import one_resident

    moves = []

    class Expert(torch.nn.Module):
        def __init__(self, name, scale):
            super().__init__()
            self.name, self.scale = name, scale

        def to(self, device):
            moves.append((self.name, str(device)))
            return self

        def forward(self, z, T, R, text):
            return self.scale * z + T[:, :, None, None, None] / 1000 + text.mean()

    high, low = Expert("high", 0.5), Expert("low", -1.0)
    fns = one_resident({"high": high, "low": low}, "cuda")
    fh, fl = fns["high"], fns["low"]
    assert moves == [("high", "cpu"), ("low", "cpu")]
    del moves[:]
    sampler = TeacherEulerSampler(4, boundary=B, guidance_scale=2.0, guidance_scale_2=3.0)  # high, high, low, low
    noise, text, neg = _inputs(7)
    outs = [sampler(fh, noise, text, neg, model_2=fl) for _ in range(2)]
    assert moves == [("high", "cuda"), ("high", "cpu"), ("low", "cuda"),
                     ("low", "cpu"), ("high", "cuda"), ("high", "cpu"), ("low", "cuda")]
    ref = sampler(high, noise, text, neg, model_2=low)
    assert all(torch.equal(o, ref) for o in outs)
    assert one_resident({"high": high, "low": low}, "cpu") == {"high": high, "low": low}  # CPU: the experts
