"""Stage-2 trainer at TP = 2 (+SP): both schedules, 2 iterations; records every optimizer step.

    torchrun --nproc_per_node 2 tests/distributed/stage2_tp_check.py STAGE1_CKPT OUT.pt
    torchrun --nproc_per_node 2 tests/distributed/stage2_tp_check.py HIGH_STAGE1,LOW_STAGE1 OUT.pt   (two experts)

For every parameter group (generator, fake score) and every optimizer step it writes, gathered to the
full (TP = 1) layout: the gradient the optimizer is given (after the TP / SP reduction and clipping), the
parameters before and after the step and Adam's moments after it. ``tests/test_stage2_trainer.py`` runs
the same steps at TP = 1 with :func:`record_steps` and ``replay=`` this file: after each TP = 1 step it
overwrites the parameters and Adam moments with the TP = 2 values, so that every step of both runs starts
from the same state and what is compared is what TP equivalence guarantees (one step's gradient to
rounding, and that step's update within Adam's bound), not two rounding-perturbed trajectories.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist


def _full(p, v, tp):
    """``v`` (a tensor shaped like parameter ``p``'s local shard) in the full TP = 1 layout."""
    v = v.detach()
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        from megatron.core import parallel_state

        parts = [torch.empty_like(v) for _ in range(tp)]
        dist.all_gather(parts, v.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        v = torch.cat(parts, dim=p.partition_dim)
    return v.clone()


def record_steps(trainer, tp=1, replay=None):
    """Wrap each parameter group's ``optimizer.step`` of ``trainer`` to record, per step, ``grad``,
    ``before``, ``after``, ``exp_avg``, ``exp_avg_sq`` (dicts key -> full-layout tensor; a parameter
    without a gradient is recorded as None and not stepped by AdamW) and the step's ``lr``.

    ``replay`` (a record of another run, TP = 1 only): after step k, set the parameters and Adam moments
    to ``replay[group][k]``'s ``after`` / ``exp_avg`` / ``exp_avg_sq``.
    Returns the record, ``{group name: [step dict, ...]}``, filled as the trainer runs.
    """
    log = {name: [] for name in trainer.groups}
    for name, group in trainer.groups.items():
        opt = group.optimizer
        params = dict(group.params)

        def step(*a, _orig=opt.step, _opt=opt, _name=name, _params=params, **kw):
            rec = {"lr": _opt.param_groups[0]["lr"],
                   "grad": {k: None if p.grad is None else _full(p, p.grad, tp) for k, p in _params.items()},
                   "before": {k: _full(p, p, tp) for k, p in _params.items()}}
            out = _orig(*a, **kw)
            rec["after"] = {k: _full(p, p, tp) for k, p in _params.items()}
            for m in ("exp_avg", "exp_avg_sq"):
                rec[m] = {k: _full(p, _opt.state[p][m], tp) for k, p in _params.items()}
            if replay is not None:
                assert tp == 1, "replay writes full-layout tensors: TP = 1 only"
                src = replay[_name][len(log[_name])]
                with torch.no_grad():
                    for k, p in _params.items():
                        p.copy_(src["after"][k])
                        _opt.state[p]["exp_avg"].copy_(src["exp_avg"][k])
                        _opt.state[p]["exp_avg_sq"].copy_(src["exp_avg_sq"][k])
            log[_name].append(rec)
            return out

        opt.step = step
    return log


def stage2_args(stage1, schedule, tp, sp):
    """The arguments of both sides (TP = 2 here, TP = 1 in the test). ``stage1`` "HIGH,LOW": a two-expert
    stage 2 (Wan2.2 A14B) on two stage-1 expert runs, each also the base of its expert."""
    if "," in stage1:
        high, low = stage1.split(",")
        init = ["--pretrained", high, "--pretrained-2", low, "--init-adapters-from", high, "--init-adapters-from-2", low]
    else:
        init = ["--init-adapters-from", stage1]
    return (["--stage", "stage2", "--mock-data", "--mock-num-samples", "16", "--mock-latent-shape", "3", "16", "4", "6",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
             *init, "--simulation-steps", "4", "--schedule", schedule,
             "--tensor-model-parallel-size", str(tp), "--log-interval", "100"] + (["--sequence-parallel"] if sp else []))


def run(stage1, schedule, tp, sp):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    tr = Trainer(parse_args(stage2_args(stage1, schedule, tp, sp)), log=lambda *a, **k: None)
    log = record_steps(tr, tp)
    tr.train()
    return log


if __name__ == "__main__":
    stage1, path = sys.argv[1], sys.argv[2]
    res = {s: run(stage1, s, 2, True) for s in ("sequential", "pipelined")}
    if dist.get_rank() == 0:
        torch.save(res, path)
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
