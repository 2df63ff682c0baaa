"""Stage-2 trainer at TP = 2 (+SP): both schedules, 2 iterations; writes the adapters gathered to full.

    torchrun --nproc_per_node 2 tests/distributed/stage2_tp_check.py STAGE1_CKPT OUT.pt
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist


def run(stage1, schedule, tp, sp):
    from megatron.core import parallel_state

    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    args = ["--stage", "stage2", "--mock-data", "--mock-num-samples", "16", "--mock-latent-shape", "3", "16", "4", "6",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
            "--init-adapters-from", stage1, "--simulation-steps", "4", "--schedule", schedule,
            "--tensor-model-parallel-size", str(tp), "--log-interval", "100"] + (["--sequence-parallel"] if sp else [])
    tr = Trainer(parse_args(args), log=lambda *a, **k: None)
    tr.train()
    out = {}
    for g in tr.groups.values():
        for k, p in g.params.items():
            v = p.detach()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(v) for _ in range(tp)]
                dist.all_gather(parts, v.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                v = torch.cat(parts, dim=p.partition_dim)
            out[k] = v.clone()
    return out


if __name__ == "__main__":
    stage1, path = sys.argv[1], sys.argv[2]
    res = {s: run(stage1, s, 2, True) for s in ("sequential", "pipelined")}
    if dist.get_rank() == 0:
        torch.save(res, path)
