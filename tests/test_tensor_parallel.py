"""TP = 2 with and without sequence parallelism equals TP = 1 (CPU, gloo, two processes).

Compared: the output, every trainable parameter's gradient (full fine-tuning: replicated norms, adaLN
tables, embedders and head included; LoRA: every adapter weight), and the total gradient norm.
Tolerance (float32): 1e-5 relative per tensor.
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
        assert r["worst_grad"] < 1e-5, r
        assert r["grad_norm"] < 1e-5, r
    assert report["full"]["n_grads"] > report["lora"]["n_grads"]
    if sp:
        assert "do not divide by the tensor-parallel size 2" in report["indivisible_error"]
