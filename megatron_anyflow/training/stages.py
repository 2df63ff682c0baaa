"""What one training iteration does in each stage; the `Trainer` owns everything else.

- ``teacher``: flow matching on the data (`anyflow.objective.flow_matching_loss`), adapter ``teacher``
  (or full fine-tuning with ``--lora-rank 0``).
- ``stage1``: forward flow-map training (`anyflow.objective.stage1_loss`, paper Alg. 1), adapter
  ``generator`` (or full fine-tuning).
- ``stage2``: on-policy distillation (paper Alg. 2), adapters ``generator`` and ``fake_score`` on the
  frozen base that is the real score (`training.stage2`).

Batch layout. One iteration processes the global batch of ``G = micro x DP x accumulation`` samples in the
data sampler's order: accumulation step ``j``, DP rank ``d``, row ``k`` holds global index
``i = j * micro * DP + d * micro + k`` (`Trainer.global_offset`). Everything random about a sample is a
function of ``(seed, iteration, i)``, never of the layout:

- the stage-1 boundary / r = 0 / free split is drawn once per iteration over all ``G`` indices (one
  ``time`` generator per iteration, the same on every rank); each (step, rank) takes its rows;
- noise, text dropout and the image-to-video choice come from one generator per sample, seeded by ``i``;
- the adaptive reweighting (paper eq. 7) divides by the mean loss of **all** boundary samples of the
  iteration: the boundary samples are the first indices, accumulation steps take consecutive index
  ranges, so the detached (sum, count) carried from step to step (and all-reduced over DP within each
  step) already holds every boundary sample when a step reaches its first non-boundary sample.

Hence every (DP, micro-batch, accumulation) layout gives the loss and gradients of one big micro-batch
(tests/test_batch_layouts.py).
"""

from __future__ import annotations

import abc
import fnmatch

from typing import Dict, List, Optional, Tuple

import torch

from megatron_anyflow.anyflow.objective import (
    FlowMapObjectiveConfig,
    TeacherObjectiveConfig,
    far_stage1_loss,
    flow_matching_loss,
    guidance_fused,
    sample_far_num_chunks,
    stage1_loss,
)
from megatron_anyflow.anyflow.timesteps import TimeSamplerConfig
from megatron_anyflow.data.channel_condition import check_channel_condition, condition_channels, with_channel_condition
from megatron_anyflow.models import lora as L


