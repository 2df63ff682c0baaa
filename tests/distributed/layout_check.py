"""One trainer iteration at a given (DP, micro-batch, accumulation) layout: what each rank saw and the
gradients it would step with.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed/layout_check.py OUT_PREFIX MICRO GLOBAL STAGE [STAGE ...] [--preset NAME]  # DP = 2 (gloo)
    run_layout(OUT_PREFIX, MICRO, GLOBAL, STAGES, preset=NAME)                      # DP = 1 in-process

For each stage, the real `Trainer` (``--preset``, default ``tiny``; mock latents [3, C, 4, 6] with the preset's
C latent channels, e.g. 48 for ``tiny-wan2.2-ti2v``, 16 plus a 20-channel image condition for
``tiny-wan2.2-i2v-a14b``, whose high expert trains; mock data, float32, LoRA rank 4 with random B so every
adapter has a gradient) runs iteration 0 through its own ``stage.train_step``. Two hooks record, without
changing what runs: the stage-1 / teacher loss calls (global offset, per-sample losses, kinds, scales,
micro-batch loss) and the gradients handed to the optimizer step (after the DP reduction, before
clipping: ``--clip-grad 0``; the step itself is skipped). Rank r writes ``OUT_PREFIX.STAGE.rank{r}.pt``.
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ARGS = ["--mock-data", "--mock-num-samples", "32",
        "--lora-rank", "4", "--lora-alpha", "4", "--train-iters", "1", "--log-interval", "100",
        "--clip-grad", "0", "--text-dropout", "0.3", "--seed", "7", "--i2v-prob", "0.5"]


def run_layout(out_prefix: str, micro: int, global_batch: int, stages, preset: str = "tiny") -> None:
    import torch.distributed as dist

    from megatron_anyflow.anyflow import objective
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    from megatron_anyflow.data.channel_condition import condition_channels

    for stage in stages:
        cfg = wan_config(preset)
        cc = condition_channels(cfg)  # Wan2.2 I2V-A14B: 16 latent channels + a 20-channel image condition
        # An I2V model is conditioned on every sample through its channels (no --i2v-prob); a two-expert preset's
        # stage-1 run trains one expert (the high one here, on t in [boundary, 1]).
        base = [a for a in ARGS if a not in ("--i2v-prob", "0.5")] if cc else ARGS
        expert = ["--expert", "high"] if cfg.boundary_ratio is not None else []
        args = parse_args(["--stage", stage, *base, *expert, "--model-preset", preset, "--mock-latent-shape", "3",
                           str(cfg.in_channels - cc), "4", "6", "--micro-batch-size", str(micro),
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

        record["model_conditions"] = []
        hook = tr.model.register_forward_pre_hook(
            lambda m, a: record["model_conditions"].append(a[0][:, :, a[0].shape[2] - cc:].detach().clone()) if cc
            else None)
        import megatron_anyflow.training.stages as stages_mod
        setattr(stages_mod, fn_name, spy)
        tr._step_group = capture
        try:
            metrics = tr.stage.train_step(0, tr.sampler.micro_batches(0))
        finally:
            setattr(stages_mod, fn_name, original)
            hook.remove()
        if stage == "teacher":  # flow_matching_loss has no offset argument: recover it from the call order
            for j, c in enumerate(record["calls"]):
                c["offset"] = tr.global_offset(j)
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        record["layout"] = {"dp": tr.dp_size, "micro": micro, "acc": tr.sampler.num_micro}
        record["model_channels"] = (tr.model.config.in_channels, tr.model.config.out_channels)
        if cc:  # what the model calls read as the condition, and each sample's own (Wan2.2 I2V-A14B)
            record["micro"] = tr.sampler.micro_batches(0)
            record["dataset_conditions"] = {i: tr.dataset[i][2] for idx in record["micro"] for i in idx}
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(record, f"{out_prefix}.{stage}.rank{rank}.pt")


def main() -> None:
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

    argv = sys.argv[1:]
    preset = "tiny"
    if "--preset" in argv:
        k = argv.index("--preset")
        preset = argv[k + 1]
        del argv[k:k + 2]
    out_prefix, micro, global_batch = argv[0], int(argv[1]), int(argv[2])
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    run_layout(out_prefix, micro, global_batch, argv[3:], preset=preset)


if __name__ == "__main__":
    main()
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
