"""The command-line error policy shared by ``pretrain_anyflow.py`` and every ``tools/*.py`` entry point.

A user's mistake (a missing file, a shape that does not fit, a damaged checkpoint, a full disk) ends the
program with **one line on stderr and exit status 2**, naming the bad value, file or key and what was
expected; a bug (any other exception) keeps its traceback, because that is what a bug report needs.
``ANYFLOW_TRACEBACK=1`` shows the traceback for the user errors too.

What counts as a user error:

- the project's own errors, which are raised only with a message that says what to do
  (``CheckpointError``, ``ConversionError``, ``GenerationError``, ``NonFiniteTrainingError``,
  ``UnsupportedCodecError``, ``SaveLockError``; matched by class name within ``megatron_anyflow``);
- ``ValueError`` (every argument / shape / format check in the library raises it, with the value named);
- file-system errors: ``FileNotFoundError``, ``IsADirectoryError``, ``NotADirectoryError``,
  ``PermissionError``, ``FileExistsError`` and ``OSError`` for ENOSPC / EFBIG / EROFS / EDQUOT (a full disk,
  ``ulimit -f``, a read-only mount); the file name is printed when the OS reported one, else the output
  paths the tool was given (``outputs=``).

Exit status: 0 success, 1 a run that finished but produced nothing usable (the tools decide), 2 a user
error, 3 a run whose steps were mostly skipped (the trainer), 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Iterable, Optional, Sequence, Tuple, Type

USER_ERROR_EXIT = 2

_USER_ERRORS: Tuple[Type[BaseException], ...] = (
    ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
)
# OSError numbers that mean "the machine / the destination cannot take this", not a bug.
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENAMETOOLONG}


def register_user_error(*classes: Type[BaseException]) -> None:
    """Add exception classes whose message is written for the user (printed as one line, exit 2)."""
    global _USER_ERRORS
    _USER_ERRORS = _USER_ERRORS + tuple(c for c in classes if c not in _USER_ERRORS)


# The project's own error classes (matched by name and module, so this module imports nothing heavy).
_PROJECT_ERRORS = {"CheckpointError", "NonFiniteTrainingError", "ConversionError", "GenerationError",
                   "UnsupportedCodecError", "SaveLockError"}


def is_user_error(err: BaseException) -> bool:
    """True for the exceptions of the policy above (the message is meant for the user)."""
    if isinstance(err, _USER_ERRORS):
        return True
    if any(c.__name__ in _PROJECT_ERRORS and c.__module__.startswith("megatron_anyflow")
           for c in type(err).__mro__):
        return True
    return isinstance(err, OSError) and err.errno in _RESOURCE_ERRNOS


def one_line(err: BaseException, outputs: Iterable[str] = ()) -> str:
    """``err`` as one line: its message with newlines folded, the file named for an ``OSError``."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else None
        if where is None:
            outs = [str(o) for o in outputs if o]
            where = f"while writing {', '.join(outs)}" if outs else None
        msg = f"{err.strerror}: {where}" if where else err.strerror
    else:
        msg = str(err) or type(err).__name__
    msg = " ".join(msg.split())
    return msg


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             *, prog: Optional[str] = None, outputs: Callable[[], Iterable[str]] = lambda: ()) -> int:
    """Run ``main(argv)`` under the error policy; returns the exit status (``sys.exit(run_main(main))``).

    Args:
        main: the tool's entry point, returning an exit status (None = 0) or raising.
        argv: arguments (None: ``sys.argv[1:]``, as argparse does).
        prog: the name printed before ``error:`` (default: the script's file name).
        outputs: called on an ``OSError`` without a file name, to name what was being written.

    Returns:
        the status: ``main``'s own, 2 for a user error, 130 for Ctrl-C. ``SystemExit`` (argparse's
        usage errors, explicit exits) passes through unchanged.
    """
    prog = prog or os.path.basename(sys.argv[0] or "anyflow")
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as err:  # noqa: BLE001 - classified below, re-raised when not a user error
        if isinstance(err, SystemExit) or not is_user_error(err) or os.environ.get("ANYFLOW_TRACEBACK"):
            raise
        try:
            outs = list(outputs())
        except Exception:  # noqa: BLE001 - naming outputs must never mask the real error
            outs = []
        print(f"{prog}: error: {one_line(err, outs)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return int(rc or 0)


def end_process_groups() -> None:
    """Tear down a multi-process run's process groups in order: a barrier, then megatron-core's groups and
    the default group (`parallel.state.destroy_parallel`).

    Why: a gloo group left to interpreter exit can abort a rank whose work is done ("terminate called
    without an active exception", SIGABRT), which torchrun then reports as a failed run, e.g. a generation
    rank that returns while rank 0 is still writing the videos. The barrier lets every rank finish before
    any connection closes. Called by :func:`main_guard` only when ``main`` returned (an exception leaves the
    groups alone: a destroy or a barrier can block on peers that are gone); a no-op without
    ``torch.distributed`` imported, initialised and with more than one rank (an in-process caller, e.g. a
    test, keeps its single-process groups). A failure here cannot change the run's result (its work is
    done), so it is reported on stderr and ignored.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    try:
        dist.barrier()
        from megatron_anyflow.parallel.state import destroy_parallel

        destroy_parallel()
    except Exception as err:  # noqa: BLE001 - see the docstring
        print(f"warning: process-group teardown after a finished run failed: {one_line(err)}", file=sys.stderr,
              flush=True)


def main_guard(main: Callable[[Optional[Sequence[str]]], Optional[int]], *, prog: Optional[str] = None,
               outputs: Callable[[], Iterable[str]] = lambda: ()) -> None:
    """``sys.exit(run_main(main, ...))``: the one line at the bottom of every tool; a multi-process run that
    returned also ends its process groups in order (:func:`end_process_groups`)."""
    returned = []

    def tracked(argv):
        rc = main(argv)
        returned.append(True)
        return rc

    rc = run_main(tracked, prog=prog, outputs=outputs)
    if returned:
        end_process_groups()
    sys.exit(rc)
