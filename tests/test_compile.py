"""--compile: each transformer block compiles whole (``fullgraph=True``: no graph break) and computes what
the eager block computes, forward and backward, with LoRA on (the training configuration).

Tolerance (float32): inductor fuses the norm / modulation / RoPE / gating chains and may reorder their
float32 sums (and pick other GEMM blockings); every element differs by a few roundings (u = 6e-8) of
O(1) magnitudes: 1e-5 relative, norm-wise, for the output and every gradient (measured ~1e-7).
One block of the tiny preset, two frames: the compile takes ~30-80 s on 2 CPU cores; the TP = 2 cases
trace with ``aot_eager`` (same graph, no code generation) to stay fast.
"""

import json

import pytest
import torch
import torch._dynamo
from conftest import torchrun

from megatron_anyflow.models import lora as L
from megatron_anyflow.measure.op_counter import build_block_inputs


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_block_compiles_without_graph_break_and_matches_eager():
    torch._dynamo.reset()
    model, blk, (x, e, text, rope, segments) = build_block_inputs("tiny", grid=(2, 4, 4), text_len=5)
    params = [p for p in blk.parameters() if p.requires_grad]
    assert params  # LoRA A / B of the block
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        with L.adapter_scope("generator"):
            y = blk(x, e, text, rope, segments)
        (y * w).sum().backward()
        return y.detach(), [x.grad.clone()] + [p.grad.clone() for p in params]

    ref_y, ref_g = run()
    blk.compile(fullgraph=True)  # raises on any graph break
    y, grads = run()
    assert rel(y, ref_y) < 1e-5
    for a, b in zip(grads, ref_g):
        assert rel(a, b) < 1e-5
    # The adapter is part of the trace's guards: the base alone recompiles and differs.
    with torch.no_grad(), L.adapter_scope(None):
        base = blk(x, e, text, rope, segments)
    assert rel(base, ref_y) > 1e-3


@pytest.mark.parametrize("sp", [True, False], ids=["tp2-sp", "tp2"])
def test_block_at_tp2_compiles_without_graph_break(tmp_path, sp):
    """TP = 2 under torchrun (gloo): the TP mappings of the linears, LoRA and the q/k-norm statistic are
    functional collectives, so the block traces whole (``fullgraph=True``) and matches eager, forward and
    backward (aot_eager runs the traced graph with eager kernels: the same float32 ops in the same order,
    measured error 0; bound 1e-6 relative)."""
    out = tmp_path / "res.json"
    torchrun(["tests/distributed/compile_tp_check.py", str(out), "--fullgraph"] + ([] if sp else ["--no-sp"]))
    report = json.loads(out.read_text())
    assert report["graph_breaks"] == 0, report["break_reasons"]
    assert report["n_grads"] > 1
    assert report["output"] < 1e-6 and report["worst_grad"] < 1e-6, report
