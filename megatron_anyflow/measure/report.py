"""Writing a benchmark's report: atomic files, the rank-0 summary, and the number formats of its tables."""
from __future__ import annotations

import math
import os

from megatron_anyflow.measure.device import _rank


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and `os.replace`: a reader
    (or an archive taken while a benchmark runs, or a kill) sees the old file or the new one, never half."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def print_report(markdown_text: str, *paths: str) -> None:
    """The end of a benchmark run (rank 0): a blank line, the markdown report, and where it was written."""
    if _rank() == 0:
        print()
        print(markdown_text, flush=True)
        print(f"wrote {' and '.join(paths)}", flush=True)


def fmt(v, spec) -> str:
    """``format(v, spec)``, or ``-`` for a missing (None) or non-finite value."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def pct(v) -> str:
    """A fraction as a percentage with two decimals (``0.4123`` -> ``41.23%``), ``-`` when missing."""
    return "-" if v is None else fmt(100 * v, ".2f") + "%"
