"""One AnyFlow-FAR stage-1 trainer iteration at a given (DP, micro-batch, accumulation) layout: what each
rank saw and the gradients it would step with (tests/test_far_training.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/far_layout_check.py OUT_PREFIX MICRO GLOBAL CASE [CASE ...]      # DP = 2 (gloo)
    run_far_layout(OUT_PREFIX, MICRO, GLOBAL, CASES)                                    # DP = 1 in-process

Cases (`CASES`): ``causal`` (``--far-bidirectional-prob 0``) and ``bidirectional`` (``1``: the
bidirectional branch runs in the iteration). Both use ``--long-context-prob 1`` with the 5-chunk
partition ``(1, 2, 1, 1, 1)`` and run the first iteration whose plan has ``n = 5`` chunks (two compressed
context chunks, so ``far_patch_embedding`` gets a gradient): the iteration is a function of the seed only,
the same at every layout.

For each case the real `Trainer` (tiny preset, mock data, float32, LoRA rank 4 with random B so every
adapter has a gradient; ``far_patch_embedding`` trainable in the generator group) runs that iteration
through its own ``stage.train_step``. Hooks record, without changing what runs: every `far_stage1_loss`
call (global offset, the micro-batch's clips, the iteration's chunk count, per-sample stats) with the
four model calls it made (inputs and outputs), every bidirectional-branch `flow_matching_loss` call
(per-sample loss, t, the prompts it got), and the gradients handed to the optimizer step (after the DP
reduction, before clipping: ``--clip-grad 0``; the step itself is skipped). Rank r writes
``OUT_PREFIX.CASE.rank{r}.pt``.
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

CHUNKS = (1, 2, 1, 1, 1)
ARGS = ["--stage", "stage1", "--model", "far", "--chunk-partition", *map(str, CHUNKS),
        "--mock-data", "--mock-num-samples", "16", "--mock-latent-shape", str(sum(CHUNKS)), "16", "4", "8",
        "--long-context-prob", "1", "--lora-rank", "4", "--lora-alpha", "4", "--train-iters", "1",
        "--log-interval", "100", "--clip-grad", "0", "--text-dropout", "0.3", "--seed", "7"]
CASES = {"causal": ["--far-bidirectional-prob", "0"], "bidirectional": ["--far-bidirectional-prob", "1"]}
STATS = ("per_sample_loss", "kind", "scales", "t", "r", "text_dropped", "num_chunks", "target_frames")


def _clone(v):
    if torch.is_tensor(v):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return [int(c) for c in v]
    return v


def run_far_layout(out_prefix: str, micro: int, global_batch: int, cases) -> None:
    import torch.distributed as dist

    import megatron_anyflow.training.stages as stages_mod
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    for case in cases:
        args = parse_args([*ARGS, *CASES[case], "--micro-batch-size", str(micro), "--global-batch-size",
                           str(global_batch)])
        tr = Trainer(args, log=lambda *a, **k: None)
        g = torch.Generator().manual_seed(99)  # random B: every adapter gets a gradient
        with torch.no_grad():
            for k, p in tr.named_trainable(lambda n: "lora_B" in n).items():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        iteration = next(i for i in range(64) if tr.stage.iteration_plan(i)[0] == len(CHUNKS))
        record = {"calls": [], "bi_calls": [], "grads": None, "iteration": iteration,
                  "plan": tr.stage.iteration_plan(iteration)}
        orig_far, orig_fm = stages_mod.far_stage1_loss, stages_mod.flow_matching_loss

        def far_spy(model, x, text, *a, **k):
            calls = []

            def recording(*ma, **mk):
                out = model(*ma, **mk)
                calls.append({"latents": _clone(ma[0]), "T": _clone(ma[1]), "R": _clone(ma[2]),
                              "text": _clone(ma[3]), "out": _clone(out),
                              **{n: _clone(v) for n, v in mk.items()}})
                return out

            loss, stats = orig_far(recording, x, text, *a, **k)
            record["calls"].append({"offset": k["global_offset"], "b": x.shape[0], "x": x.detach().clone(),
                                    "text": text.detach().clone(), "loss": loss.detach().clone(),
                                    "model_calls": calls,
                                    **{n: stats[n].detach().clone() for n in STATS}})
            return loss, stats

        def fm_spy(model, x, text, *a, **k):
            loss, stats = orig_fm(model, x, text, *a, **k)
            record["bi_calls"].append({"b": x.shape[0], "x": x.detach().clone(), "text": text.detach().clone(),
                                       "loss": loss.detach().clone(),
                                       **{n: stats[n].detach().clone() for n in ("per_sample_loss", "t")}})
            return loss, stats

        def capture(group, iteration, loss=None, per_sample=None):
            record["grads"] = {k: p.grad.detach().clone() for k, p in group.params.items()}
            group.zero_grad()
            return {}

        stages_mod.far_stage1_loss, stages_mod.flow_matching_loss = far_spy, fm_spy
        tr._step_group = capture
        try:
            metrics = tr.stage.train_step(iteration, tr.sampler.micro_batches(0))
        finally:
            stages_mod.far_stage1_loss, stages_mod.flow_matching_loss = orig_far, orig_fm
        for j, c in enumerate(record["bi_calls"]):  # flow_matching_loss has no offset: the call order gives it
            c["offset"] = tr.global_offset(j)
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        record["layout"] = {"dp": tr.dp_size, "micro": micro, "acc": tr.sampler.num_micro}
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(record, f"{out_prefix}.{case}.rank{rank}.pt")


def main() -> None:
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

    out_prefix, micro, global_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    run_far_layout(out_prefix, micro, global_batch, sys.argv[4:])


if __name__ == "__main__":
    main()
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
