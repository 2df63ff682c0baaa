"""TP = 2 (+ sequence parallel): one compiled Wan block with LoRA against the same block eager (CPU, gloo).

    torchrun --nproc_per_node 2 tests/distributed/compile_tp_check.py RESULT.json [--no-sp] [--fullgraph]

Builds the tiny model at TP = 2 with LoRA (B random so every adapter weight matters), captures the
first block's inputs, runs forward + backward eagerly, then ``blk.compile(backend="aot_eager")`` and
again. Reports the graph breaks dynamo found (``torch._dynamo.explain``), the break reasons, and the
relative errors of the output, the input gradient and every LoRA gradient. With ``--fullgraph`` the
compile uses ``fullgraph=True`` (fails on a break). ``aot_eager``: the graph (what a break is about) is
the same as inductor's; it skips code generation to stay fast on 2 CPU cores.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist


def main(out_path, sp, fullgraph):
    import torch._dynamo

    from megatron_anyflow.models import lora as L
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.measure.op_counter import build_block_inputs

    enable_megatron_cpu_compat()
    initialize_parallel(2)
    model, blk, (x, e, text, rope, segments) = build_block_inputs(
        "tiny", grid=(2, 4, 4), text_len=5, tensor_model_parallel_size=2, sequence_parallel=sp)
    # x is what the block received in the model: under SP already this rank's token slice.
    params = [p for p in blk.parameters() if p.requires_grad]
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3 + dist.get_rank()))

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        with L.adapter_scope("generator"):
            y = blk(x, e, text, rope, segments)
        (y * w).sum().backward()
        return y.detach(), [x.grad.clone()] + [p.grad.clone() for p in params]

    ref_y, ref_g = run()
    report = {"sp": sp, "fullgraph": fullgraph}
    with L.adapter_scope("generator"):
        ex = torch._dynamo.explain(blk)(x, e, text, rope, segments)
    report["graph_breaks"] = ex.graph_break_count
    report["break_reasons"] = sorted({str(b.reason)[:300] for b in ex.break_reasons})
    torch._dynamo.reset()
    blk.compile(backend="aot_eager", fullgraph=fullgraph)
    y, grads = run()
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    report["output"] = rel(y, ref_y)
    report["worst_grad"] = max(rel(a, b) for a, b in zip(grads, ref_g))
    report["n_grads"] = len(grads)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sp="--no-sp" not in sys.argv, fullgraph="--fullgraph" in sys.argv)
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
