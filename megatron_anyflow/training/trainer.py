"""The AnyFlow training loop: set-up, micro-batch accumulation, optimiser steps, EMA, logging,
crash-safe checkpoints and bit-exact resume.

Stages (``--stage``): ``teacher`` (flow matching), ``stage1`` (forward flow-map training, paper Alg. 1),
``stage2`` (on-policy distillation, paper Alg. 2; see `megatron_anyflow.training.stages`).

Determinism: every random draw of iteration ``i`` comes from generators seeded with a 64-bit hash of
(seed, i, ...): the stage-1 time split per iteration (identical on all ranks), the noise / dropout /
image-to-video draws per sample of the global batch (`Trainer.sample_generators`), the stage-2 simulation
plan per micro-batch (identical on all ranks), and the data order is a pure function of the seed and the
consumed-sample count. A resumed run therefore continues bit-exactly, and the stage-1 and teacher draws
do not depend on the (DP, micro-batch, accumulation) layout (see `training.stages`).

Safety: a non-finite loss or gradient norm skips that optimizer step (`training.nan_guard`), and no
checkpoint is written with non-finite trainable weights, EMA or optimizer state.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.data.channel_condition import condition_channels
from megatron_anyflow.data.latent_dataset import DataParallelSampler, LatentDataset, MockLatentDataset, collate
from megatron_anyflow.data.loader import TrainingDataLoader
from megatron_anyflow.models.wan.config import expert_time_range, wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.parallel.sharding import canonical_key, load_module_state, module_sharded_state_dict
from megatron_anyflow.parallel.state import initialize_parallel
from megatron_anyflow.parallel.tensor_parallel import finalize_model_grads, tp_rank, tp_world_size
from megatron_anyflow.training.nan_guard import NonFiniteGuard, check_finite_state, gather_bad_samples
from megatron_anyflow.training.optim import (
    EMA,
    clip_gradients,
    lr_at,
    make_adamw,
    optimizer_sharded_state,
    optimizer_steps,
    set_optimizer_steps,
)


def derive_seed(*parts) -> int:
    """A 64-bit seed from any tuple of ints / strings (stable across processes, runs and machines).

    BLAKE2b of the tuple's ``repr``, 8 bytes: 2^64 distinct seeds, so the per-sample generators of a long
    run (iterations x global batch, easily > 2^32 draws) do not collide the way a 32-bit CRC would.
    """
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


_COUNT_METRICS = ("boundary", "r0", "free", "chunks")

# Parameter families of the per-family gradient / LoRA-B norms (issue #17): the time and delta embedders,
# the other embedders (patch, text, image), attention, FFN, modulation (time_proj, scale-shift tables,
# norms) and the rest (the output projection).
PARAM_FAMILIES = ("temb", "emb", "attn", "ffn", "mod", "out")


def param_family(name: str) -> str:
    """The `PARAM_FAMILIES` entry of a parameter's (canonical) name."""
    if ".time_embedder." in name or ".delta_embedder." in name:
        return "temb"
    if "time_proj" in name or "scale_shift_table" in name:
        return "mod"
    if "attention" in name:
        return "attn"
    if ".mlp." in name:
        return "ffn"
    if "embed" in name:
        return "emb"
    if "norm" in name:
        return "mod"
    return "out"


def family_norms(params: Dict[str, torch.nn.Parameter], tag: str) -> Dict[str, torch.Tensor]:
    """Per `param_family`: the L2 norm of the gradients (``gn_<family>``, before clipping) and, for LoRA
    adapters, of the ``lora_B`` weights (``B_<family>``), as 0-d float32 device tensors keyed
    ``<tag>/gn_<family>`` / ``<tag>/B_<family>``. Tensor-parallel aware like `clip_gradients` (shards
    from every TP rank, replicated tensors from TP rank 0, one all-reduce over TP); no host sync."""
    fams = {f: i for i, f in enumerate(PARAM_FAMILIES)}
    nf = len(PARAM_FAMILIES)
    device = next(iter(params.values())).device
    sq = torch.zeros(2 * nf, dtype=torch.float32, device=device)
    seen = torch.zeros(2 * nf, dtype=torch.bool)
    rank0 = tp_rank() == 0
    for name, p in params.items():
        i = fams[param_family(name)]
        own = getattr(p, "tensor_model_parallel", False) or rank0
        if p.grad is not None:
            seen[i] = True
            if own:
                sq[i] += p.grad.detach().float().pow(2).sum()
        if name.endswith("lora_B"):
            seen[nf + i] = True
            if own:
                sq[nf + i] += p.detach().float().pow(2).sum()
    if tp_world_size() > 1:
        dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    norms = sq.sqrt()
    keys = [f"{tag}/gn_{f}" for f in PARAM_FAMILIES] + [f"{tag}/B_{f}" for f in PARAM_FAMILIES]
    return {k: norms[i] for i, k in enumerate(keys) if seen[i]}


