#!/usr/bin/env python
"""AnyFlow training entry point (teacher / stage 1 / stage 2), Megatron-style.

    torchrun --nproc_per_node 8 pretrain_anyflow.py --stage stage1 --pretrained ckpt/wan14b ...
    python pretrain_anyflow.py --stage stage1 --mock-data --train-iters 20     (one process, CPU)

``python pretrain_anyflow.py --help`` lists every argument.
"""

import sys
import warnings


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_anyflow.training.arguments import parse_args

    args = parse_args(argv)
    if args.dry_run:
        from megatron_anyflow.training.dry_run import dry_run

        return dry_run(args)
    from megatron_anyflow.training.checkpointing import CheckpointError
    from megatron_anyflow.training.nan_guard import NonFiniteTrainingError
    from megatron_anyflow.training.trainer import Trainer

    try:
        trainer = Trainer(args)
        trainer.train()
    except (CheckpointError, NonFiniteTrainingError) as err:
        # A known failure that says what to do: one clear line and exit 2, not a traceback. The message
        # is printed on every rank (each rank stops on it; rank 0's log is not the only one read).
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
