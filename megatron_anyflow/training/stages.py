"""What one training iteration does in each stage; the `Trainer` owns everything else.

- ``teacher``: flow matching on the data (`anyflow.objective.flow_matching_loss`), adapter ``teacher``
  (or full fine-tuning with ``--lora-rank 0``).
- ``stage1``: forward flow-map training (`anyflow.objective.stage1_loss`, paper Alg. 1), adapter
  ``generator`` (or full fine-tuning).
- ``stage2``: on-policy distillation (paper Alg. 2), adapters ``generator`` and ``fake_score`` on the
  frozen base that is the real score (`training.stage2`).
"""

from __future__ import annotations

import abc

from typing import Dict, List, Optional, Tuple

import torch

from megatron_anyflow.anyflow.objective import (
    FlowMapObjectiveConfig,
    TeacherObjectiveConfig,
    flow_matching_loss,
    stage1_loss,
)
from megatron_anyflow.anyflow.timesteps import TimeSamplerConfig
from megatron_anyflow.models import lora as L


class Stage(abc.ABC):
    """Base: LoRA set-up (or full fine-tuning) for one trainable adapter; subclasses give `loss`."""

    adapter: str = "generator"

    def __init__(self, trainer):
        self.t = trainer
        self.args = trainer.args
        self.adapters: List[str] = []
        self.setup_lora([self.adapter])

    def setup_lora(self, adapters: List[str]) -> None:
        model, args = self.t.model, self.args
        if args.lora_rank > 0:
            L.apply_lora(model, adapters, args.lora_rank, args.lora_alpha, seed=args.seed)
            L.set_active_adapter(model, adapters[0])
            self.adapters = list(adapters)
        else:
            for p in model.parameters():
                p.requires_grad_(True)

    def lora_meta(self) -> Optional[dict]:
        if not self.adapters:
            return None
        return {"rank": self.args.lora_rank, "alpha": self.args.lora_alpha, "adapters": self.adapters,
                "targets": list(L.DEFAULT_TARGETS)}

    def group_params(self, adapter: Optional[str]) -> Dict[str, torch.nn.Parameter]:
        if adapter is None or not self.adapters:
            return self.t.named_trainable(lambda n: True)
        return self.t.named_trainable(lambda n: f".adapters.{adapter}." in n)

    def param_groups(self) -> Dict[str, Tuple[Dict[str, torch.nn.Parameter], float]]:
        name = self.adapter if self.adapters else "model"
        return {name: (self.group_params(self.adapter if self.adapters else None), self.args.lr)}

    def group(self):
        return next(iter(self.t.groups.values()))

    @abc.abstractmethod
    def loss(self, iteration: int, j: int, x, text):
        """(loss, stats) of micro-batch ``j`` of ``iteration`` for latents ``x`` and ``text``."""

    def train_step(self, iteration: int, micro: List[List[int]]) -> Dict[str, float]:
        total = 0.0
        n = len(micro)
        for j, idx in enumerate(micro):
            x, text = self.t.batch(idx)
            loss, _ = self.loss(iteration, j, x, text)
            (loss / n).backward()
            total = total + loss.detach() / n
        metrics = {"loss": self.t.all_reduce_mean(total)}
        metrics.update(self.t.finalize_and_step(self.group(), iteration))
        return metrics


class TeacherStage(Stage):
    """Flow-matching fine-tuning of the teacher (single-time: r = t)."""

    adapter = "teacher"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.cfg = TeacherObjectiveConfig(shift=self.args.time_shift, text_dropout=self.args.text_dropout)

    def loss(self, iteration, j, x, text):
        ng = self.t.generator("noise", iteration, j, self.t.dp_rank, device=self.t.device)
        return flow_matching_loss(self.t.model, x, text, self.t.negative_text, self.cfg, noise_generator=ng)


def flow_map_objective_config(args) -> FlowMapObjectiveConfig:
    """The stage-1 objective configuration of parsed trainer arguments (also used by the benchmark)."""
    return FlowMapObjectiveConfig(
        guidance=args.guidance, fd_eps=args.fd_eps, text_dropout=args.text_dropout, i2v_prob=args.i2v_prob,
        adaptive_reweight=not args.no_adaptive_reweight, kernel_backend=args.kernel_backend,
        time=TimeSamplerConfig(shift=args.time_shift, boundary_fraction=args.boundary_fraction,
                               r_zero_fraction=args.r_zero_fraction, loss_weight=args.loss_weight))


class Stage1(Stage):
    """Forward flow-map training (paper Alg. 1) with the adaptive reweighting over the DP group."""

    adapter = "generator"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.cfg = flow_map_objective_config(self.args)

    def loss(self, iteration, j, x, text):
        t = self.t
        tg = t.generator("time", iteration, j)  # identical on every rank: the split is global
        ng = t.generator("noise", iteration, j, t.dp_rank, device=t.device)
        mbs = x.shape[0]
        return stage1_loss(t.model, x, text, t.negative_text, self.cfg, time_generator=tg, noise_generator=ng,
                           global_batch=mbs * t.dp_size, global_offset=t.dp_rank * mbs, dp_group=t.dp_group)


def build_stage(trainer) -> Stage:
    stage = trainer.args.stage
    if stage == "teacher":
        return TeacherStage(trainer)
    if stage == "stage1":
        return Stage1(trainer)
    if stage == "stage2":
        from megatron_anyflow.training.stage2 import Stage2

        return Stage2(trainer)
    raise ValueError(f"unknown stage {stage!r}")