def _fmt_metric(k: str, v: float) -> str:
    if k in _COUNT_METRICS:
        return f"{k} {int(round(v))}"
    return f"{k} {v:.4e}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{k} {v:.4f}"


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _recompute_kwargs(args) -> dict:
    if args.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method=args.recompute_method,
                    recompute_num_layers=args.recompute_num_layers)
    if args.recompute_granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(args.recompute_modules),
                    recompute_policy=getattr(args, "recompute_policy", "modules"))
    return {}


def _fp8_kwargs(args) -> dict:
    if not args.fp8_format:
        return {}
    kw = dict(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    if args.first_last_layers_bf16:
        kw.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=args.num_layers_at_start_in_bf16,
                  num_layers_at_end_in_bf16=args.num_layers_at_end_in_bf16)
    return kw


def build_stage(trainer):
    """The `training.stages.Stage` of ``trainer.args.stage`` (teacher / stage1 / stage2; FAR with ``--model far``).

    Here, above both stage modules, so `training.stage2` can build on `training.stages` without a circle.
    Raises ValueError for an unknown stage name.
    """
    from megatron_anyflow.training.stage2 import FarStage2, Stage2
    from megatron_anyflow.training.stages import FarStage1, Stage1, TeacherStage

    stage = trainer.args.stage
    far = getattr(trainer.args, "model", "bidirectional") == "far"
    if stage == "teacher":
        return TeacherStage(trainer)
    if stage == "stage1":
        return FarStage1(trainer) if far else Stage1(trainer)
    if stage == "stage2":
        return FarStage2(trainer) if far else Stage2(trainer)
    raise ValueError(f"unknown stage {stage!r}")


class ParamGroup:
    """One trainable set (an adapter, or the whole model) with its optimiser, EMA and lr."""

    def __init__(self, name: str, params: Dict[str, torch.nn.Parameter], args, lr: float):
        if not params:
            raise ValueError(f"parameter group {name!r} has no trainable parameters")
        self.name = name
        self.params = params  # canonical checkpoint key -> parameter
        self.lr = lr
        self.optimizer = make_adamw(params.values(), lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                                    args.weight_decay)
        self.ema = EMA(params, args.ema_decay, args.ema_start_iter)
        self.steps = 0

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None


