"""Stage 2 of a two-expert model (Wan2.2 A14B): both experts resident, every call routed to the expert of its range.

* `TwoExpertWanModel` hands each sample to its expert: a mixed batch equals each expert on its own rows
  (outputs and parameter gradients), a batch in one range is that expert's call bit for bit, ``T = R = b``
  is the high expert's (diffusers' rule), and a crossing jump is refused.
* The backward simulation with a boundary splits the one segment that crosses it: with two different
  Gaussians' exact flow maps as the experts it returns the exact composed map for every (N, k); without the
  split the router refuses the rollout.
* The trainer: a tiny two-expert stage 2 from two stage-1 expert runs calls each expert only on its range
  (its co-trained stage-1 loss within the finite difference e = 5), moves both experts' generator adapters,
  resumes bit for bit, exports as one two-expert pipeline that diffusers loads (``--verify``), and refuses
  bad requests by name.
"""
import json

import pytest
import torch

from megatron_anyflow.anyflow.distill import SimulationPlan, flow_map_backward_simulation, sample_simulation_plan, DistillConfig
from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.sampler import route_experts
from megatron_anyflow.anyflow.timesteps import to_model_scale
from megatron_anyflow.anyflow.two_expert import TwoExpertWanModel
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel

B = 0.875
LATENT = (3, 16, 4, 6)


def _tiny_experts():
    torch.manual_seed(1)
    high = WanModel(wan_config("tiny-wan2.2-t2v-a14b", expert="high", delta_embedder=True))
    torch.manual_seed(2)
    low = WanModel(wan_config("tiny-wan2.2-t2v-a14b", expert="low", delta_embedder=True))
    return high, low


def test_a_mixed_batch_equals_each_expert_on_its_rows():
    high, low = _tiny_experts()
    pair = TwoExpertWanModel(high, low, B)
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(5, *LATENT, generator=g), torch.randn(5, 6, 384, generator=g)
    Bm = float(to_model_scale(B))
    # rows: high jump, low jump, single time at b (high), jump from b down (low), high single time
    T = torch.tensor([990.0, 700.0, Bm, Bm, 950.0])[:, None].expand(5, 3).contiguous()
    R = torch.tensor([900.0, 100.0, Bm, 300.0, 950.0])[:, None].expand(5, 3).contiguous()
    out = pair(z, T, R, text)
    hi, lo = [0, 2, 4], [1, 3]
    ref_h, ref_l = high(z[hi], T[hi], R[hi], text[hi]), low(z[lo], T[lo], R[lo], text[lo])
    # The router calls each expert on exactly the reference's sub-batch (same rows, shapes and kernels), so the
    # outputs are bitwise equal (measured); 1e-6 leaves a few float32 ulps of |out| ~ 1 for a kernel that would
    # pick another summation order, and is far below a row sent to the wrong expert (> 1e-3, asserted below).
    torch.testing.assert_close(out[hi], ref_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[lo], ref_l, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[lo], high(z[lo], T[lo], R[lo], text[lo]), atol=1e-3)  # the experts differ
    # gradients reach each expert from its own rows only
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    gh = {n: p.grad.clone() for n, p in high.named_parameters() if p.grad is not None}
    gl = {n: p.grad.clone() for n, p in low.named_parameters() if p.grad is not None}
    high.zero_grad(set_to_none=True), low.zero_grad(set_to_none=True)
    (high(z[hi], T[hi], R[hi], text[hi]) * w[hi]).sum().backward()
    (low(z[lo], T[lo], R[lo], text[lo]) * w[lo]).sum().backward()
    for grads, model in ((gh, high), (gl, low)):
        assert grads and set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    # one range: exactly the expert's call
    with torch.no_grad():
        assert torch.equal(pair(z[hi], T[hi], R[hi], text[hi]), high(z[hi], T[hi], R[hi], text[hi]))
    with pytest.raises(ValueError, match="sample 1's jump crosses the expert boundary"):
        pair(z[:2], torch.full((2, 3), 950.0), torch.tensor([[900.0] * 3, [500.0] * 3]), text[:2])


def test_experts_of_different_architectures_are_refused():
    high, _ = _tiny_experts()
    other = WanModel(wan_config("tiny-wan2.2-t2v-a14b", expert="low", delta_embedder=True, num_layers=1))
    with pytest.raises(ValueError, match="share one architecture; they differ in \\['num_layers'\\]"):
        TwoExpertWanModel(high, other, B)


