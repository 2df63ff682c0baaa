"""Two-expert stage 2 (Wan2.2 A14B) at DP = 2: one sample per rank, so a call often routes this rank's sample to
one expert only and leaves the other expert's adapter without a gradient here while the peer has one.

    torchrun --nproc_per_node 2 tests/distributed/two_expert_dp_check.py HIGH_STAGE1,LOW_STAGE1 OUT_PREFIX

Each rank runs 3 iterations (both schedules' worth of routing: the DMD and critic times per sample) and writes
``OUT_PREFIX.rank{r}.pt``: its adapters, and per optimizer step which tensors had no gradient of their own on
this rank before the trainer's reduction (so the test can see that the case occurred).
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if __name__ == "__main__":
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    pair, prefix = sys.argv[1], sys.argv[2]
    high, low = pair.split(",")
    args = parse_args(["--stage", "stage2", "--pretrained", high, "--pretrained-2", low, "--init-adapters-from", high,
                       "--init-adapters-from-2", low, "--mock-data", "--mock-num-samples", "8", "--mock-latent-shape",
                       "3", "16", "4", "6", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "3",
                       "--lr", "1e-3", "--lr-warmup-iters", "0", "--simulation-steps", "1", "2", "4", "--log-interval",
                       "100"])
    tr = Trainer(args, log=lambda *a, **k: None)
    missing = []
    orig = tr.finalize_and_step_groups

    def record(groups, *a, **kw):
        missing.append(sorted(k for g in groups for k, p in g.params.items() if p.grad is None))
        return orig(groups, *a, **kw)

    tr.finalize_and_step_groups = record
    tr.train()
    state = {f"{n}.{k}": p.detach().clone() for n, g in tr.groups.items() for k, p in g.params.items()}
    torch.save({"params": state, "missing": missing}, f"{prefix}.rank{dist.get_rank()}.pt")
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