class Trainer:
    """Builds everything from parsed arguments (`training.arguments.parse_args`) and trains.

    Raises:
        ValueError: inconsistent sizes (global batch vs micro batch x DP), a checkpoint of another stage
            or layout given to ``--load``, a dataset whose latents do not fit the model.
    """

    def __init__(self, args, log=None):
        self.args = args
        if not torch.cuda.is_available():
            from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

            enable_megatron_cpu_compat()  # megatron-core collectives / checkpoint saves on CPU
        initialize_parallel(args.tensor_model_parallel_size, args.context_parallel_size)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.rank = dist.get_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * self.dp_size
        self._log = log or (print if self.rank == 0 else (lambda *a, **k: None))
        self.guard = NonFiniteGuard(args.max_skipped_iters, log=self._log)
        self.skipped_iters = 0  # of this process's run, set by train()
        # --save is claimed before any work (checkpoint.store.claim_save_root): created if missing, checked
        # writable, and locked against a second trainer; a refusal stops every rank with one line.
        self.save_lock = ckpt.claim_save_root(args.save, warn=lambda m: self._log(m, flush=True)) if args.save else None
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.iteration = 0
        self.consumed_samples = 0
        self._build_model()
        self._build_data()
        self.stage = build_stage(self)
        self.groups: Dict[str, ParamGroup] = {name: ParamGroup(name, params, args, lr)
                                              for name, (params, lr) in self.stage.param_groups().items()}
        self.writer = None
        if args.tensorboard_dir and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(args.tensorboard_dir)
        if args.save and self.rank == 0:
            ckpt.check_free_space(args.save, self._checkpoint_bytes(), warn=lambda m: self._log(m, flush=True))
        if args.load:
            self.load(args.load)

    # ------------------------------------------------------------------------------------------
    def _build_model(self):
        args = self.args
        if args.pretrained:
            self.pretrained_dir = ckpt.resolve_checkpoint_dir(args.pretrained)
            arch = dict(ckpt.read_meta(self.pretrained_dir)["wan_config"])
        else:
            self.pretrained_dir = None
            arch = wan_config(args.model_preset).arch_dict()
        where = f"--pretrained {args.pretrained}" if args.pretrained else f"--model-preset {args.model_preset}"
        # one expert of a two-expert model trains stage 1 on its own time range; anything else is refused
        self.time_range = expert_time_range(arch, args.stage, getattr(args, "expert", None), where,
                                            getattr(args, "model", "bidirectional"))
        if self.time_range is not None:  # the checkpoints this run writes name their expert (convert_to_hf pairs them)
            arch["expert"] = getattr(args, "expert", None) or arch["expert"]  # validated by expert_time_range
        self.experts = None  # expert -> base checkpoint directory (or None: random init), stage 2 of a pair
        if arch.get("boundary_ratio") is not None and args.stage == "stage2":
            self._build_pair(arch, where)
            return
        for flag in ("pretrained_2", "init_adapters_from_2"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} names the other expert of a two-expert model (stage 2); "
                                 f"{where} is a single model")
        model, cfg, self.arch = self._make_model(arch, self.pretrained_dir)
        self.model, self.config = model.to(self.device), cfg
        self._finish_model(model)

    def _build_pair(self, arch, where):
        """Stage 2 of a two-expert model (Wan2.2 A14B): both experts resident as one
        `anyflow.two_expert.TwoExpertWanModel` (each call routed to the expert of its time range); bases from
        ``--pretrained`` / ``--pretrained-2`` (roles from their checkpoints) or both from the preset."""
        from megatron_anyflow.anyflow.two_expert import EXPERTS, TwoExpertWanModel

        args = self.args
        if self.pretrained_dir:
            if not getattr(args, "pretrained_2", None):
                raise ValueError(f"{where} is one expert ({arch.get('expert')}) of a two-expert model: stage 2 trains "
                                 "both; give the other expert's base with --pretrained-2")
            from megatron_anyflow.checkpoint.model_io import expert_pair

            pair, _ = expert_pair(("--pretrained", args.pretrained), ("--pretrained-2", args.pretrained_2))
            found = {e: (d, dict(meta["wan_config"])) for e, (_, d, meta) in pair.items()}
        else:
            if getattr(args, "pretrained_2", None):
                raise ValueError("--pretrained-2 needs --pretrained (the other expert's base)")
            found = {e: (None, dict(arch, expert=e)) for e in EXPERTS}  # random init from the preset (seeded alike)
        made = {e: self._make_model(found[e][1], found[e][0]) for e in EXPERTS}
        model = TwoExpertWanModel(made["high"][0], made["low"][0], float(arch["boundary_ratio"]))
        self.experts = {e: (os.path.abspath(found[e][0]) if found[e][0] else None) for e in EXPERTS}
        self.pretrained_dir = self.experts["high"]  # the high expert's base is --pretrained's record
        self.arch = made["high"][2]
        self.model, self.config = model.to(self.device), model.config
        self._finish_model(model)

    def _make_model(self, arch, pretrained_dir):
        """A `WanModel` of ``arch`` in this run's layout and kernels, filled from ``pretrained_dir`` (its base)
        or randomly initialised (seeded by ``--seed``, identical on every rank). Returns (model, config, the
        architecture this run records)."""
        args = self.args
        arch = dict(arch)
        need_delta = args.stage != "teacher"
        base_has_delta = arch["delta_embedder"]
        arch["delta_embedder"] = base_has_delta or need_delta
        if getattr(args, "model", "bidirectional") == "far":
            # The FAR student is built on the bidirectional base (Wan / teacher): same weights plus
            # far_patch_embedding, initialised from patch_embedding when the base has none (docs/design/far.md 1.1).
            arch["far"] = True
            if args.chunk_partition is not None:
                arch["chunk_partition"] = list(args.chunk_partition)
            for k, v in wan_config(None, **{**arch, "far": True}).arch_dict().items():
                arch.setdefault(k, v)
        elif arch.get("far"):
            raise ValueError(f"--pretrained {args.pretrained} is an AnyFlow-FAR checkpoint; pass --model far")
        cfg = wan_config(None, **arch, tensor_model_parallel_size=args.tensor_model_parallel_size,
                         sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
                         context_parallel_size=args.context_parallel_size, bf16=args.bf16,
                         backend=args.backend, attention_impl=args.attention_impl,
                         lora_merged_nograd=getattr(args, "lora_nograd_merge", "off"),
                         perform_initialization=pretrained_dir is None,
                         **({"far_attention": getattr(args, "far_attention", "grouped")} if arch.get("far") else {}),
                         **_recompute_kwargs(args), **_fp8_kwargs(args))
        torch.manual_seed(args.seed)  # identical base init on every rank (random-init presets only)
        model = WanModel(cfg)
        if pretrained_dir:
            from megatron_anyflow.checkpoint.model_io import load_as_base, represented_adapter

            merged = represented_adapter(ckpt.read_meta(pretrained_dir))
            self._log(f"loading the base model from {pretrained_dir}"
                      + (f" (its LoRA '{merged}' adapter merged into the base it records)" if merged else ""))
            # Follows an adapter-only checkpoint to its recorded base and merges a LoRA teacher; a base
            # without a delta embedder gets one as a copy of the time embedder (exactly the base at t = r).
            load_as_base(model, pretrained_dir)
        elif need_delta and not base_has_delta:
            model.condition_embedder.reset_delta_embedder()  # AnyFlow's start: exactly the base at t = r
        if cfg.far and not pretrained_dir:
            model.reset_far_patch_embedding()
        return model, cfg, arch

    def _finish_model(self, model):
        args = self.args
        self._log(model.describe_kernels(self.device)
                  + (", blocks compiled (torch.compile per block)" if getattr(args, "compile", False) else ""))
        if getattr(args, "compile", False):
            model.compile_blocks()

    def _build_data(self):
        args = self.args
        # A model may read a channel condition besides its latents (Wan2.2 I2V-A14B: in 36 = 16 latents + 20)
        cc = condition_channels(self.config)
        latent_channels = self.config.in_channels - cc
        if args.mock_data:
            self.dataset = MockLatentDataset(args.mock_num_samples, args.mock_latent_shape, args.mock_text_len,
                                             self.config.text_dim, seed=args.seed, condition_channels=cc)
        else:
            self.dataset = LatentDataset(args.data_path)
            if self.dataset.index["text_dim"] != self.config.text_dim:
                raise ValueError(f"dataset {args.data_path} has text_dim {self.dataset.index['text_dim']}; the model "
                                 f"expects {self.config.text_dim}")
            if self.dataset.latent_shape[1] != latent_channels:
                raise ValueError(f"dataset latents have {self.dataset.latent_shape[1]} channels; the model expects "
                                 f"{latent_channels}" + (f" (in_channels {self.config.in_channels} = {latent_channels} "
                                                         f"latent + {cc} condition channels)" if cc else ""))
            have = self.dataset.condition_channels
            if cc and not have:
                raise ValueError(f"dataset {args.data_path} has no channel condition; the model reads a {cc}-channel "
                                 "image condition besides its latents (Wan2.2 I2V-A14B): prepare the dataset with "
                                 "tools/prepare_dataset.py --i2v-condition")
            if have != cc:
                raise ValueError(f"dataset {args.data_path} has a {have}-channel condition; the model reads "
                                 f"{cc or 'none'} (in_channels {self.config.in_channels}, out_channels "
                                 f"{self.config.out_channels})")
        self.sampler = DataParallelSampler(len(self.dataset), args.global_batch_size, args.micro_batch_size,
                                           self.dp_size, self.dp_rank, seed=args.seed)
        # Workers read (and prefetch) the sampler's micro-batches; they start with train()'s first fetch.
        self.loader = TrainingDataLoader(self.sampler, args.num_workers, self.dtype)
        self.negative_text = self.dataset.negative_text.to(self.device, self.dtype)

    def batch(self, indices: List[int]):
        """(latents [b, f, c, h, w], text [b, L, d], condition [b, f, c_y, h, w] or None) of this rank's
        micro-batch, in the training dtype on the device (the condition: a model that reads a channel
        condition, Wan2.2 I2V-A14B; `data.channel_condition`): the loader's prefetched tensors when ``train()``
        fetched this iteration (copied with ``non_blocking`` from pinned memory), else read now
        (``stage.train_step`` called directly)."""
        ready = self.loader.get(self.dataset, indices)
        if ready is None:
            fields = collate(self.dataset, indices, self.dtype, self.device)
        else:
            fields = tuple(t.to(self.device, non_blocking=True) for t in ready)
        return fields if len(fields) == 3 else (*fields, None)

    def generator(self, *parts, device=None) -> torch.Generator:
        """A generator seeded by ``derive_seed(seed, *parts)`` (on ``device``, CPU by default)."""
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(derive_seed(self.args.seed, *parts))
        return g

    def global_offset(self, j: int) -> int:
        """Global-batch index of this rank's first sample in accumulation step ``j`` (the data sampler's
        order: ``j * micro * DP + dp_rank * micro``)."""
        m = self.args.micro_batch_size
        return j * m * self.dp_size + self.dp_rank * m

    def sample_generators(self, kind: str, iteration: int, j: int, b: int) -> List[torch.Generator]:
        """One generator per sample of this rank's micro-batch ``j``, seeded by (kind, iteration, the
        sample's global-batch index): the draws of a sample do not depend on the batch layout."""
        off = self.global_offset(j)
        return [self.generator(kind, iteration, "sample", off + k, device=self.device) for k in range(b)]

    # ------------------------------------------------------------------------------------------
    def named_trainable(self, predicate) -> Dict[str, torch.nn.Parameter]:
        """canonical key -> parameter for the model parameters selected by ``predicate(name)``."""
        return {canonical_key(n): p for n, p in self.model.named_parameters() if predicate(n)}

    def finalize_and_step(self, group: ParamGroup, iteration: int, losses: Optional[Dict[str, torch.Tensor]] = None,
                          per_sample: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, float]:
        """Reduce gradients (SP over TP, sum over CP, mean over DP), clip, AdamW step, EMA update.

        ``losses``: group name -> the iteration's DP-reduced loss (0-d tensor): with the gradient norm it
        decides whether the step is taken (`training.nan_guard`). ``per_sample``: dataset index -> this
        rank's per-sample loss, to name the bad samples when a step is skipped.
        """
        return self.finalize_and_step_groups([group], iteration, losses, per_sample)

    def finalize_and_step_groups(self, groups: List[ParamGroup], iteration: int,
                                 losses: Optional[Dict[str, torch.Tensor]] = None,
                                 per_sample: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, float]:
        """One gradient reduction for all ``groups`` (their grads are disjoint), then each group's step."""
        if self.experts:
            # Two experts: a micro-batch may route no sample to one expert (the DMD / critic times are drawn per
            # sample), leaving its adapter without a gradient on this rank only. Its gradient of the mean loss
            # is then zero, and it is made so on every layout: the DP all-reduce sees one flat buffer of the same
            # tensors on every rank, and one process steps exactly as DP ranks do.
            for g in groups:
                for p in g.params.values():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
        finalize_model_grads(self.model)
        metrics = {}
        for g in groups:
            metrics.update(self._step_group(g, iteration, (losses or {}).get(g.name), per_sample))
        return metrics

    def _step_group(self, group: ParamGroup, iteration: int, loss: Optional[torch.Tensor] = None,
                    per_sample: Optional[Dict[int, torch.Tensor]] = None) -> Dict[str, float]:
        params = list(group.params.values())
        fam = family_norms(group.params, group.name)  # gradients before clipping (diagnostics, issue #17)
        norm = clip_gradients(params, self.args.clip_grad)
        lr = lr_at(iteration, group.lr, self.args.min_lr, self.args.lr_warmup_iters, self.args.train_iters,
                   self.args.lr_decay_style)
        checked = (norm,) if loss is None else (norm, loss)
        # Loss and norm are reduced over DP (and the norm over TP): every rank takes the same decision.
        if not NonFiniteGuard.is_finite(*checked):
            bad = gather_bad_samples(per_sample or {}, self.dp_group)
            self.guard.skip(iteration, group.name, float("nan") if loss is None else float(loss), float(norm), bad)
            group.zero_grad()
            return {f"{group.name}/grad_norm": float(norm), f"{group.name}/lr": lr, f"{group.name}/skipped": 1.0}
        for pg in group.optimizer.param_groups:
            pg["lr"] = lr
        group.optimizer.step()
        group.zero_grad()
        group.steps += 1
        group.ema.update(iteration)
        # LoRA-B norms after the step; one host transfer for all the family norms.
        fam.update({k: v for k, v in family_norms(group.params, group.name).items() if "/B_" in k})
        fam_vals = torch.stack(list(fam.values())).tolist() if fam else []
        return {f"{group.name}/grad_norm": float(norm), f"{group.name}/lr": lr, **dict(zip(fam, fam_vals))}

    def reduce_metrics(self, *accs) -> Dict[str, torch.Tensor]:
        """One all-reduce (on the training device) of the accumulators' metrics over the DP group:
        means are averaged, counts summed; maxima (``acc.maxes``, if any) take a second, MAX all-reduce.
        Returns 0-d float64 device tensors (no host sync)."""
        entries = [(k, v, True) for acc in accs for k, v in acc.means.items()]
        entries += [(k, v, False) for acc in accs for k, v in acc.sums.items()]
        names = [k for k, _, _ in entries]
        vals = [v for _, v, _ in entries]
        is_mean = [m for _, _, m in entries]
        maxes = [(k, v) for acc in accs for k, v in getattr(acc, "maxes", {}).items()]
        out = {}
        if vals:
            flat = torch.stack([v.to(device=self.device, dtype=torch.float64) for v in vals])
            if self.dp_size > 1:
                dist.all_reduce(flat, group=self.dp_group)
                flat = torch.where(torch.tensor(is_mean, device=self.device), flat / self.dp_size, flat)
            out.update(zip(names, flat.unbind()))
        if maxes:
            flat = torch.stack([v.to(device=self.device, dtype=torch.float64) for _, v in maxes])
            if self.dp_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.dp_group)
            out.update(zip([k for k, _ in maxes], flat.unbind()))
        return out

    # ------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        """Train from the current iteration to ``--train-iters`` (or ``--exit-after-iters`` more); returns the
        last iteration's metrics. On any exception the data-loader workers are stopped before it propagates
        (no worker outlives a failed run).

        Raises:
            NonFiniteTrainingError: ``--max-skipped-iters`` consecutive non-finite iterations, or non-finite
                state at a save.
        """
        try:
            return self._train()
        except BaseException:
            self.loader.close()
            raise

    def _train(self) -> Dict[str, float]:
        args = self.args
        start_iter = self.iteration
        stop = args.train_iters
        if args.exit_after_iters is not None:
            stop = min(stop, start_iter + args.exit_after_iters)
        self._log(f"training {args.stage}: iterations {start_iter} -> {stop} of {args.train_iters}, global batch "
                  f"{args.global_batch_size} (micro {args.micro_batch_size} x DP {self.dp_size} x "
                  f"{self.sampler.num_micro} accumulation), TP {args.tensor_model_parallel_size}, "
                  f"CP {args.context_parallel_size}, device {self.device}, "
                  f"trainable {sum(p.numel() for g in self.groups.values() for p in g.params.values()) / 1e6:.2f}M")
        t0 = time.time()
        t_log, it_log = t0, start_iter
        last = {}
        save_pending = skipped = False
        while self.iteration < stop:
            micro = self.loader.next_iteration(self.dataset, self.consumed_samples, stop - self.iteration)
            metrics = {k: float(v) for k, v in self.stage.train_step(self.iteration, micro).items()}  # one sync
            skipped = self.guard.end_iteration(self.iteration)  # raises after --max-skipped-iters in a row
            self.iteration += 1
            self.consumed_samples += args.global_batch_size
            last = metrics
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(k, v, self.iteration)
            if self.iteration % args.log_interval == 0 or self.iteration == stop:
                now = time.time()
                rate = (self.iteration - it_log) * args.global_batch_size / max(now - t_log, 1e-9)
                eta = (stop - self.iteration) * (now - t0) / max(self.iteration - start_iter, 1)
                shown = " | ".join(_fmt_metric(k, v) for k, v in metrics.items())
                self._log(f" iteration {self.iteration:>7d}/{args.train_iters} | {shown} | samples/s {rate:.2f} | "
                          f"elapsed {_fmt_time(now - t0)} | ETA {_fmt_time(eta)}", flush=True)
                t_log, it_log = now, self.iteration
            if args.save and args.save_interval and self.iteration % args.save_interval == 0 and self.iteration < stop:
                save_pending = True
            # A save falling inside a streak of skipped (non-finite) iterations waits for the next good
            # iteration: the state that just produced NaN is not what a resume should start from.
            if save_pending and not skipped:
                self.save(args.save)
                save_pending = False
            elif save_pending:
                self._log(f"iteration {self.iteration} was skipped (non-finite): checkpoint deferred", flush=True)
        if args.save:
            if skipped:
                self._log(f"warning: the last iteration ({self.iteration}) was skipped (non-finite loss or gradient "
                          "norm); saving the state from before it", flush=True)
            self.save(args.save)
        if self.writer is not None:
            self.writer.flush()
        ran = self.iteration - start_iter
        self.skipped_iters = self.guard.total
        self._log(f"training {args.stage} finished: iterations {start_iter} -> {self.iteration}, {self.skipped_iters} of "
                  f"{ran} optimizer step(s) skipped (non-finite loss or gradient norm), {_fmt_time(time.time() - t0)}",
                  flush=True)
        return last

    # ------------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"tp": self.args.tensor_model_parallel_size, "cp": self.args.context_parallel_size,
                "dp": self.dp_size, "sequence_parallel": bool(self.args.sequence_parallel)}

    def _sharded_state(self) -> dict:
        sd = {}
        base_recoverable = self.pretrained_dir is not None
        model_sd = module_sharded_state_dict(self.model)
        trainable = {k for g in self.groups.values() for k in g.params}
        for k, v in model_sd.items():
            if k in trainable or not base_recoverable:
                sd[k] = v
        for g in self.groups.values():
            sd.update(g.ema.sharded_state(f"ema.{g.name}"))
            sd.update(optimizer_sharded_state(g.optimizer, {p: k for k, p in g.params.items()}, f"optimizer.{g.name}"))
        return sd

    def _trainable_state(self):
        """(name, tensor) of what a save writes that training changes: weights, EMA, optimizer moments."""
        for gname, g in self.groups.items():
            for k, p in g.params.items():
                yield k, p.detach()
                yield f"ema.{gname}.{k}", g.ema.shadow[k]
                st = g.optimizer.state[p]
                yield f"optimizer.{gname}.{k}.exp_avg", st["exp_avg"]
                yield f"optimizer.{gname}.{k}.exp_avg_sq", st["exp_avg_sq"]

    def save(self, root: str, before_commit=None) -> str:
        """Write a checkpoint of this iteration under ``root`` (crash-safe, see `checkpoint.store`).

        Raises:
            NonFiniteTrainingError: a trainable weight, EMA shadow or optimizer moment holds NaN / inf
                (nothing is written; the previous checkpoint stays the newest).
        """
        args = self.args
        check_finite_state(self._trainable_state(), f"checkpoint iteration {self.iteration} under {root}")
        meta = {"format": "megatron_anyflow", "stage": args.stage, "iteration": self.iteration,
                "consumed_samples": self.consumed_samples, "wan_config": self.arch,
                "pretrained": os.path.abspath(self.pretrained_dir) if self.pretrained_dir else None,
                # two-expert stage 2: each expert's base (None: the preset's random init, saved here under high. / low.)
                **({"experts": self.experts, "boundary_ratio": self.model.boundary} if self.experts else {}),
                "lora": self.stage.lora_meta(), "layout": self._layout(),
                "groups": {n: {"optimizer_steps": optimizer_steps(g.optimizer), "steps": g.steps,
                               # per tensor: AdamW skips a tensor without gradient (FAR's far_patch_embedding
                               # when no chunk is compressed), so its bias-correction step can lag the group's
                               "param_steps": {k: float(g.optimizer.state[p]["step"]) for k, p in g.params.items()
                                               if "step" in g.optimizer.state[p]}}
                           for n, g in self.groups.items()},
                "args": {k: v for k, v in vars(args).items()}}
        rank_state = {"torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        d = ckpt.save_checkpoint(root, self.iteration, self._sharded_state(), meta, rank_state, before_commit)
        self._log(f"saved checkpoint {d}", flush=True)
        return d

    def _checkpoint_bytes(self) -> int:
        """Estimated size of one checkpoint (all ranks): the saved weights (trainable, or all without a
        --pretrained base), EMA and AdamW moments, times the TP size (this rank holds 1/TP of each)."""
        n = sum(t.numel() * t.element_size() for _, t in self._trainable_state())
        if self.pretrained_dir is None:
            trainable = {id(p) for g in self.groups.values() for p in g.params.values()}
            n += sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in trainable)
        return int(n * self.args.tensor_model_parallel_size * 1.02) + (1 << 20)

    def _run_identity(self) -> dict:
        return ckpt.run_identity(self.args.stage, self.arch, self.args.model_preset, self.args.pretrained,
                                 self.stage.lora_meta())

    def load(self, root: str) -> None:
        """Resume from the last complete checkpoint under ``root`` (must be the same stage, model kind and
        architecture, preset and LoRA configuration: `checkpoint.store.check_resume_compatible`).

        Raises:
            CheckpointError: nothing complete to resume from (checksums included), or a checkpoint of
                another configuration (`ResumeMismatchError`, one line naming the field).
        """
        # Rank 0 picks (and hashes) the checkpoint; every rank resumes from its choice.
        d = ckpt.resume_checkpoint_collective(root, warn=lambda msg: self._log(f"warning: {msg}", flush=True))
        if d is None:
            self._log(f"no checkpoint under {root} (first launch): starting from scratch")
            return
        ckpt.note_unverified(d, log=lambda m: self._log(m, flush=True))
        meta = ckpt.read_meta(d)
        ckpt.check_resume_compatible(root, d, meta, self._run_identity())
        if bool(meta.get("experts")) != bool(self.experts):
            raise ckpt.ResumeMismatchError(
                f"--load {root}: {d} is {'a two-expert' if meta.get('experts') else 'a one-model'} stage-2 checkpoint, "
                f"this run trains {'two experts' if self.experts else 'one model'}; resume with its settings")
        if meta.get("layout") != self._layout():
            self._log(f"warning: resuming layout {self._layout()} from {meta.get('layout')}: weights and optimiser "
                      "state are resharded, but the continuation is not bit-exact")
        loaded = ckpt.load_checkpoint(d, self._sharded_state(), strict=True, verify_data=False)  # verified above
        load_module_state(self.model, loaded)
        for name, g in self.groups.items():
            g.ema.load(loaded, f"ema.{name}")
            for p, k in ((p, k) for k, p in g.params.items()):
                st = g.optimizer.state[p]
                st["exp_avg"].copy_(loaded[f"optimizer.{name}.{k}.exp_avg"])
                st["exp_avg_sq"].copy_(loaded[f"optimizer.{name}.{k}.exp_avg_sq"])
            info = meta["groups"][name]
            set_optimizer_steps(g.optimizer, info["optimizer_steps"])
            for k, p in g.params.items():
                if k in info.get("param_steps", {}):
                    g.optimizer.state[p]["step"].fill_(info["param_steps"][k])
            g.steps = info["steps"]
        self.iteration = meta["iteration"]
        self.consumed_samples = meta["consumed_samples"]
        rs = ckpt.load_rank_state(d)
        if rs is not None:
            torch.set_rng_state(rs["torch_rng"])
            if rs.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rs["cuda_rng"])
        self._log(f"resumed from {d} at iteration {self.iteration} ({self.consumed_samples} samples consumed)")
