"""One trainer iteration at a given (DP, micro-batch, accumulation) layout: what each rank saw and the
gradients it would step with.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/layout_check.py OUT_PREFIX MICRO GLOBAL STAGE [STAGE ...]      # DP = 2 (gloo)
    run_layout(OUT_PREFIX, MICRO, GLOBAL, STAGES)                                       # DP = 1 in-process

For each stage, the real `Trainer` (tiny preset, mock data, float32, LoRA rank 4 with random B so every
adapter has a gradient) runs iteration 0 through its own ``stage.train_step``. Two hooks record, without
changing what runs: the stage-1 / teacher loss calls (global offset, per-sample losses, kinds, scales,
micro-batch loss) and the gradients handed to the optimizer step (after the DP reduction, before
clipping: ``--clip-grad 0``; the step itself is skipped). Rank r writes ``OUT_PREFIX.STAGE.rank{r}.pt``.
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ARGS = ["--mock-data", "--mock-num-samples", "32", "--mock-latent-shape", "3", "16", "4", "6",
        "--lora-rank", "4", "--lora-alpha", "4", "--train-iters", "1", "--log-interval", "100",
        "--clip-grad", "0", "--text-dropout", "0.3", "--seed", "7", "--i2v-prob", "0.5"]


def run_layout(out_prefix: str, micro: int, global_batch: int, stages) -> None:
    import torch.distributed as dist

    from megatron_anyflow.anyflow import objective
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    for stage in stages:
        args = parse_args(["--stage", stage, *ARGS, "--micro-batch-size", str(micro),
                           "--global-batch-size", str(global_batch)])
        tr = Trainer(args, log=lambda *a, **k: None)
        g = torch.Generator().manual_seed(99)  # random B: every adapter gets a gradient at iteration 0
        with torch.no_grad():
            for k, p in tr.named_trainable(lambda n: "lora_B" in n).items():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        record = {"calls": [], "grads": None}
        fn_name = "stage1_loss" if stage == "stage1" else "flow_matching_loss"
        original = getattr(objective, fn_name)

        def spy(*a, _orig=original, **k):
            loss, stats = _orig(*a, **k)
            b = a[1].shape[0]
            record["calls"].append({"offset": k.get("global_offset", None), "b": b, "loss": loss.detach().clone(),
                                    **{n: v.detach().clone() for n, v in stats.items()
                                       if n in ("per_sample_loss", "kind", "scales", "t", "r", "text_dropped", "i2v")}})
            return loss, stats

        def capture(group, iteration, loss=None, per_sample=None):
            record["grads"] = {k: p.grad.detach().clone() for k, p in group.params.items()}
            record["step_loss"] = None if loss is None else loss.detach().clone()
            group.zero_grad()
            return {}

        import megatron_anyflow.training.stages as stages_mod
        setattr(stages_mod, fn_name, spy)
        tr._step_group = capture
        try:
            metrics = tr.stage.train_step(0, tr.sampler.micro_batches(0))
        finally:
            setattr(stages_mod, fn_name, original)
        if stage == "teacher":  # flow_matching_loss has no offset argument: recover it from the call order
            for j, c in enumerate(record["calls"]):
                c["offset"] = tr.global_offset(j)
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        record["layout"] = {"dp": tr.dp_size, "micro": micro, "acc": tr.sampler.num_micro}
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(record, f"{out_prefix}.{stage}.rank{rank}.pt")


def main() -> None:
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat

    out_prefix, micro, global_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    run_layout(out_prefix, micro, global_batch, sys.argv[4:])


if __name__ == "__main__":
    main()
