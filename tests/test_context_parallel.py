"""Context parallelism (Ulysses all-to-all, local backend) equals a single process (CPU, gloo).

CP = 2 (2 processes), and TP = 2 x CP = 2 with and without sequence parallelism (4 processes, one
launch) against TP = CP = 1. Compared after `finalize_model_grads`: the output, every trainable
parameter's gradient (full fine-tuning and LoRA), the grad norm and the input gradients; CP peers must
end with identical gradients. Inputs: batch 2, 3 latent frames with per-frame (t, r), 72 tokens whose
frame boundaries fall inside the CP / SP slices. Tolerance (float32): 1e-5 relative for the output, the
grad norm and the input gradients; per parameter tensor 1e-5 of the whole gradient's norm, and 1e-5
relative for tensors holding >= 10 % of it (the analysis is in tests/distributed/cp_check.py: rounding from
another summation order scales with the magnitudes summed, not with a nearly cancelling tensor's result).
Also checked: the errors for an indivisible token count, heads not divisible by TP x CP and a config
whose context_parallel_size disagrees with the process groups.
"""

import json
import sys

import pytest

from conftest import run_cmd, torchrun


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp") / "ref.pt"
    run_cmd([sys.executable, "tests/distributed/cp_check.py", "reference", str(path)])
    return path


def _check_cases(report, cases):
    for case in cases:
        r = report[case]
        assert r["missing"] == [] and r["n_grads"] == r["n_ref_grads"] > 0, (case, r)
        assert r["output"] < 1e-5, (case, r)
        assert r["worst_grad"] < 1e-5, (case, r)  # per tensor, of the whole gradient's norm
        assert r["n_large"] > 0 and r["worst_grad_rel_large"] < 1e-5, (case, r)  # relative, tensors >= 10 % of it
        assert r["grad_norm"] < 1e-5, (case, r)
        assert r["input_grads"] < 1e-5, (case, r)
        assert r["cp_spread"] == 0.0, (case, r)
    assert report["full"]["n_grads"] > report["lora"]["n_grads"]
    assert "context_parallel_size=1 but the initialised context-parallel group has 2" in report["config_error"]


def test_cp2_equals_single_process(reference, tmp_path):
    out = tmp_path / "res.json"
    torchrun(["tests/distributed/cp_check.py", "compare", str(reference), str(out), "--tp", "1", "--cp", "2"],
             nproc=2)
    report = json.loads(out.read_text())
    _check_cases(report, ("full", "lora"))
    assert "3 tokens (grid (1, 1, 3)) do not divide by the context-parallel size 2" in report["indivisible_error"]


def test_tp2_sp_cp2_equals_single_process(reference, tmp_path):
    out = tmp_path / "res.json"
    torchrun(["tests/distributed/cp_check.py", "compare", str(reference), str(out), "--tp", "2", "--cp", "2",
              "--sp", "both"], nproc=4)
    report = json.loads(out.read_text())
    _check_cases(report, ("full", "lora", "full-nosp", "lora-nosp"))
    assert ("6 tokens (grid (1, 1, 6)) do not divide by the context-parallel size 2 x tensor-parallel size 2"
            in report["indivisible_error"])
    assert "num_attention_heads=2 is not divisible by tensor-parallel size 2 x context-parallel size 2" \
        in report["heads_error"]
