"""Stage 2 of AnyFlow in the trainer: on-policy distillation with flow-map backward simulation
(paper Alg. 2), three roles on one frozen base.

Roles (one copy of the base weights; the LoRA adapter is switched per call):

- real score (teacher): the base with no adapter, single-time (called with r = t);
- fake score (critic): adapter ``fake_score``, fresh (B = 0), so it starts equal to the teacher;
- generator (student flow map): adapter ``generator``, initialised from a stage-1 checkpoint
  (``--init-adapters-from``; its EMA weights unless ``--init-from-live-weights``).

Schedules (``--schedule``):

- ``sequential`` (the reference order): per micro-batch the generator rollout + DMD (+ stage-1
  co-training) and its backward; generator update; then per micro-batch the critic's own no-grad rollout
  of the *updated* generator and its flow-matching backward; critic update.
- ``pipelined``: per micro-batch, the critic's forward / backward runs right behind the generator's on the
  generator's detached rollout of the same micro-batch (no second rollout: up to three generator forwards
  saved per micro-batch), and both updates happen at the end of the iteration with one gradient
  all-reduce for both adapters. This is an **algorithmic variant**, not an overlap: the critic learns from
  the pre-update generator's samples (the reference's critic sees the updated generator's), and on one
  stream its kernels simply queue behind the rollout's.

Overlap (``--overlap-critic``, with ``pipelined``): the critic's forward / backward of micro-batch j is
issued on a second CUDA stream, so it runs concurrently with the generator's rollout of micro-batch
j + 1 on the main stream (the design card's overlapped schedule). The work and its order are those of
``pipelined``: the two roles touch disjoint trainable tensors (the base is frozen), every collective is
enqueued in the same program order on every rank, and the main stream waits for the side stream before
the gradient reduction. Its gain is hiding one role's TP / CP communication and small kernels behind the
other's compute (14B at TP4 x CP2); at 1.3B on one GPU expect little. Without CUDA there is no second
stream and the schedule is ``pipelined`` exactly (tested); on a GPU the equality is tested to rounding
(the caching allocator and kernel selection may differ per stream) and the profiler shows the overlap.

Image-to-video (``--i2v-prob P``, Wan2.2 TI2V): a fraction P of the samples (one coin per sample from its
own generator, stream ``"i2v"``, so the choice does not depend on the batch layout) is conditioned on the
clean first latent frame of its batch clip, in all three roles (`anyflow.distill.FrameCondition`): the
generator's rollout holds it clean at ``t = 0`` (``r`` the step's, as diffusers samples), the DMD scores and
the critic see it clean at ``t = r = 0``, and it is out of the DMD and critic losses. The co-trained stage-1
loss draws its own condition (`Stage1`). ``P = 0`` draws nothing: the text-to-video stage 2, bitwise.

The critic's rollout in ``sequential`` uses the same noise, simulation plan and condition as the generator's, so with
a frozen generator (lr 0) both schedules see the same rollouts and give identical updates (tested).
Each role names its adapter in the call (`Stage2.role`: ``model(..., adapter=...)``); recomputed blocks
capture it, so no adapter has to be re-selected before a backward.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, List

import torch

from megatron_anyflow.anyflow.distill import (DistillConfig, FrameCondition, backward_simulation, critic_loss, generator_loss,
                                               sample_simulation_plan)
from megatron_anyflow.anyflow.objective import check_i2v_frames, condition_mask
from megatron_anyflow.data.channel_condition import check_channel_condition, condition_channels, with_channel_condition
from megatron_anyflow.models import lora as L
from megatron_anyflow.training.stages import FarStage1, MetricAccumulator, Stage1, flow_map_objective_config

GENERATOR, FAKE = "generator", "fake_score"


def distill_config(args) -> DistillConfig:
    """The stage-2 configuration of parsed trainer arguments (also used by the benchmark)."""
    return DistillConfig(
        # --time-shift is the one shift of the method: the rollout grid, the DMD re-noise time and the
        # critic's flow-matching time all use it (the reference uses the scheduler's shift everywhere).
        num_steps_choices=tuple(args.simulation_steps), shift=args.time_shift, dmd_tau_shift=args.time_shift,
        critic_time_shift=args.time_shift, real_guidance=args.real_guidance,
        simulation=args.simulation, grad_through=args.grad_through, cotrain_stage1=not args.no_cotrain_stage1,
        generator_lr=args.lr, critic_lr=args.critic_lr, betas=(args.adam_beta1, args.adam_beta2),
        clip_grad=args.clip_grad, ema_decay=args.ema_decay, ema_start=args.ema_start_iter,
        critic_updates_per_generator=args.critic_updates)


class Stage2(Stage1):
    """On-policy distillation; reuses `Stage1`'s objective configuration for the co-training loss."""

    adapter = GENERATOR

    def __init__(self, trainer):
        args = trainer.args
        # Wan2.2 I2V-A14B: every role's call (rollout, real and fake score, critic, co-trained stage 1) reads the
        # micro-batch's image condition (`role(..., y=)`); the generated sample is of the clip's image
        self.condition_channels = condition_channels(trainer.config)
        self.pair = getattr(trainer, "experts", None) is not None
        inits = self._stage1_checkpoints(trainer)
        if args.init_adapters_from:
            from megatron_anyflow.checkpoint import store as ckpt

            meta = ckpt.read_meta(ckpt.resolve_checkpoint_dir(args.init_adapters_from))
            lora = meta.get("lora") or {}
            if GENERATOR not in lora.get("adapters", []):
                raise ValueError(f"--init-adapters-from {args.init_adapters_from}: no '{GENERATOR}' adapter in it "
                                 f"(adapters: {lora.get('adapters', [])}); give a stage-1 checkpoint")
            args.lora_rank, args.lora_alpha = lora["rank"], lora["alpha"]  # the adapter's own size
            if lora.get("targets"):
                # The generator continues the stage-1 adapter, so it adapts exactly the modules stage 1 did
                # (e.g. a stage 1 run with --lora-exclude); the fake score mirrors it. A --lora-exclude here
                # may only repeat that choice: dropping a module stage 1 trained would discard its adapter.
                self.targets = tuple(lora["targets"])
                exclude = getattr(args, "lora_exclude", None) or []
                dropped = [t for t in self.targets if any(fnmatch.fnmatch(t, p) for p in exclude)]
                if dropped:
                    raise ValueError(f"--lora-exclude {' '.join(exclude)} drops {dropped}, which the stage-1 "
                                     f"checkpoint {args.init_adapters_from} adapts; stage 2 adapts what stage 1 "
                                     "did (its LoRA targets are read from the checkpoint): drop --lora-exclude")
        self.t = trainer
        self.args = args
        self.adapters = []
        self.setup_lora([GENERATOR, FAKE])
        if args.init_adapters_from:
            from megatron_anyflow.checkpoint.model_io import load_adapters

            # The stage-1 model one evaluates is its EMA: start from it unless asked otherwise.
            for model, path in inits:
                load_adapters(model, path, [GENERATOR], ema=not args.init_from_live_weights)
        self.cfg = flow_map_objective_config(args)
        self.dcfg = distill_config(args)
        if self.pair:
            from megatron_anyflow.models.wan.config import expert_time_range

            if args.i2v_prob > 0:
                raise ValueError(f"--i2v-prob {args.i2v_prob}: a two-expert model (Wan2.2 A14B) holds no clean first "
                                 "frame: T2V-A14B is text only, and I2V-A14B is conditioned on every sample through its "
                                 "input channels (a dataset with --i2v-condition); drop --i2v-prob")
            # the rollout grid with b on it, and its crossing shortcut split (validated with the simulation)
            self.dcfg = dataclasses.replace(self.dcfg, boundary=trainer.model.boundary)
            # co-training: each expert's own stage-1 loss on its range (docs/design/anyflow.md 2.1)
            self.expert_cfgs = {e: flow_map_objective_config(args, expert_time_range(
                dict(trainer.arch, expert=e), "stage1", e, "the pair")) for e in ("high", "low")}
        if args.schedule == "pipelined" and args.critic_updates != 1:
            raise ValueError("--schedule pipelined reuses each generator rollout once: it needs --critic-updates 1")
        if args.overlap_critic and args.schedule != "pipelined":
            raise ValueError("--overlap-critic overlaps the critic of micro-batch j with the generator of j + 1, "
                             "which only --schedule pipelined allows (sequential trains the critic on the updated "
                             f"generator); got --schedule {args.schedule}")

    def _stage1_checkpoints(self, trainer):
        """[(model, stage-1 checkpoint)] whose ``generator`` adapters initialise the generator: the model and
        ``--init-adapters-from``; for a two-expert model each expert and the stage-1 checkpoint of that expert
        (``--init-adapters-from`` / ``-2`` in either order: the roles come from their ``wan_config.expert``).

        Raises:
            ValueError: ``--init-adapters-from-2`` on one model; for a pair, one of the two missing, or
                checkpoints that are not one 'high' and one 'low' stage-1 expert (named)."""
        args = trainer.args
        first, second = args.init_adapters_from, getattr(args, "init_adapters_from_2", None)
        if not self.pair:
            if second:
                raise ValueError("--init-adapters-from-2 names the other expert's stage-1 checkpoint of a two-expert "
                                 "model; this stage 2 trains one model")
            return [(trainer.model, first)] if first else []
        if not first and not second:
            return []
        if not (first and second):
            raise ValueError("a two-expert stage 2 starts each expert's generator from its own stage-1 run: give both "
                             "--init-adapters-from and --init-adapters-from-2 (or neither)")
        from megatron_anyflow.checkpoint.model_io import expert_pair

        pair, _ = expert_pair(("--init-adapters-from", first), ("--init-adapters-from-2", second))
        found = {e: path for e, (path, _, _) in pair.items()}
        model = trainer.model
        args.init_adapters_from = found["high"]  # LoRA size and targets are read from it (the low run's must match)
        return [(model.high, found["high"]), (model.low, found["low"])]

    # -- roles -------------------------------------------------------------------------------------
    def role(self, adapter, expert=None, y=None):
        """The model as one role: ``call(z, T, R, text)`` runs ``adapter`` (None: the frozen base, the
        real score). The adapter travels with the call (`WanModel.forward`'s ``adapter``): recomputed
        blocks replay it in backward whatever another role selected meanwhile. ``expert`` (``"high"`` /
        ``"low"``, a two-expert model): that expert alone, unrouted; the co-trained stage-1 loss calls each
        expert on its own range (its finite difference may step just past it). ``y``: the micro-batch's channel
        condition ``[b, f, c_y, h, w]`` (Wan2.2 I2V-A14B), appended to the latents of every call."""
        model = self.t.model if expert is None else getattr(self.t.model, expert)

        def call(z, T, R, text):
            return model(z, T, R, text, adapter=adapter)

        return call if y is None else with_channel_condition(call, y)

    def param_groups(self):
        return {GENERATOR: (self.group_params(GENERATOR), self.args.lr),
                FAKE: (self.group_params(FAKE), self.args.critic_lr)}

    # -- one iteration -----------------------------------------------------------------------------
    def _micro_inputs(self, iteration, j, idx):
        t = self.t
        x, text, y = t.batch(idx)
        check_channel_condition(y, x.shape, self.condition_channels, f"micro-batch {list(idx)}")
        plan = sample_simulation_plan(t.generator("plan", iteration, j), self.dcfg)  # same on every rank
        # one generator per sample (global index): the rollout noise does not depend on the batch layout
        gens = t.sample_generators("rollout-noise", iteration, j, x.shape[0])
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=t.device, dtype=x.dtype) for g in gens])
        return x, text, plan, noise, self._condition(iteration, j, x), y

    def _condition(self, iteration, j, x):
        """The micro-batch's `FrameCondition` (frame 0 of the samples whose ``"i2v"`` coin is below
        ``--i2v-prob``), or None with ``--i2v-prob 0`` (no draw at all)."""
        p = self.args.i2v_prob
        if p <= 0:
            return None
        check_i2v_frames(p, x.shape[1])
        gens = self.t.sample_generators("i2v", iteration, j, x.shape[0])
        u = torch.cat([torch.rand((1,), generator=g, device=self.t.device) for g in gens])
        return FrameCondition(x, condition_mask(u < p, x.shape[1]))

    def _generator_loss(self, iteration, j, x, text, plan, noise, carry, n=1, condition=None, y=None):
        """The generator's DMD loss of micro-batch ``j`` (with grad; the caller backpropagates ``loss / n``).

        The co-trained stage-1 loss (weight ``stage1_weight``) is backpropagated here, scaled by ``1 / n``,
        **before** the rollout: its graph is freed before the rollout builds its own, so the two are never
        alive together (the gradient is the same as backpropagating their sum). ``info["total_loss"]`` is
        the detached DMD + weighted stage-1 loss. ``y``: the micro-batch's channel condition (`role`).
        """
        t = self.t
        gen, real, fake = self.role(GENERATOR, y=y), self.role(None, y=y), self.role(FAKE, y=y)
        s1_value, s1_stats = None, {}
        if self.dcfg.cotrain_stage1 and self.pair:
            # each expert's own stage-1 loss on its range; the experts' parameters are disjoint, so each gets
            # exactly the gradient of its own stage-1 run (with this run's weight); the logged value is the mean
            s1_value, s1_stats = 0.0, {"carry": {}}
            for e, cfg in self.expert_cfgs.items():
                s1, st = self.stage1_loss(self.role(GENERATOR, e, y), (e, iteration), j, x, text,
                                          (carry or {}).get(e), cfg)
                (self.dcfg.stage1_weight * s1 / n).backward()
                s1_value = s1_value + s1.detach() / 2
                s1_stats["carry"][e] = st["carry"]
        elif self.dcfg.cotrain_stage1:
            s1, s1_stats = self.stage1_loss(gen, iteration, j, x, text, carry)
            (self.dcfg.stage1_weight * s1 / n).backward()
            s1_value = s1.detach()
        neg = t.negative_text.expand(x.shape[0], -1, -1)
        loss, info = generator_loss(
            gen, real, fake, noise, text, neg, plan, self.dcfg,
            tau_generator=t.generator("tau", iteration, j, t.dp_rank, device=t.device),
            rollout_generator=t.generator("rollout", iteration, j, t.dp_rank, device=t.device), condition=condition)
        info["stage1_loss"] = s1_value
        info["stage1_stats"] = s1_stats
        total = loss.detach()
        if s1_value is not None:
            total = total + self.dcfg.stage1_weight * s1_value.to(total.dtype)
        info["total_loss"] = total
        return loss, info

    def _critic_loss(self, iteration, j, x0, text, condition=None, y=None):
        t = self.t
        loss, info = critic_loss(self.role(FAKE, y=y), x0, text,
                                 t.generator("critic", iteration, j, t.dp_rank, device=t.device), self.dcfg,
                                 condition=condition)
        return loss, info

    def _critic_on_side_stream(self, iteration, j, x0, text, n, critic_acc, side, condition=None, y=None):
        """The pipelined critic step of micro-batch ``j`` on ``side`` (a CUDA stream), after the main
        stream's work so far (the rollout ``x0`` is ready)."""
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lc, _ = self._critic_loss(iteration, j, x0, text, condition, y)
            (lc / n).backward()
            critic_acc.add_mean("critic_loss", lc.detach() / n)
        x0.record_stream(side)  # x0 was allocated on the main stream: keep it until the side stream is done

    def train_step(self, iteration: int, micro: List[List[int]]) -> Dict[str, float]:
        t, n = self.t, len(micro)
        g_gen, g_fake = t.groups[GENERATOR], t.groups[FAKE]
        side = (torch.cuda.Stream(device=t.device) if self.args.overlap_critic and t.device.type == "cuda"
                else None)
        gen_acc, critic_acc = MetricAccumulator(t.device), MetricAccumulator(t.device)
        metrics: Dict[str, float] = {}
        inputs = []
        carry = None
        for j, idx in enumerate(micro):
            x, text, plan, noise, cond, y = self._micro_inputs(iteration, j, idx)
            loss, info = self._generator_loss(iteration, j, x, text, plan, noise, carry, n, cond, y)
            (loss / n).backward()
            carry = info["stage1_stats"].get("carry")
            gen_acc.add_mean("generator_loss", info["total_loss"] / n)
            gen_acc.add_mean("dmd_loss", info["dmd_loss"] / n)
            if info["stage1_loss"] is not None:
                gen_acc.add_mean("stage1_loss", info["stage1_loss"] / n)
                gen_acc.add_samples(idx, info["stage1_stats"])
            if self.args.schedule == "pipelined" and side is not None:
                self._critic_on_side_stream(iteration, j, info["x0"], text, n, critic_acc, side, cond, y)
            elif self.args.schedule == "pipelined":
                lc, _ = self._critic_loss(iteration, j, info["x0"], text, cond, y)
                (lc / n).backward()
                critic_acc.add_mean("critic_loss", lc.detach() / n)
            else:
                inputs.append((text, plan, noise, cond, y))
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)  # both adapters' gradients complete
        if self.args.schedule == "pipelined":
            red = t.reduce_metrics(gen_acc, critic_acc)
            metrics.update(t.finalize_and_step_groups(
                [g_gen, g_fake], iteration, losses={GENERATOR: red["generator_loss"], FAKE: red["critic_loss"]},
                per_sample=gen_acc.per_sample))
        else:
            red = t.reduce_metrics(gen_acc)
            metrics.update(t.finalize_and_step(g_gen, iteration, losses={GENERATOR: red["generator_loss"]},
                                               per_sample=gen_acc.per_sample))
            m = self.dcfg.critic_updates_per_generator
            for c in range(m):
                step_acc = MetricAccumulator(t.device)
                for j, (text, plan, noise, cond, y) in enumerate(inputs):
                    with torch.no_grad():
                        x0, _ = backward_simulation(
                            self.role(GENERATOR, y=y), noise, text, plan, self.dcfg,
                            generator=t.generator("rollout", iteration, j, t.dp_rank, device=t.device), condition=cond)
                    lc, _ = self._critic_loss(iteration, j if c == 0 else (c, j), x0, text, cond, y)
                    (lc / n).backward()
                    step_acc.add_mean("critic_loss", lc.detach() / n)
                step_red = t.reduce_metrics(step_acc)
                critic_acc.add_mean("critic_loss", step_red["critic_loss"] / m)
                metrics.update(t.finalize_and_step(g_fake, iteration, losses={FAKE: step_red["critic_loss"]}))
            red.update(critic_acc.means)
        L.set_active_adapter(t.model, GENERATOR)
        metrics.update(red)
        return metrics


