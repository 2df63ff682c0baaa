"""megatron_anyflow: AnyFlow any-step video diffusion distillation on megatron-core."""

__version__ = "0.1.0"
