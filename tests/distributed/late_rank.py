"""Run a torchrun entry point with one rank arriving late: a race between ranks made deterministic.

    torchrun --nproc_per_node 2 tests/distributed/late_rank.py RANK SECONDS SCRIPT [ARGS ...]

Runs ``SCRIPT ARGS`` as ``__main__`` on every rank; on rank RANK, `initialize_parallel` sleeps SECONDS
after it returns, i.e. after the last collective every rank passes together. On a loaded machine a rank
can be descheduled like this at any point; a script whose ranks decide something from shared state (a
file rank 0 is about to write) without a collective in between then diverges. tools/convert_from_hf.py
did (rank 1 saw rank 0's ``release.tmp``, quit alone, and rank 0 failed in a barrier with "Connection
closed by peer"); tests/test_far_conversion.py launches it through this script.
"""

import os
import runpy
import sys
import time

import megatron_anyflow.parallel.state as state


def main():
    late_rank, seconds, script = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    initialize = state.initialize_parallel

    def late_initialize(*args, **kwargs):
        initialize(*args, **kwargs)
        if int(os.environ.get("RANK", 0)) == late_rank:
            time.sleep(seconds)

    state.initialize_parallel = late_initialize  # the scripts import it inside main(): they get this one
    sys.argv = [script, *sys.argv[4:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