class Stage(abc.ABC):
    """Base: LoRA set-up (or full fine-tuning) for one trainable adapter; subclasses give `loss`."""

    adapter: str = "generator"
    targets = L.DEFAULT_TARGETS  # the LoRA-wrapped linears (fnmatch patterns over module paths)

    def __init__(self, trainer):
        self.t = trainer
        self.args = trainer.args
        self.adapters: List[str] = []
        # Wan2.2 I2V-A14B reads a channel condition (the image) besides its latents: every model call gets the
        # micro-batch's (`conditioned`). It is another image-to-video mechanism than --i2v-prob's clean frame 0.
        self.condition_channels = condition_channels(trainer.config)
        if self.condition_channels and getattr(self.args, "i2v_prob", 0.0) > 0:
            raise ValueError(f"--i2v-prob {self.args.i2v_prob}: this model (in_channels {trainer.config.in_channels}, "
                             f"out_channels {trainer.config.out_channels}) is conditioned on the image through its "
                             f"{self.condition_channels} condition channels (Wan2.2 I2V-A14B), on every sample; a "
                             "clean first frame is Wan2.1 / TI2V-5B's mechanism: drop --i2v-prob")
        self.setup_lora([self.adapter])

    def setup_lora(self, adapters: List[str]) -> None:
        model, args = self.t.model, self.args
        exclude = getattr(args, "lora_exclude", None) or []
        if exclude:  # --lora-exclude: targets matching a pattern are not adapted (recorded in the checkpoint)
            self.targets = tuple(t for t in self.targets if not any(fnmatch.fnmatch(t, p) for p in exclude))
        if args.lora_rank > 0:
            # a two-expert model (stage 2 of Wan2.2 A14B) gets the adapters on each expert (names high.* / low.*)
            for m in ([m for _, m in model.experts()] if hasattr(model, "experts") else [model]):
                L.apply_lora(m, adapters, args.lora_rank, args.lora_alpha, targets=self.targets, seed=args.seed)
            L.set_active_adapter(model, adapters[0])
            self.adapters = list(adapters)
            if getattr(model.config, "far", False) and "generator" in adapters:
                # AnyFlow-FAR: far_patch_embedding is trained fully with the generator (docs/design/far.md 1.1).
                model.far_patch_embedding.requires_grad_(True)
        else:
            for p in model.parameters():
                p.requires_grad_(True)

    def lora_meta(self) -> Optional[dict]:
        if not self.adapters:
            return None
        return {"rank": self.args.lora_rank, "alpha": self.args.lora_alpha, "adapters": self.adapters,
                "targets": list(self.targets)}

    def group_params(self, adapter: Optional[str]) -> Dict[str, torch.nn.Parameter]:
        if adapter is None or not self.adapters:
            return self.t.named_trainable(lambda n: True)
        far = adapter == "generator" and getattr(self.t.model.config, "far", False)
        return self.t.named_trainable(lambda n: f".adapters.{adapter}." in n
                                      or (far and n.startswith("far_patch_embedding.")))

    def param_groups(self) -> Dict[str, Tuple[Dict[str, torch.nn.Parameter], float]]:
        name = self.adapter if self.adapters else "model"
        return {name: (self.group_params(self.adapter if self.adapters else None), self.args.lr)}

    def group(self):
        return next(iter(self.t.groups.values()))

    @abc.abstractmethod
    def loss(self, iteration: int, j: int, x, text, carry, condition=None):
        """(loss, stats) of micro-batch ``j`` of ``iteration`` for latents ``x`` and ``text``; ``carry`` is
        what the previous micro-batch of the iteration left in ``stats["carry"]`` (None for the first);
        ``condition``: the micro-batch's channel condition ``[b, f, c_y, h, w]`` (`conditioned`), or None."""

    def conditioned(self, condition):
        """The trainer's model as the objectives call it, ``model(z, T, R, text)``: with the micro-batch's channel
        condition (``train_step`` checked it against the model) appended to the latents at every call for a model
        that reads one (Wan2.2 I2V-A14B; `data.channel_condition`), else the model itself."""
        return self.t.model if condition is None else with_channel_condition(self.t.model, condition)

    def train_step(self, iteration: int, micro: List[List[int]]) -> Dict[str, float]:
        """Accumulate the micro-batches' gradients, then one (guarded) optimizer step. Metrics stay on the
        device until the one reduction at the end (no host synchronisation per micro-batch)."""
        t, n = self.t, len(micro)
        acc = MetricAccumulator(t.device)
        carry = None
        for j, idx in enumerate(micro):
            x, text, y = t.batch(idx)
            check_channel_condition(y, x.shape, self.condition_channels, f"micro-batch {list(idx)}")
            loss, stats = self.loss(iteration, j, x, text, carry, y)
            (loss / n).backward()
            carry = stats.get("carry")
            acc.add_mean("loss", loss.detach() / n)
            for key, name in (("num_chunks", "chunks"), ("bidirectional_loss", "bidirectional")):
                if key in stats:  # FAR: the iteration's chunk count; the bidirectional branch's loss
                    acc.add_mean(name, stats[key].to(acc.device) / n)
            acc.add_samples(idx, stats)
            acc.add_stage1_diagnostics(stats)
        red = stage1_diagnostics(t.reduce_metrics(acc))
        metrics = dict(red)
        metrics.update(t.finalize_and_step(self.group(), iteration, losses={self.group().name: red["loss"]},
                                           per_sample=acc.per_sample))
        return metrics


