"""TP = 2 with and without sequence parallelism equals TP = 1 (CPU, gloo, two processes).

Compared: the output, every trainable parameter's gradient (full fine-tuning: replicated norms, adaLN
tables, embedders and head included; LoRA: every adapter weight), and the total gradient norm.
Tolerance (float32): 1e-5 relative for the output and the grad norm; per tensor, 1e-5 of the whole
gradient's norm, and 1e-5 relative for the tensors holding >= 10 % of it (tests/distributed/tp_check.py
explains why a tensor's error is measured against the whole gradient: rounding from another summation
order scales with the magnitudes summed, so a nearly cancelling tensor can differ by O(1) of itself on
another CPU without anything being wrong). Measured on an Intel Xeon: <= 1.5e-7 and <= 4.3e-7.
"""

import json
import sys

import pytest

from conftest import run_cmd, torchrun


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "ref.pt"
    run_cmd([sys.executable, "tests/distributed/tp_check.py", "reference", str(path)])
    return path


@pytest.mark.parametrize("sp", [True, False], ids=["tp2-sp", "tp2"])
def test_tp2_equals_tp1(reference, tmp_path, sp):
    out = tmp_path / "res.json"
    torchrun(["tests/distributed/tp_check.py", "compare", str(reference), str(out)] + ([] if sp else ["--no-sp"]))
    report = json.loads(out.read_text())
    for case in ("full", "lora"):
        r = report[case]
        assert r["missing"] == [] and r["n_grads"] == r["n_ref_grads"] > 0, r
        assert r["output"] < 1e-5, r
        assert r["worst_grad"] < 1e-5, r  # per tensor, of the whole gradient's norm
        assert r["n_large"] > 0 and r["worst_grad_rel_large"] < 1e-5, r  # relative, tensors >= 10 % of it
        assert r["grad_norm"] < 1e-5, r
    assert report["full"]["n_grads"] > report["lora"]["n_grads"]
    if sp:
        assert "do not divide by the tensor-parallel size 2" in report["indivisible_error"]