class FarGenerator:
    """The AnyFlow-FAR generator role: called like the model (the co-trained FAR stage-1 loss passes the
    teacher-forcing arguments) and rolled out chunk by chunk through the KV cache by
    `distill.backward_simulation` (``causal_rollout``: `anyflow.causal.causal_flow_map_backward_simulation`,
    docs/design/far.md 2.2: the same plan (N, k) for every chunk, history re-encoded under no_grad)."""

    def __init__(self, model, adapter, chunk_partition):
        from megatron_anyflow.models.wan.far import FarModelRunner

        self.model, self.adapter, self.chunk_partition = model, adapter, tuple(chunk_partition)
        self.runner = FarModelRunner(model, adapter)

    def __call__(self, *args, **kwargs):
        return self.model(*args, adapter=self.adapter, **kwargs)

    def causal_rollout(self, noise, text, plan, grad_through):
        from megatron_anyflow.anyflow.causal import causal_flow_map_backward_simulation

        if noise.shape[1] != sum(self.chunk_partition):
            raise ValueError(f"FAR rollout: noise has {noise.shape[1]} latent frames; chunk_partition "
                             f"{list(self.chunk_partition)} covers {sum(self.chunk_partition)}")
        return causal_flow_map_backward_simulation(self.runner, noise, text, self.chunk_partition, plan,
                                                   grad_through=grad_through)