def _gaussian_experts():
    shape = (3, 2, 4, 4)
    mu = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn((4, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return GaussianData(mu, 0.5), GaussianData(-mu, 1.0), noise


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_the_rollout_splits_the_crossing_segment_and_is_the_exact_composed_map(n):
    """Two different Gaussians' exact flow maps as the experts: the composed PF-ODE's map from noise is
    Phi_L(b -> 0) o Phi_H(1 -> b). Every (N, k) rollout returns it (to the float32 model-scale times, as in
    tests/test_two_expert_sampler.py), with at most one extra call; the plain plan crosses b and is refused."""
    hi, lo, noise = _gaussian_experts()
    routed = route_experts(hi.exact_model(), lo.exact_model(), B)
    exact = lo.flow_map(hi.flow_map(noise, 1.0, B), B, 0.0)
    for k in range(n):
        plan = SimulationPlan.make(n, k, 5.0, boundary=B)
        x0, info = flow_map_backward_simulation(routed, noise, None, plan)
        torch.testing.assert_close(x0, exact, rtol=0, atol=1e-5)
        assert not any(t > B > r for t, r, _ in info["segments"])
        plain = 1 + (k > 0) + (k < n - 1)
        assert info["calls"] in (plain, plain + 1)
        if n >= 2:
            assert B in plan.times.tolist()  # the sampler's snapped grid: the target transition never crosses b
    with pytest.raises(ValueError, match="crosses the expert boundary"):
        flow_map_backward_simulation(routed, noise, None, SimulationPlan.make(1, 0, 5.0))


def test_a_boundary_plan_is_drawn_like_the_plain_one_and_consistency_is_refused():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(10):
        a, b = sample_simulation_plan(g1, DistillConfig(boundary=B)), sample_simulation_plan(g2, DistillConfig())
        assert (a.N, a.k) == (b.N, b.k) and a.boundary == B and b.boundary is None
    with pytest.raises(ValueError, match="consistency rollout jumps to 0 from every grid point"):
        DistillConfig(boundary=B, simulation="consistency")
    with pytest.raises(ValueError, match="boundary must lie in"):
        DistillConfig(boundary=1.0)


# --- the trainer ---------------------------------------------------------------------------------------
COMMON = ["--mock-data", "--mock-num-samples", "8", "--mock-latent-shape", *map(str, LATENT), "--log-interval", "100"]


def _args(*argv):
    from megatron_anyflow.training.arguments import parse_args

    return parse_args([*map(str, argv)])


def _stage2_argv(root, *extra):
    return ["--stage", "stage2", "--pretrained", root / "low", "--pretrained-2", root / "high",
            "--init-adapters-from", root / "low", "--init-adapters-from-2", root / "high", *COMMON,
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "0",
            "--simulation-steps", "1", "2", "4", *extra]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny stage-1 experts (random bases of different seeds; their adapters moved by lr 1e-2), then the
    pair's stage 2 for 3 iterations with every model call's (expert, T, R) recorded."""
    from megatron_anyflow.training.trainer import Trainer

    root = tmp_path_factory.mktemp("pair")
    for expert, seed in (("high", 1), ("low", 2)):
        Trainer(_args("--stage", "stage1", "--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", expert, "--seed", seed,
                      *COMMON, "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-2",
                      "--lr-warmup-iters", "0", "--train-iters", "2", "--save", root / expert),
                log=lambda *a, **k: None).train()
    tr = Trainer(_args(*_stage2_argv(root, "--train-iters", "3", "--save", root / "stage2")), log=lambda *a, **k: None)
    start = {k: p.detach().clone() for k, p in tr.groups["generator"].params.items()}
    calls = {"high": [], "low": []}
    for e, m in tr.model.experts():
        m.register_forward_pre_hook(lambda mod, a, kw, e=e: calls[e].append((a[1].detach().clone(), a[2].detach().clone())),
                                    with_kwargs=True)
    tr.train()
    return root, tr, start, calls


def test_each_expert_is_called_only_on_its_range_and_both_train(pair):
    root, tr, start, calls = pair
    e = 5.0  # the co-trained stage-1 loss's finite difference steps T by +- e around an in-range (T, R)
    Bm = float(to_model_scale(B))
    for expert in ("high", "low"):
        assert calls[expert], expert
        T = torch.cat([t.flatten() for t, r in calls[expert] if r is not None])
        R = torch.cat([r.flatten() for t, r in calls[expert] if r is not None])
        if expert == "high":
            assert float(R.min()) >= Bm and float(T.min()) >= Bm - e
        else:
            assert float(T.max()) <= Bm + e and float(R.max()) <= Bm
    # both experts' generator adapters left their stage-1 start
    moved = {ex: any(not torch.equal(start[k], p) for k, p in tr.groups["generator"].params.items()
                     if k.startswith(ex + ".")) for ex in ("high", "low")}
    assert moved == {"high": True, "low": True}
    meta = json.load(open(root / "stage2" / "iter_0000003" / "anyflow_meta.json"))
    assert set(meta["experts"]) == {"high", "low"} and meta["boundary_ratio"] == B
    assert meta["experts"]["high"].endswith("iter_0000002") and "/high/" in meta["experts"]["high"]


def test_two_expert_stage2_resumes_bit_for_bit(pair, tmp_path):
    from megatron_anyflow.training.trainer import Trainer

    root, tr, _, _ = pair
    quiet = dict(log=lambda *a, **k: None)
    Trainer(_args(*_stage2_argv(root, "--train-iters", "2", "--save", tmp_path / "r")), **quiet).train()
    again = Trainer(_args(*_stage2_argv(root, "--train-iters", "3", "--save", tmp_path / "r", "--load", tmp_path / "r")),
                    **quiet)
    assert again.iteration == 2
    again.train()
    for name, g in tr.groups.items():
        for k, p in g.params.items():
            assert torch.equal(p, again.groups[name].params[k]), (name, k)


def test_the_pair_exports_as_one_pipeline_that_verifies(pair, tmp_path, capsys):
    from test_pipeline_export import load_tool, tiny_umt5, tiny_vae

    root = pair[0]
    tiny_vae(str(tmp_path / "vae"))
    tiny_umt5(str(tmp_path))
    argv = ["--input", root / "stage2", "--output", tmp_path / "a14b", "--merge-lora", "generator", "--ema",
            "--pipeline", "--vae", tmp_path / "vae", "--text-encoder", tmp_path / "text_encoder", "--verify"]
    assert load_tool("convert_to_hf").main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "transformer_2: diffusers vs megatron_anyflow" in out and "AnyFlowTwoExpertPipeline" in out
    index = json.load(open(tmp_path / "a14b" / "model_index.json"))
    assert index["boundary_ratio"] == B and index["transformer_2"] == ["diffusers", "AnyFlowTransformer3DModel"]
    # the pair without --pipeline, and with --expert-2, is refused by name
    assert load_tool("convert_to_hf").main(["--input", str(root / "stage2"), "--output", str(tmp_path / "x")]) == 2
    assert "holds both experts" in capsys.readouterr().err


def test_bad_two_expert_stage2_requests_are_named(pair, capsys):
    from conftest import pretrain_cli

    root = pair[0]
    cases = [
        (["--pretrained-2", root / "high", "--stage", "stage2", "--model-preset", "tiny", *COMMON],
         "--pretrained-2 names the other expert of a two-expert model"),
        (["--stage", "stage2", "--pretrained", root / "low", "--pretrained-2", root / "low", *COMMON],
         f"--pretrained {root / 'low'} and --pretrained-2 {root / 'low'} are both the low-noise expert"),
        (["--stage", "stage2", "--pretrained", root / "low", *COMMON], "give the other expert's base with --pretrained-2"),
        (["--stage", "stage2", "--pretrained", root / "low", "--pretrained-2", root / "high", "--expert", "high",
          *COMMON], "stage 2 of a two-expert model trains both experts together"),
        (["--stage", "stage2", "--pretrained", root / "low", "--pretrained-2", root / "high", "--init-adapters-from",
          root / "low", *COMMON], "give both --init-adapters-from and --init-adapters-from-2"),
        (["--stage", "stage2", "--pretrained", root / "low", "--pretrained-2", root / "high", "--init-adapters-from",
          root / "low", "--init-adapters-from-2", root / "low", *COMMON], "are both the low-noise expert"),
        (_stage2_argv(root, "--i2v-prob", "0.5"), "--i2v-prob 0.5: a two-expert model"),
        (_stage2_argv(root, "--simulation", "consistency"), "consistency rollout jumps to 0"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert pretrain_cli([str(a) for a in [*argv, "--train-iters", "1"]]) == 2, message
        assert message in capsys.readouterr().err, message


def test_generate_samples_the_pair_on_the_boundary_grid(pair, tmp_path):
    """tools/generate.py on the two-expert stage-2 checkpoint: both experts (EMA generators merged), each step
    routed to its expert on the snapped grid (N = 1: split at b), equal to the library's two-expert sampler on
    the experts loaded one by one."""
    from safetensors.torch import load_file, save_file

    from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler
    from megatron_anyflow.checkpoint.model_io import load_for_inference
    from test_pipeline_export import load_tool

    root = pair[0]
    g = torch.Generator().manual_seed(4)
    save_file({"noise": torch.randn(2, *LATENT, generator=g), "prompt_embeds": torch.randn(2, 6, 384, generator=g)},
              str(tmp_path / "in.safetensors"))
    argv = ["--checkpoint", root / "stage2", "--ema", "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
            tmp_path / "in.safetensors", "--codec", "none", "--steps", 1, 4, "--output", tmp_path / "out",
            "--save-latents", tmp_path / "out.safetensors", "--no-progress"]
    assert load_tool("generate").main([str(a) for a in argv]) == 0
    got, inp = load_file(str(tmp_path / "out.safetensors")), load_file(str(tmp_path / "in.safetensors"))
    high, low = (load_for_inference(str(root / "stage2"), "generator", ema=True, expert=e) for e in ("high", "low"))
    routed = route_experts(high, low, B)
    for n in (1, 4):
        with torch.no_grad():
            ref = FlowMapEulerSampler(n, boundary=B)(routed, inp["noise"], inp["prompt_embeds"])
        torch.testing.assert_close(got[f"steps_{n}"], ref, rtol=0, atol=1e-6)  # same calls, same weights
    with pytest.raises(ValueError, match="holds both experts of a two-expert model"):
        load_for_inference(str(root / "stage2"), "generator")


def test_evaluate_the_pair_against_its_two_expert_teacher(pair, tmp_path):
    """tools/evaluate_anyflow.py --teacher HIGH --teacher-2 LOW --student STAGE2: the teacher routes each Euler step
    by its timestep through `TwoExpertWanModel`; its 4-step reference equals the sampler's own two-expert teacher
    path (`TeacherEulerSampler(boundary=)` with ``model_2``, an independent routing), and the student's rows are
    its samples on the boundary grid."""
    from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, TeacherEulerSampler
    from megatron_anyflow.anyflow.two_expert import load_stage2_pair
    from megatron_anyflow.checkpoint.model_io import load_for_inference
    from megatron_anyflow.data.latent_dataset import MockLatentDataset, write_latent_dataset
    from test_pipeline_export import load_tool

    root = pair[0]
    mock = MockLatentDataset(2, LATENT, 5, 384, seed=3)
    write_latent_dataset(str(tmp_path / "data"), torch.stack([mock[i][0] for i in range(2)]),
                         torch.stack([mock[i][1] for i in range(2)]), mock.negative_text, {}, dtype=torch.float32)
    argv = ["--teacher", root / "low", "--teacher-2", root / "high", "--student", root / "stage2", "--ema",
            "--data-path", tmp_path / "data", "--output", tmp_path / "eval", "--steps", 1, 2, "--reference-steps", 4,
            "--num-samples", 2, "--guidance", 2]
    assert load_tool("evaluate_anyflow").main([str(a) for a in argv]) == 0
    res = json.load(open(tmp_path / "eval" / "scaling.json"))
    tool = load_tool("evaluate_anyflow")
    from megatron_anyflow.data.latent_dataset import LatentDataset

    _, text, neg, noise, _ = tool.evaluation_inputs(LatentDataset(str(tmp_path / "data")), 2, 0, torch.device("cpu"))
    high, low = (load_for_inference(str(root / e)) for e in ("high", "low"))
    student = load_stage2_pair(str(root / "stage2"), ema=True)
    negb = neg.expand(2, -1, -1)
    with torch.no_grad():
        ref = TeacherEulerSampler(4, guidance_scale=2, boundary=B)(high, noise, text, negb, model_2=low)
        for n in (1, 2):
            out = FlowMapEulerSampler(n, boundary=B)(student, noise, text)
            mse = float((out.float() - ref.float()).pow(2).mean())
            got = res["metrics"]["student"][str(n)]["latent_mse"]
            assert got == pytest.approx(mse, rel=1e-4), (n, got, mse)  # the same samples to float32 rounding
    with pytest.raises(ValueError, match="give the teacher's other expert with --teacher-2"):
        load_tool("evaluate_anyflow").main([str(a) for a in argv if str(a) not in ("--teacher-2", str(root / "high"))])