class MetricAccumulator:
    """Device-side sums of one iteration's metrics: means (already divided by the number of micro-batches),
    counts (summed over DP), the stage-1 split counts and this rank's per-sample losses (for the NaN report).
    """

    def __init__(self, device):
        self.device = device
        self.means: Dict[str, torch.Tensor] = {}
        self.sums: Dict[str, torch.Tensor] = {}
        self.maxes: Dict[str, torch.Tensor] = {}  # max over micro-batches (and DP ranks)
        self.per_sample: Dict[int, torch.Tensor] = {}

    def add_mean(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().to(device=self.device, dtype=torch.float64)
        self.means[name] = self.means[name] + v if name in self.means else v

    def add_sum(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().to(device=self.device, dtype=torch.float64)
        self.sums[name] = self.sums[name] + v if name in self.sums else v

    def add_max(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().to(device=self.device, dtype=torch.float64)
        self.maxes[name] = torch.maximum(self.maxes[name], v) if name in self.maxes else v

    def add_stage1_diagnostics(self, stats: dict) -> None:
        """Raw sums of the stage-1 diagnostics (issue #17) of a micro-batch's `stage1_loss` stats (nothing
        for other stats): per split kind the per-sample loss before reweighting and the squared norms of the
        target's finite-difference term and of ``v``; over the non-boundary samples the reweighting scales
        (sum, max). `stage1_diagnostics` turns the DP-reduced sums into the logged metrics."""
        if not all(k in stats for k in ("kind", "per_sample_loss", "scales", "fd_sq", "v_sq")):
            return
        kind = stats["kind"].to(self.device)
        f64 = lambda k: stats[k].detach().to(device=self.device, dtype=torch.float64)  # noqa: E731
        loss, fd_sq, v_sq, scales = f64("per_sample_loss"), f64("fd_sq"), f64("v_sq"), f64("scales")
        for k, name in enumerate(_KINDS):
            m = kind == k
            self.add_sum(f"_s1/loss_sum_{name}", (loss * m).sum())
            self.add_sum(f"_s1/n_{name}", m.sum())
            if name != "boundary":
                self.add_sum(f"_s1/fd_sq_{name}", (fd_sq * m).sum())
                self.add_sum(f"_s1/v_sq_{name}", (v_sq * m).sum())
        nb = kind != 0
        self.add_sum("_s1/scale_sum", (scales * nb).sum())
        self.add_max("_s1/scale_max", torch.where(nb, scales, torch.zeros_like(scales)).max())

    def add_samples(self, idx: List[int], stats: dict) -> None:
        """The split counts (``kind``) and per-sample losses of a micro-batch's stats, if it has them."""
        if "kind" in stats:
            kind = stats["kind"].to(self.device)
            for k, name in enumerate(("boundary", "r0", "free")):
                self.add_sum(name, (kind == k).sum())  # not bincount: it syncs with the host on CUDA
        if "per_sample_loss" in stats:
            self.per_sample.update(zip(idx, stats["per_sample_loss"].detach()))


_KINDS = ("boundary", "r0", "free")


def stage1_diagnostics(red: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The DP-reduced metrics with `MetricAccumulator.add_stage1_diagnostics`' raw sums replaced by
    (0-d device tensors, no host sync):

    - ``loss_boundary``, ``loss_r0``, ``loss_free``: mean per-sample loss (with w(t), before the adaptive
      reweighting) of each split kind;
    - ``rw_mean``, ``rw_max``: mean and max adaptive-reweighting scale ``boundary_mean / (loss_i + c)``
      (paper eq. 7) over the non-boundary samples (1 with the reweighting off);
    - ``fd/v_r0``, ``fd/v_free``: ``||(T - R)(u_+ - u_-) / (2 e g)|| / ||v||`` over the r = 0 and the free
      samples (root of the ratio of the summed squares): the share of the target that is the model's own
      finite-difference derivative.
    """
    if "_s1/scale_sum" not in red:
        return red
    out = {k: v for k, v in red.items() if not k.startswith("_s1/")}
    one = torch.ones((), dtype=torch.float64, device=red["_s1/scale_sum"].device)
    for name in _KINDS:
        out[f"loss_{name}"] = red[f"_s1/loss_sum_{name}"] / torch.maximum(red[f"_s1/n_{name}"], one)
    n_nb = red["_s1/n_r0"] + red["_s1/n_free"]
    out["rw_mean"] = red["_s1/scale_sum"] / torch.maximum(n_nb, one)
    out["rw_max"] = red["_s1/scale_max"]
    for name in ("r0", "free"):
        out[f"fd/v_{name}"] = (red[f"_s1/fd_sq_{name}"] / red[f"_s1/v_sq_{name}"].clamp_min(1e-30)).sqrt()
    return out


class TeacherStage(Stage):
    """Flow-matching fine-tuning of the teacher (single-time: r = t). ``--i2v-prob P``: a fraction P of the
    samples is conditioned on its clean first latent frame (t = r = 0 there, excluded from the loss;
    `TeacherObjectiveConfig.i2v_prob`), drawn per sample like the noise."""

    adapter = "teacher"
    targets = L.TEACHER_TARGETS

    def __init__(self, trainer):
        super().__init__(trainer)
        self.cfg = TeacherObjectiveConfig(shift=self.args.time_shift, text_dropout=self.args.text_dropout,
                                          i2v_prob=self.args.i2v_prob)

    def loss(self, iteration, j, x, text, carry, condition=None):
        ng = self.t.sample_generators("noise", iteration, j, x.shape[0])
        return flow_matching_loss(self.conditioned(condition), x, text, self.t.negative_text, self.cfg,
                                  noise_generator=ng)


def flow_map_objective_config(args, time_range=None) -> FlowMapObjectiveConfig:
    """The stage-1 objective configuration of parsed trainer arguments (also used by the benchmark);
    ``time_range``: one expert's ``(lo, hi)`` (`models.wan.config.expert_time_range`), None for (0, 1)."""
    return FlowMapObjectiveConfig(
        guidance=args.guidance, fd_eps=args.fd_eps, text_dropout=args.text_dropout, i2v_prob=args.i2v_prob,
        adaptive_reweight=not args.no_adaptive_reweight, reweight_eps=getattr(args, "reweight_eps", 1e-5),
        kernel_backend=args.kernel_backend,
        time=TimeSamplerConfig(shift=args.time_shift, boundary_fraction=args.boundary_fraction,
                               r_zero_fraction=args.r_zero_fraction, loss_weight=args.loss_weight,
                               time_range=time_range or (0.0, 1.0)))


class Stage1(Stage):
    """Forward flow-map training (paper Alg. 1) with the adaptive reweighting over the DP group."""

    adapter = "generator"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.cfg = flow_map_objective_config(self.args, getattr(trainer, "time_range", None))

    def loss(self, iteration, j, x, text, carry, condition=None):
        return self.stage1_loss(self.conditioned(condition), iteration, j, x, text, carry)

    def stage1_loss(self, model, iteration, j, x, text, carry, cfg=None):
        """`stage1_loss` of micro-batch ``j`` in the iteration's global layout (module docstring);
        ``stats["carry"]`` is the boundary (sum, count) for the next micro-batch. ``cfg``: the objective
        configuration (default this stage's; one expert's range in a two-expert stage 2, whose ``iteration``
        is then ``(expert, iteration)``: each expert draws its own times and noise)."""
        t = self.t
        loss, stats = stage1_loss(
            model, x, text, t.negative_text, cfg or self.cfg,
            time_generator=t.generator("time", iteration),  # identical on every rank and step: one split
            noise_generator=t.sample_generators("noise", iteration, j, x.shape[0]),
            global_batch=self.args.global_batch_size, global_offset=t.global_offset(j), dp_group=t.dp_group,
            boundary_carry=carry)
        stats["carry"] = (stats["boundary_sum"], stats["boundary_count"])
        return loss, stats


class FarStage1(Stage1):
    """AnyFlow-FAR stage 1 (docs/design/far.md 2.1): the causal branch every iteration (`far_stage1_loss`: teacher
    forcing, n chunks drawn per iteration identically on every rank), plus with probability
    ``--far-bidirectional-prob`` (one draw per iteration, the same on every rank) the bidirectional branch:
    guidance-fused flow matching of the same model's bidirectional forward on the whole clip, with the
    prompts after the causal branch's text dropout (the reference drops them once for both branches).
    As in the reference, the two branches have their own backward into one optimizer step: when the
    bidirectional branch runs, the causal loss is backpropagated here (scaled like `Stage.train_step`'s)
    before the bidirectional forward, so the two graphs are never alive together; the returned loss is
    then the causal loss (detached) plus the bidirectional loss (with grad), which `Stage.train_step`
    backpropagates. Stage 2's co-training runs the causal branch only (the reference's
    ``bidirectional_modeling_prob = 0``; `training.arguments` refuses another value)."""

    def train_step(self, iteration, micro):
        self._num_micro = len(micro)  # scales the causal branch's own backward like Stage.train_step's
        return super().train_step(iteration, micro)

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg = self.t.config
        self.chunk_partition = tuple(cfg.chunk_partition)
        frames = self.t.dataset.latent_shape[0]
        if frames < sum(self.chunk_partition):
            raise ValueError(f"--chunk-partition {list(self.chunk_partition)} needs {sum(self.chunk_partition)} latent "
                             f"frames per clip; the dataset has {frames}")
        self.bi_cfg = TeacherObjectiveConfig(shift=self.args.time_shift, text_dropout=0.0)

    def iteration_plan(self, iteration: int) -> Tuple[int, bool]:
        """(chunk count n, bidirectional branch on?) of ``iteration``: functions of (seed, iteration) only."""
        g = self.t.generator("far-plan", iteration)
        n = sample_far_num_chunks(g, len(self.chunk_partition), self.args.long_context_prob)
        bi = bool(torch.rand((), generator=g) < self.args.far_bidirectional_prob)
        return n, bi

    def stage1_loss(self, model, iteration, j, x, text, carry):
        t = self.t
        n, bi = self.iteration_plan(iteration)
        loss, stats = far_stage1_loss(
            model, x, text, t.negative_text, self.cfg, chunk_partition=self.chunk_partition, num_chunks=n,
            full_chunk_limit=t.config.full_chunk_limit,
            time_generator=t.generator("time", iteration),
            noise_generator=t.sample_generators("noise", iteration, j, x.shape[0]),
            global_batch=self.args.global_batch_size, global_offset=t.global_offset(j), dp_group=t.dp_group,
            boundary_carry=carry)
        stats["carry"] = (stats["boundary_sum"], stats["boundary_count"])
        if bi:
            if torch.is_grad_enabled():
                (loss / getattr(self, "_num_micro", 1)).backward()
                loss = loss.detach()
            neg = t.negative_text.to(text.dtype).expand(text.shape[0], -1, -1)
            dropped = stats["text_dropped"].to(text.device)[:, None, None]
            text_used = torch.where(dropped, neg, text)
            clip = x[:, :sum(self.chunk_partition)]
            bi_loss, bi_stats = flow_matching_loss(
                guidance_fused(model, t.negative_text, self.args.guidance), clip, text_used, t.negative_text,
                self.bi_cfg, noise_generator=t.sample_generators("far-bidirectional", iteration, j, x.shape[0]))
            loss = loss + bi_loss
            stats["bidirectional_loss"] = bi_stats["loss"]
        return loss, stats
