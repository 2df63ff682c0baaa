"""Run megatron-core's tensor-parallel layers on CPU with gloo (CPU-only runs of the trainer, tools and tests).

megatron-core allocates collective buffers on ``torch.cuda.current_device()`` and calls
``torch.cuda.synchronize()`` around checkpoint saves. Without CUDA both fail, so this module redirects
them to the CPU. It is never applied at import: tests, and CPU-only multi-process runs of the tools
and trainer, call `enable_megatron_cpu_compat()` explicitly. With CUDA present it does nothing.
"""

from __future__ import annotations

import torch

_ENABLED = False


def enable_megatron_cpu_compat() -> bool:
    """Redirect megatron-core's CUDA device queries to the CPU when CUDA is absent.

    Returns True when the redirect is (now) active, False when CUDA is available (nothing changed).
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if not _ENABLED:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _ENABLED = True
    return True
