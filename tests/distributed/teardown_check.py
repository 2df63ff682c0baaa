"""A tool under `cli.main_guard` whose ranks finish at different times (rank 1 returns at once, rank 0 after
a second of "writing"), as tools/generate.py's do: each rank reports at interpreter exit whether its
process groups are still up (tests/test_cli_errors.py::test_a_finished_two_rank_run_ends_its_process_groups).

    torchrun --nproc_per_node 2 tests/distributed/teardown_check.py
"""

import atexit
import os
import time

import torch.distributed as dist

from megatron_anyflow.cli import main_guard


def report():
    print(f"rank {os.environ['RANK']} at exit: process group initialized={dist.is_initialized()}", flush=True)


def main(argv=None):
    from megatron_anyflow.parallel.state import initialize_parallel

    initialize_parallel(1, 1)
    if dist.get_rank() == 0:
        time.sleep(1.0)  # rank 1 has returned by now
    return 0


if __name__ == "__main__":
    atexit.register(report)  # runs after main_guard's sys.exit
    main_guard(main)
