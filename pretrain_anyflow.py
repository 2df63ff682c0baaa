#!/usr/bin/env python
"""AnyFlow training entry point (teacher / stage 1 / stage 2), Megatron-style.

    torchrun --nproc_per_node 8 pretrain_anyflow.py --stage stage1 --pretrained ckpt/wan14b ...
    python pretrain_anyflow.py --stage stage1 --mock-data --train-iters 20     (one process, CPU)

``python pretrain_anyflow.py --help`` lists every argument.
"""

import sys
import warnings

MOSTLY_SKIPPED_EXIT = 3  # more than half of the run's optimizer steps were skipped (megatron_anyflow/cli.py)


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_anyflow.training.arguments import parse_args

    args = parse_args(argv)
    if args.dry_run:
        from megatron_anyflow.training.dry_run import dry_run

        return dry_run(args)
    from megatron_anyflow.training.trainer import Trainer

    trainer = Trainer(args)
    start = trainer.iteration
    trainer.train()
    # (the process groups are ended in order by main_guard when this returns: cli.end_process_groups)
    ran = trainer.iteration - start
    if ran > 0 and 2 * trainer.skipped_iters > ran:
        # Finite but useless (e.g. --lr 1e30: 5 of 6 steps skipped, weights ~1e30 that give NaN in every
        # forward): not a success, whatever --max-skipped-iters allowed in a row.
        print(f"error: {trainer.skipped_iters} of {ran} optimizer steps were skipped (non-finite loss or gradient "
              f"norm): the run did not train; check --lr and the data (exit 3)", file=sys.stderr, flush=True)
        return MOSTLY_SKIPPED_EXIT
    return 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    # A known failure that says what to do (a damaged checkpoint, a mismatched resume, a NaN run, a bad
    # shape, a full disk): one line and exit 2, not a traceback (megatron_anyflow/cli.py). The line is
    # printed on every rank: each rank stops on it, and rank 0's log is not the only one read.
    main_guard(main, prog="pretrain_anyflow.py")
