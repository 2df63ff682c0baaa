"""tools/benchmark_generation.py in its CPU mode (tiny preset, random weights): every row is there for both
implementations, both model kinds and every N, our final latents equal diffusers' pipelines' in fp32 (so
the two timings are of equal work), and the FLOPs credited per video follow the N-step structure (no speed
targets: the benchmark prints those)."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import REPO

TOOL = os.path.join(REPO, "tools", "benchmark_generation.py")
STEPS = [1, 2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_generation", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:  # the tool pins one thread on a CPU: give the session its threads back
        rep = _load_tool().main(["--steps", *map(str, STEPS), "--json", str(out / "g.json"),
                                 "--markdown", str(out / "g.md")])
    finally:
        torch.set_num_threads(threads)
    return rep, out


def test_rows_for_both_implementations_models_and_steps(report):
    rep, out = report
    assert rep["meta"]["complete"] is True and rep["meta"]["device_kind"] == "cpu"
    keys = [(r["model"], r["steps"], r["implementation"]) for r in rep["rows"]]
    # per model kind, per N: ours, then diffusers' (a run cut short keeps whole comparisons)
    assert keys == [(m, n, i) for m in ("bidirectional", "far") for n in STEPS
                    for i in ("megatron_anyflow", "diffusers")]
    for r in rep["rows"]:
        assert "error" not in r, r
        assert r["s_per_video"] > 0 and r["model_tflops_per_s"] > 0 and r["output_finite"], r
    assert json.loads((out / "g.json").read_text()) == json.loads(json.dumps(rep, default=float))
    md = (out / "g.md").read_text()
    assert md.startswith("# AnyFlow generation speed") and "| far | 2 | diffusers |" in md


def test_ours_equals_diffusers_in_fp32(report):
    """The same weights, noise and prompt embeddings through our sampler and diffusers' AnyFlowPipeline /
    AnyFlowFARPipeline: per forward the two transformers differ by float32 rounding (~1e-7); N steps whose
    sizes sum to 1 add N such errors, the FAR prefills re-encode the same inputs -- a small multiple of
    1e-7. The tool's limit 1e-5 (FP32_TOL) leaves ~100x; a wrong time, shift or chunk convention gives >1e-2.
    The CPU size has 128 tokens per latent frame, where diffusers' FAR step does not pad (docs/design/far.md
    7.1), so FAR is held to the same bound."""
    rep, _ = report
    tol = rep["meta"]["fp32_tolerance"]
    assert tol == 1e-5 and rep["meta"]["bf16"] is False
    ours = [r for r in rep["rows"] if r["implementation"] == "megatron_anyflow"]
    assert len(ours) == 2 * len(STEPS)
    for r in ours:
        assert 0 <= r["rel_err_vs_diffusers"] < tol, r
        assert r["time_vs_diffusers"] > 0 and abs(r["time_vs_diffusers"] * r["speedup_vs_diffusers"] - 1) < 1e-12


def test_flops_per_video_follow_the_steps(report):
    """Bidirectional: N forwards, so FLOPs(N) = N x FLOPs(1). FAR: N steps per chunk plus the prefills, which
    do not depend on N: FLOPs(2) - FLOPs(1) = the steps of one pass over the chunks < FLOPs(1). Both
    implementations are credited the same FLOPs for the same row."""
    rep, _ = report
    fl = {(r["model"], r["steps"], r["implementation"]): r["model_flops_per_video"] for r in rep["rows"]}
    for m in ("bidirectional", "far"):
        for n in STEPS:
            assert fl[(m, n, "megatron_anyflow")] == fl[(m, n, "diffusers")]
    b1, b2 = fl[("bidirectional", 1, "diffusers")], fl[("bidirectional", 2, "diffusers")]
    assert b2 == pytest.approx(2 * b1, rel=1e-12)
    f1, f2 = fl[("far", 1, "diffusers")], fl[("far", 2, "diffusers")]
    prefills = 2 * f1 - f2
    assert 0 < prefills < f1
    # the s/video and the rate agree with the FLOPs
    for r in rep["rows"]:
        assert r["model_tflops_per_s"] == pytest.approx(r["model_flops_per_video"] / r["s_per_video"] / 1e12)
