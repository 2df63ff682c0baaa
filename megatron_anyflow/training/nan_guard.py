"""No NaN passes silently: skip optimizer steps whose loss or gradient norm is not finite, stop after too
many in a row, and never write non-finite tensors to a checkpoint.

The check costs no extra host synchronisation per micro-batch: the stages keep their losses on the
device, and once per optimizer step the trainer turns one fused flag (``isfinite(loss) & isfinite(norm)``,
both already reduced over the data-parallel group, so every rank takes the same decision) into a Python
bool. That is the one sync the step already had (the grad norm and loss are logged).

Policy (what Megatron-LM users expect from ``--check-for-nan-in-loss-and-grad``, but recoverable):

- a non-finite loss or gradient norm skips that optimizer step: gradients are dropped, the weights, the
  optimizer moments, the EMA and the group's step count stay as they were; the iteration and its data
  are consumed (a resumed run does not retrain on the bad batch);
- a warning names the iteration, the parameter group, the loss and the norm, and - when the loss of a
  sample is non-finite - the dataset indices of those samples;
- ``--max-skipped-iters`` consecutive skipped iterations stop training with `NonFiniteTrainingError`;
  the run's last checkpoint (written before the streak began, or deferred: see the trainer) stays the
  newest one on disk.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many consecutive non-finite iterations, or non-finite state at a save."""


class NonFiniteGuard:
    """Counts consecutive skipped iterations and decides when to stop.

    Args:
        max_consecutive: stop after this many consecutive skipped iterations (>= 1).
        log: where the warnings go (rank 0's logger).

    Raises:
        ValueError: ``max_consecutive < 1``.
    """

    def __init__(self, max_consecutive: int, log: Callable[..., None] = print):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive (--max-skipped-iters) must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.log = log
        self.consecutive = 0
        self.total = 0
        self._skipped_this_iter = False

    @staticmethod
    def is_finite(*values: torch.Tensor) -> bool:
        """One fused flag over 0-d tensors (one host sync)."""
        flag = torch.ones((), dtype=torch.bool, device=values[0].device)
        for v in values:
            flag = flag & torch.isfinite(v.detach()).all()
        return bool(flag)

    def skip(self, iteration: int, group: str, loss: float, norm: float,
             bad_samples: Sequence[int] = ()) -> None:
        """Record that ``group``'s step of ``iteration`` (0-based) was skipped and warn."""
        where = f"; non-finite loss on sample(s) {list(bad_samples)}" if bad_samples else ""
        self.log(f"warning: iteration {iteration + 1}: non-finite loss {loss} / gradient norm {norm} in group "
                 f"{group!r}: optimizer step skipped{where}", flush=True)
        self._skipped_this_iter = True

    def end_iteration(self, iteration: int) -> bool:
        """Close ``iteration``'s bookkeeping; returns whether it was skipped.

        Raises:
            NonFiniteTrainingError: the ``max_consecutive``-th consecutive skipped iteration.
        """
        skipped, self._skipped_this_iter = self._skipped_this_iter, False
        if not skipped:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"iteration {iteration + 1}: {self.consecutive} consecutive iterations with a non-finite loss or "
                f"gradient norm (--max-skipped-iters {self.max_consecutive}); stopping. Nothing was saved from "
                "these iterations. Check the data for NaN/inf latents and the learning rate, then resume from "
                "the last checkpoint.")
        return True


def nonfinite_tensors(named: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the tensors that hold a NaN or an infinity."""
    return [k for k, v in named if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_state(named: Iterable[Tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to save non-finite weights / optimizer / EMA state.

    Raises:
        NonFiniteTrainingError: naming up to 10 of the offending tensors.
    """
    bad = nonfinite_tensors(named)
    if bad:
        raise NonFiniteTrainingError(f"refusing to write {what}: {len(bad)} tensor(s) hold NaN or inf: {bad[:10]}")


def gather_bad_samples(per_sample: Dict[int, torch.Tensor], dp_group=None) -> List[int]:
    """Dataset indices (gathered over the data-parallel group) whose per-sample loss is non-finite.

    ``per_sample`` maps a dataset index to its 0-d loss on this rank. Every rank of ``dp_group`` must call
    this (it runs only on the rare skip path, so its object all-gather costs nothing in steady state).
    """
    import torch.distributed as dist

    local = sorted(i for i, v in per_sample.items() if not math.isfinite(float(v)))
    if dp_group is None or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return local
    out: List[Optional[List[int]]] = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(out, local, group=dp_group)
    return sorted(i for part in out for i in (part or []))
