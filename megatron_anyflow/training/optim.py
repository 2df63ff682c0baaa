"""AdamW with Megatron's warmup / decay schedule, distributed grad clipping and EMA of trainable weights.

The optimiser is `torch.optim.AdamW` on the (small) LoRA parameter set. megatron-core's distributed
optimizer needs its DDP wrapper and contiguous grad buffers; with LoRA the optimiser state is a few
percent of the frozen base, so sharding it buys little. Its state is saved sharded like each
parameter (see `optimizer_sharded_state`).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from megatron_anyflow.parallel.sharding import sharded_tensor_like
from megatron_anyflow.parallel.tensor_parallel import grad_norm


def lr_at(iteration: int, lr: float, min_lr: float, warmup: int, total: int, style: str) -> float:
    """Learning rate at ``iteration`` (0-based, before the step): linear warmup, then constant / cosine /
    linear decay to ``min_lr`` at ``total`` (Megatron-LM's OptimizerParamScheduler)."""
    if warmup > 0 and iteration < warmup:
        return lr * (iteration + 1) / warmup
    if style == "constant" or total <= warmup:
        return lr
    frac = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    if style == "linear":
        return lr - (lr - min_lr) * frac
    raise ValueError(f"lr decay style {style!r}; expected constant, cosine or linear")


def make_adamw(params: Sequence[torch.nn.Parameter], lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params`` with its state created up front (zeros, step 0), so a checkpoint can be
    loaded into it before the first step."""
    opt = torch.optim.AdamW(list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    for p in opt.param_groups[0]["params"]:
        opt.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return opt


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their total (tensor-parallel aware) L2 norm is at most ``max_norm``.

    Returns the norm before clipping (float32 scalar). ``max_norm <= 0`` only measures.
    """
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def optimizer_sharded_state(opt: torch.optim.Optimizer, keys: Dict[torch.nn.Parameter, str], prefix: str) -> dict:
    """Sharded-tensor view of AdamW's moments, each sharded like its parameter."""
    out = {}
    for p, k in keys.items():
        st = opt.state[p]
        for name in ("exp_avg", "exp_avg_sq"):
            key = f"{prefix}.{k}.{name}"
            out[key] = sharded_tensor_like(key, p, st[name])
    return out


def optimizer_steps(opt: torch.optim.Optimizer) -> float:
    steps = {float(s["step"]) for s in opt.state.values()}
    return max(steps) if steps else 0.0


def set_optimizer_steps(opt: torch.optim.Optimizer, step: float) -> None:
    for s in opt.state.values():
        s["step"].fill_(step)


class EMA:
    """Exponential moving average of trainable weights (fp32 shadows), decay applied from ``start`` on.

    Before ``start`` the shadow tracks the weights exactly (the reference's warm start).
    """

    def __init__(self, params: Dict[str, torch.nn.Parameter], decay: float, start: int):
        self.params = params
        self.decay, self.start = decay, start
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        d = self.decay if iteration >= self.start else 0.0
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def sharded_state(self, prefix: str) -> dict:
        return {f"{prefix}.{k}": sharded_tensor_like(f"{prefix}.{k}", self.params[k], self.shadow[k]) for k in self.shadow}

    def load(self, loaded: dict, prefix: str) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(loaded[f"{prefix}.{k}"])
