"""--compile: each transformer block compiles whole (``fullgraph=True``: no graph break) and computes what
the eager block computes, forward and backward, with LoRA on (the training configuration).

Tolerance (float32): inductor fuses the norm / modulation / RoPE / gating chains and may reorder their
float32 sums (and pick other GEMM blockings); every element differs by a few roundings (u = 6e-8) of
O(1) magnitudes: 1e-5 relative, norm-wise, for the output and every gradient (measured ~1e-7).
One block of the tiny preset, two frames: the compile takes ~30 s on 2 CPU cores.
"""

import torch
import torch._dynamo

from megatron_anyflow.models import lora as L
from megatron_anyflow.testing.op_counter import build_block_inputs


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