class FarStage2(Stage2, FarStage1):
    """AnyFlow-FAR stage 2 (docs/design/far.md 2.2): the causal generator (`FarGenerator`) rolled out on the whole
    clip; real score (frozen base) and fake score (``fake_score`` adapter) are the **bidirectional**
    forwards of the same weights on the whole video (DMD and critic unchanged); the co-trained stage-1
    loss is FAR stage 1's causal branch (``--far-bidirectional-prob`` 0 by default in stage 2)."""

    def __init__(self, trainer):
        Stage2.__init__(self, trainer)
        cp = tuple(trainer.config.chunk_partition)
        self.chunk_partition = cp
        frames = trainer.dataset.latent_shape[0]
        if frames != sum(cp):
            raise ValueError(f"--chunk-partition {list(cp)} covers {sum(cp)} latent frames; the dataset's clips have "
                             f"{frames} (stage 2 rolls out whole clips)")
        from megatron_anyflow.anyflow.objective import TeacherObjectiveConfig

        self.bi_cfg = TeacherObjectiveConfig(shift=self.args.time_shift, text_dropout=0.0)

    def role(self, adapter, expert=None, y=None):
        if y is not None:  # FAR models are Wan2.1 T2V here: no channel condition reaches them
            raise ValueError("an AnyFlow-FAR model reads no channel condition")
        if adapter == GENERATOR:
            return FarGenerator(self.t.model, GENERATOR, self.chunk_partition)
        return super().role(adapter, expert)
