"""A torchrun script for tests/test_launch_harness.py (the conftest ``torchrun`` harness itself).

    torchrun --nproc_per_node 2 tests/distributed/harness_check.py raise PIDS_DIR
    torchrun --nproc_per_node 2 tests/distributed/harness_check.py hang PIDS_DIR

Every rank writes its pid to ``PIDS_DIR/rank<r>.pid``. ``raise``: rank 1 raises a RuntimeError naming
itself while rank 0 waits in a barrier (rank 0 then fails with gloo's "Connection closed by peer", the
failure the harness must not stop at). ``hang``: rank 0 waits in a barrier that rank 1 never reaches;
rank 1 starts a child process in a session of its own (``PIDS_DIR/child.pid``) and sleeps, so that a
timeout must kill the launcher, both ranks and a grandchild outside their process groups.
"""

import os
import subprocess
import sys
import time

import torch.distributed as dist


def main():
    mode, pids_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(pids_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(f"rank {rank} started", flush=True)
    if rank == 1 and mode == "raise":
        raise RuntimeError("harness_check: planted failure on rank 1")
    if rank == 1 and mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
        with open(os.path.join(pids_dir, "child.pid"), "w") as f:
            f.write(str(child.pid))
        print("rank 1 sleeping instead of joining the barrier", flush=True)
        time.sleep(3600)
    dist.barrier()


if __name__ == "__main__":
    main()
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
