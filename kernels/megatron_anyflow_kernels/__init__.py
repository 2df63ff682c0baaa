"""Triton kernels for AnyFlow stage-1 training, each beside a PyTorch reference of the same function.

Installed under the import name ``megatron_anyflow_kernels``.

- :func:`flow_map_loss`: guidance-fused prediction + finite-difference target + weighted per-sample
  squared error (AnyFlow paper eq. 4, 6; Alg. 1); reference :func:`flow_map_loss_reference`,
  target inspection :func:`flow_map_target`.
- :func:`adaptive_reweight`: adaptive loss reweighting (paper eq. 7); reference
  :func:`adaptive_reweight_reference`.

Every public function takes ``backend="auto" | "triton" | "torch"``; ``auto`` runs Triton on CUDA tensors
when triton imports and the reference otherwise. Triton is optional (``HAS_TRITON``).
"""
from .adaptive_reweight import adaptive_reweight
from .flow_map_loss import HAS_TRITON, flow_map_loss
from .reference import adaptive_reweight_reference, flow_map_loss_reference, flow_map_target

__all__ = [
    "HAS_TRITON",
    "flow_map_loss",
    "flow_map_loss_reference",
    "flow_map_target",
    "adaptive_reweight",
    "adaptive_reweight_reference",
]
