"""Measurement behind `tools/benchmark_throughput.py`: time AnyFlow training iterations of this project
and of the diffusers + PEFT reference, and credit them with model and hardware FLOPs.

The one module of `measure` above `training` (it drives the trainer and its stages); the rest of `measure`
sits below `training` (tests/test_import_layers.py).

The tool's module docstring defines every reported figure; this module holds the pieces:

* FLOPs per timed iteration: `iteration_flops` (teacher / stage 1) and `stage2_plans` +
  `measure.flops.stage2_iteration_flops` (stage 2: each iteration's own rollout draw);
* the two implementations, `OursRunner` (the trainer's own iteration, mock data or the trainer's data
  loader with workers) and `ReferenceRunner` (diffusers ``AnyFlowTransformer3DModel`` + PEFT LoRA, eager,
  gradient checkpointing whenever this project's row recomputes);
* `measure` (one row) and `markdown` (the report).

The device, its ceilings and `PeakMemory` are `measure.device`; the kernel-time breakdown `measure.profile`;
files and number formats `measure.report`.

AnyFlow-FAR rows (``--model far``: the causal model's stage 1 and stage 2, docs/design/far.md): the trainer's own FAR
iteration (`OursRunner` with ``--model far --chunk-partition``); every timed iteration is credited with its
own draws -- the teacher-forcing chunk count n and the bidirectional-branch coin of `FarStage1.iteration_plan`
(stage 2's co-training too), and stage 2's rollout plan (N, k) -- through `measure.flops.far_step_flops` /
`far_step_hardware_flops` (block-sparse attention pairs from `FarLayout`); no reference implementation.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_anyflow.measure.device import PeakMemory, _sync, _world, say
from megatron_anyflow.measure.profile import profile_categories
from megatron_anyflow.measure.report import fmt, pct

STEPS = ("teacher", "stage1", "stage2")
# "overlapped" = the pipelined schedule with the critic on a second CUDA stream (--overlap-critic): the
# same FLOPs as pipelined; its row against the pipelined row is the overlap's gain. Opt-in (not a default
# schedule), and the reference, which has no overlap, is compared through its pipelined row.
SCHEDULES = ("sequential", "pipelined", "overlapped")
DEFAULT_SCHEDULES = ("sequential", "pipelined")
IMPLS = ("megatron_anyflow", "reference")
# diffusers / PEFT names of this project's LoRA target linears (models.lora target patterns -> PEFT names)
PEFT_NAMES = {
    "blocks.*.self_attention.linear_qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
    "blocks.*.self_attention.linear_proj": ["attn1.to_out.0"],
    "blocks.*.mlp.linear_fc1": ["ffn.net.0.proj"],
    "blocks.*.mlp.linear_fc2": ["ffn.net.2"],
    "condition_embedder.time_embedder.linear_1": ["condition_embedder.time_embedder.linear_1"],
    "condition_embedder.time_embedder.linear_2": ["condition_embedder.time_embedder.linear_2"],
    "condition_embedder.delta_embedder.linear_1": ["condition_embedder.delta_embedder.linear_1"],
    "condition_embedder.delta_embedder.linear_2": ["condition_embedder.delta_embedder.linear_2"],
}


def lora_targets(step: str) -> Tuple[str, ...]:
    """This project's LoRA targets of a step's adapters: `TEACHER_TARGETS` (attention q/k/v/o and FFN) for
    the teacher, `DEFAULT_TARGETS` (also the time and delta embedders) for stages 1 and 2."""
    from megatron_anyflow.models import lora as L

    return tuple(L.TEACHER_TARGETS if step == "teacher" else L.DEFAULT_TARGETS)


def peft_targets(step: str) -> List[str]:
    """The PEFT ``target_modules`` of the reference for a step: the same linears as `lora_targets`.

    Raises:
        KeyError: a target pattern without a known diffusers name (add it to `PEFT_NAMES`).
    """
    return [n for t in lora_targets(step) for n in PEFT_NAMES[t]]


# ------------------------------------------------------------------------------------------------
# model FLOPs
# ------------------------------------------------------------------------------------------------
def arch_config(preset: str, num_layers: Optional[int]):
    from megatron_anyflow.models.wan.config import wan_config

    return wan_config(preset, **({"num_layers": num_layers} if num_layers else {}))


def is_far(a) -> bool:
    return getattr(a, "model", "bidirectional") == "far"


def far_chunk_partition(a) -> Tuple[int, ...]:
    """The FAR rows' chunk partition: ``--chunk-partition``, or the recipe's (1, 3, 3, 3, 3, 3, 3, 2) cut to the
    latent frames (whole chunks while they fit, the last one shortened)."""
    if getattr(a, "chunk_partition", None):
        return tuple(int(c) for c in a.chunk_partition)
    from megatron_anyflow.models.wan.config import WanConfig

    out, left = [], a.latent[0]
    for c in WanConfig.__dataclass_fields__["chunk_partition"].default:
        if left <= 0:
            break
        out.append(min(c, left))
        left -= out[-1]
    return tuple(out)


def far_config(a):
    """The FAR model config of the rows (the preset with ``far`` on and the rows' chunk partition)."""
    from megatron_anyflow.models.wan.config import wan_config

    return wan_config(a.preset, far=True, chunk_partition=far_chunk_partition(a),
                      **({"num_layers": a.num_layers} if a.num_layers else {}))


def far_plans(a, step: str, iterations) -> List[Dict[str, object]]:
    """What each FAR iteration draws, from the trainer's seeds: ``n`` and ``bidirectional`` (the stage-1
    loss's teacher-forcing chunk count and bidirectional-branch coin: `stages.FarStage1.iteration_plan`
    itself, with the trainer's arguments for this row) and, in stage 2, the rollout plan ``N``, ``k``."""
    from types import SimpleNamespace

    from megatron_anyflow.training.arguments import parse_args as trainer_parse_args
    from megatron_anyflow.training.stages import FarStage1
    from megatron_anyflow.training.trainer import derive_seed

    targs = trainer_parse_args(trainer_argv(a, step, "sequential" if step == "stage2" else None, 64))

    def generator(*parts):
        return torch.Generator().manual_seed(derive_seed(a.seed, *parts))

    stage = SimpleNamespace(t=SimpleNamespace(generator=generator), args=targs, chunk_partition=far_chunk_partition(a))
    iterations = list(iterations)
    rollout = stage2_plans(a, iterations) if step == "stage2" else [(None, None)] * len(iterations)
    out = []
    for it, (N, k) in zip(iterations, rollout):
        n, bi = FarStage1.iteration_plan(stage, it)
        out.append({"n": n, "bidirectional": bi, "N": N, "k": k, "guidance": targs.guidance})
    return out


def far_iteration_flops(a, step: str, schedule: Optional[str], cotrain: bool, iterations) -> Dict[str, object]:
    """Model and hardware FLOPs per sample of the FAR rows' ``iterations`` (each its own draws, `far_plans`):
    ``flops_per_sample`` is the mean over them, ``per_iteration`` lists them; forward-equivalents are in
    bidirectional forwards of the whole clip."""
    from megatron_anyflow.measure.flops import far_step_flops, far_step_hardware_flops, rollout_segments

    cfg = far_config(a)
    F, H, W = a.latent
    plans = far_plans(a, step, iterations)
    hw_kw = dict(lora_rank=a.lora_rank, lora_targets=lora_targets(step), merged_nograd=merged_nograd(a, step),
                 attention="math" if a.attention_impl == "math" else "flash",
                 pad_to=a.context_parallel_size * (a.tensor_model_parallel_size if a.sequence_parallel else 1))
    per, eqs = [], []
    for p in plans:
        kw = dict(num_chunks=p["n"], bidirectional=p["bidirectional"], guidance=p["guidance"])
        if step == "stage1":
            m = far_step_flops(cfg, "stage1", H, W, a.text_len, **kw)
            hw = far_step_hardware_flops(cfg, "stage1", H, W, a.text_len, **kw, **hw_kw).total
            per.append((m.flops_per_sample, hw))
            eqs.append(m.forward_equivalents)
            continue
        seg = rollout_segments(p["N"], p["k"])
        crit = seg if schedule == "sequential" else 0
        g = far_step_flops(cfg, "stage2_generator", H, W, a.text_len, rollout_grad_segments=seg, cotrain=cotrain, **kw)
        c = far_step_flops(cfg, "stage2_critic", H, W, a.text_len, rollout_segments=crit)
        hw = far_step_hardware_flops(cfg, "stage2", H, W, a.text_len, rollout_grad_segments=seg, rollout_segments=crit,
                                     cotrain=cotrain, **kw, **hw_kw).total
        per.append((g.flops_per_sample + c.flops_per_sample, hw))
        eqs.append(g.forward_equivalents + c.forward_equivalents)
    out = {"model": "far", "chunk_partition": list(cfg.chunk_partition),
           "flops_per_sample": statistics.mean(m for m, _ in per),
           "hardware_flops_per_sample": statistics.mean(h for _, h in per),
           "forward_equivalents": statistics.mean(eqs), "far_plans": plans,
           "per_iteration": [{"model_flops_per_sample": m, "hardware_flops_per_sample": h} for m, h in per]}
    if step == "stage2":
        out.update(plans=[[p["N"], p["k"]] for p in plans], rollout_segments=[rollout_segments(p["N"], p["k"])
                                                                             for p in plans])
    return out


def iteration_flops(a, cfg, step: str, schedule: Optional[str], cotrain: bool = True,
                    plans: Optional[Sequence[Tuple[int, int]]] = None, iterations=None) -> Dict[str, object]:
    """Model and hardware FLOPs per sample of the timed iterations of one row.

    Teacher / stage 1: the same every iteration (`step_flops`, `step_hardware_flops`). Stage 2: each
    iteration's own rollout draw ``plans`` [(N, k)] (`stage2_plans`; the trainer's and the reference's
    seeds), credited iteration by iteration (`stage2_iteration_flops`); ``flops_per_sample`` is then the
    mean over the iterations and ``per_iteration`` lists them. Hardware FLOPs assume fused attention
    (backward 2.5x forward) unless ``--attention-impl math``, and LoRA GEMMs in the no-grad forwards
    only where the trainer runs them unmerged (`merged_nograd`); the merges themselves (weight-sized
    GEMMs, < 0.3 % of a 1.3B step) are not counted.

    FAR rows (``a.model == "far"``): `far_iteration_flops` of ``iterations`` (default: the first ``a.iters``
    after the warm-up), every iteration credited with its own draws.
    """
    if is_far(a):
        its = iterations if iterations is not None else range(a.warmup, a.warmup + a.iters)
        return far_iteration_flops(a, step, schedule, cotrain, its)
    from megatron_anyflow.measure.flops import (expected_segments, rollout_segments, stage2_iteration_flops,
                                                 step_flops, step_hardware_flops)

    F, H, W = a.latent
    shape = (cfg, F, H, W, a.text_len)
    hw_kw = dict(lora_rank=a.lora_rank, lora_targets=lora_targets(step),
                 attention="math" if a.attention_impl == "math" else "flash", merged_nograd=merged_nograd(a, step))
    if step in ("teacher", "stage1"):
        m = step_flops(*shape[:1], step, *shape[1:])
        hw = step_hardware_flops(*shape[:1], step, *shape[1:], **hw_kw).total
        return {"flops_per_sample": m.flops_per_sample, "hardware_flops_per_sample": hw,
                "forward_equivalents": m.forward_equivalents}
    e = expected_segments(a.simulation_steps)
    out = {"expected_segments": e}
    if plans is None:  # before measuring: the expectation, for the plan printout
        gen = step_flops(*shape[:1], "stage2_generator", *shape[1:], rollout_grad_segments=e, cotrain=cotrain)
        crit = step_flops(*shape[:1], "stage2_critic", *shape[1:], rollout_segments=e if schedule == "sequential" else 0)
        out.update(flops_per_sample=gen.flops_per_sample + crit.flops_per_sample,
                   forward_equivalents=gen.forward_equivalents + crit.forward_equivalents)
        return out
    per = stage2_iteration_flops(cfg, plans, F, H, W, a.text_len, schedule=schedule, cotrain=cotrain, **hw_kw)
    segs = [rollout_segments(N, k) for N, k in plans]
    f1 = step_flops(*shape[:1], "teacher", *shape[1:]).flops_per_sample / 3  # one forward
    out.update(flops_per_sample=statistics.mean(m for m, _ in per),
               hardware_flops_per_sample=statistics.mean(h for _, h in per),
               forward_equivalents=statistics.mean(m for m, _ in per) / f1,
               plans=[list(p) for p in plans], rollout_segments=segs,
               per_iteration=[{"model_flops_per_sample": m, "hardware_flops_per_sample": h} for m, h in per])
    return out


def merged_nograd(a, step: str = "stage1") -> bool:
    """Whether the trainer's no-grad forwards run merged ``W + s B A`` (no LoRA GEMMs): its
    ``--lora-nograd-merge`` as this run passes it (or the trainer's default), never under FP8."""
    from megatron_anyflow.training.arguments import parse_args as trainer_parse_args

    targs = trainer_parse_args(trainer_argv(a, step, "sequential" if step == "stage2" else None, 64))
    return getattr(targs, "lora_nograd_merge", "off") != "off" and not targs.fp8_format


# ------------------------------------------------------------------------------------------------
# the two implementations
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preset_with_layers(preset: str, num_layers: Optional[int]):
    """The preset name to give the trainer; with ``num_layers`` a temporary preset (this process only)."""
    if not num_layers:
        yield preset
        return
    from megatron_anyflow.models.wan import config as C

    name = f"{preset}@{num_layers}layers"
    C.PRESETS[name] = dict(C.PRESETS[preset], num_layers=num_layers)
    try:
        yield name
    finally:
        C.PRESETS.pop(name, None)


def trainer_argv(a, step: str, schedule: Optional[str], num_samples: int) -> List[str]:
    F, H, W = a.latent
    C = arch_config(a.preset, a.num_layers).in_channels
    data = (["--data-path", a.data_path] if a.data_path else
            ["--mock-data", "--mock-latent-shape", str(F), str(C), str(H), str(W), "--mock-text-len", str(a.text_len),
             "--mock-num-samples", str(num_samples)])
    argv = ["--stage", step, "--model-preset", a.preset, *data, "--micro-batch-size", str(a.micro_batch_size), "--train-iters", "1000000", "--log-interval", "1000000",
            "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha), "--seed", str(a.seed),
            "--recompute-granularity", a.recompute_granularity, "--backend", a.backend,
            "--attention-impl", a.attention_impl, "--kernel-backend", a.kernel_backend,
            "--tensor-model-parallel-size", str(a.tensor_model_parallel_size),
            "--context-parallel-size", str(a.context_parallel_size),
            "--simulation-steps", *map(str, a.simulation_steps)]
    if schedule == "overlapped":
        argv += ["--schedule", "pipelined", "--overlap-critic"]
    elif schedule:
        argv += ["--schedule", schedule]
    if a.bf16:
        argv.append("--bf16")
    if a.sequence_parallel:
        argv.append("--sequence-parallel")
    if a.fp8_format:
        argv += ["--fp8-format", a.fp8_format]
    if a.compile:
        argv.append("--compile")
    if a.num_workers is not None:
        argv += ["--num-workers", str(a.num_workers)]
    if is_far(a):
        argv += ["--model", "far", "--chunk-partition", *map(str, far_chunk_partition(a))]
    argv += list(getattr(a, "trainer_extra", []))  # options this tool does not know: the trainer's
    return argv


class OursRunner:
    """megatron_anyflow: the trainer's own iteration."""

    def __init__(self, a, step, schedule, num_samples):
        from megatron_anyflow.training.arguments import parse_args as trainer_parse_args
        from megatron_anyflow.training.trainer import Trainer

        with preset_with_layers(a.preset, a.num_layers) as name:
            targs = trainer_parse_args(trainer_argv(a, step, schedule, num_samples))
            targs.model_preset = name
            self.trainer = Trainer(targs, log=lambda *x, **k: None)
        self.global_batch = targs.global_batch_size
        self.world = _world()
        self.cotrain = not targs.no_cotrain_stage1
        self.real_data = bool(a.data_path)
        self.total_iters = a.warmup + a.iters

    def step(self, it: int) -> None:
        t = self.trainer
        if self.real_data:  # the training loop's own fetch: workers prefetch the next iteration meanwhile
            micro = t.loader.next_iteration(t.dataset, it * self.global_batch, self.total_iters - it)
        else:
            micro = t.sampler.micro_batches(it * self.global_batch)
        t.stage.train_step(it, micro)

    def close(self):
        if self.trainer is not None:
            self.trainer.loader.close()
        self.trainer = None


def diffusers_transformer(cfg, device, dtype: torch.dtype = torch.float32, seed: Optional[int] = None):
    """diffusers' transformer of ``cfg``'s architecture with random weights: ``AnyFlowFARTransformer3DModel``
    when ``cfg.far``, else ``AnyFlowTransformer3DModel`` (config from `convert.hf_config_from_arch`).

    Built directly on ``device`` in ``dtype`` (a 14B fp32 copy would not fit next to a bf16 one), from torch's
    global RNG (``seed``: `torch.manual_seed` first). In bf16, diffusers' ``_keep_in_fp32_modules`` are cast
    back to fp32, as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads them. Returns it in eval mode.
    """
    import diffusers

    from megatron_anyflow.models.wan.convert import hf_config_from_arch

    kw = hf_config_from_arch(dict(cfg.arch_dict(), delta_embedder=True))
    cls = getattr(diffusers, kw.pop("_class_name"))
    if seed is not None:
        torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            hf = cls(**kw)
    finally:
        torch.set_default_dtype(old)
    if dtype != torch.float32:
        keep = set(getattr(hf, "_keep_in_fp32_modules", None) or [])
        for n, p in hf.named_parameters():
            if keep.intersection(n.split(".")):
                p.data = p.data.float()
    return hf.eval()


class ReferenceRunner:
    """The reference way: diffusers AnyFlowTransformer3DModel + PEFT LoRA, eager, SDPA, one GPU.

    Mirrors one iteration of `training.stages` / `training.stage2` with one micro-batch: the same loss
    functions, data, seeds, number of forwards and backwards, optimiser steps (AdamW per adapter, clip,
    EMA).
    """

    def __init__(self, a, step, schedule, num_samples):
        try:
            from peft import LoraConfig
        except ImportError as e:  # not a dependency of megatron_anyflow
            raise ImportError("the reference path needs the `peft` library (pip install peft), or run with "
                              "--no-reference") from e
        from megatron_anyflow.anyflow.objective import TeacherObjectiveConfig
        from megatron_anyflow.data.latent_dataset import DataParallelSampler, MockLatentDataset
        from megatron_anyflow.training.arguments import parse_args as trainer_parse_args
        from megatron_anyflow.training.stage2 import distill_config
        from megatron_anyflow.training.stages import flow_map_objective_config

        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        args = trainer_parse_args(trainer_argv(a, step, schedule, num_samples))  # the same hyper-parameters
        self.args, self.step_name, self.schedule = args, step, schedule
        self.bf16 = bool(a.bf16)
        self.dtype = torch.bfloat16 if a.bf16 else torch.float32
        self.world = 1
        self.global_batch = a.micro_batch_size
        cfg = arch_config(a.preset, a.num_layers)
        hf = diffusers_transformer(cfg, self.device, self.dtype, seed=a.seed)
        hf.requires_grad_(False)
        hf.train()
        # recomputation on both sides or neither: diffusers' per-block checkpointing when this project's
        # row recomputes (any --recompute-granularity but none)
        self.checkpointing = a.recompute_granularity != "none"
        if self.checkpointing:
            hf.enable_gradient_checkpointing()
        self.adapters = ["generator", "fake_score"] if step == "stage2" else (["teacher"] if step == "teacher" else ["generator"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about a second adapter on one model: intended
            for name in self.adapters:
                hf.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, target_modules=peft_targets(step),
                                          init_lora_weights=True), adapter_name=name)
        self.hf = hf
        self.params = {name: [p for n, p in hf.named_parameters() if f".{name}." in n] for name in self.adapters}
        lr = {"fake_score": args.critic_lr}
        self.opt = {name: torch.optim.AdamW(ps, lr=lr.get(name, args.lr), betas=(args.adam_beta1, args.adam_beta2),
                                            eps=args.adam_eps, weight_decay=args.weight_decay)
                    for name, ps in self.params.items()}
        self.ema = {name: [p.detach().float().clone() for p in ps] for name, ps in self.params.items()}
        self._activate(self.adapters[0])

        if a.data_path:
            from megatron_anyflow.data.latent_dataset import LatentDataset

            self.dataset = LatentDataset(a.data_path)
        else:
            self.dataset = MockLatentDataset(args.mock_num_samples, args.mock_latent_shape, args.mock_text_len,
                                             cfg.text_dim, seed=args.seed)
        self.sampler = DataParallelSampler(len(self.dataset), self.global_batch, self.global_batch, 1, 0, seed=args.seed)
        self.loader, self.total_iters = None, a.warmup + a.iters
        if a.data_path:  # the same loader (workers, pinned memory, prefetch) as this project's row
            from megatron_anyflow.data.loader import TrainingDataLoader

            self.loader = TrainingDataLoader(self.sampler, args.num_workers, self.dtype)
        self.negative_text = self.dataset.negative_text.to(self.device, self.dtype)
        self.s1cfg = flow_map_objective_config(args)  # the trainer's stage-1 objective settings ...
        self.s1cfg.kernel_backend = "torch"  # ... without fused kernels
        self.tcfg = TeacherObjectiveConfig(shift=args.time_shift, text_dropout=args.text_dropout)
        self.dcfg = distill_config(args)
        self.cotrain = self.dcfg.cotrain_stage1

    # -- helpers ---------------------------------------------------------------------------------
    def _activate(self, adapter: Optional[str]) -> None:
        if adapter is None:
            self.hf.disable_adapters()
        else:
            self.hf.enable_adapters()
            self.hf.set_adapter(adapter)  # PEFT: only this adapter's weights require grad

    def role(self, adapter: Optional[str]):
        hf = self.hf

        def call(z, T, R, text):
            self._activate(adapter)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return hf(z, T, R, text, return_dict=False)[0]

        return call

    def gen(self, *parts, device=None) -> torch.Generator:
        from megatron_anyflow.training.trainer import derive_seed

        g = torch.Generator(device=device or "cpu")
        g.manual_seed(derive_seed(self.args.seed, *parts))
        return g

    @torch.no_grad()
    def _ema(self, name: str, iteration: int) -> None:
        d = self.args.ema_decay if iteration >= self.args.ema_start_iter else 0.0
        for s, p in zip(self.ema[name], self.params[name]):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def _update(self, name: str, iteration: int) -> float:
        ps = self.params[name]
        norm = torch.nn.utils.clip_grad_norm_([p for p in ps if p.grad is not None], self.args.clip_grad)
        self.opt[name].step()
        self.opt[name].zero_grad(set_to_none=True)
        self._ema(name, iteration)
        return float(norm)

    # -- one iteration ---------------------------------------------------------------------------
    def step(self, it: int) -> None:
        from megatron_anyflow.anyflow.distill import backward_simulation, critic_loss, generator_loss, sample_simulation_plan
        from megatron_anyflow.anyflow.objective import flow_matching_loss
        from megatron_anyflow.data.latent_dataset import collate

        j, dev = 0, self.device
        if self.loader is not None:
            (idx,) = self.loader.next_iteration(self.dataset, it * self.global_batch, self.total_iters - it)
            x, text = (v.to(dev, non_blocking=True) for v in self.loader.get(self.dataset, idx))
        else:
            (idx,) = self.sampler.micro_batches(it * self.global_batch)
            x, text = collate(self.dataset, idx, self.dtype, dev)
        if self.step_name == "teacher":
            loss, _ = flow_matching_loss(self.role("teacher"), x, text, self.negative_text, self.tcfg,
                                         noise_generator=self.gen("noise", it, j, 0, device=dev))
            loss.backward()
            self._update("teacher", it)
            float(loss.detach())
            return
        if self.step_name == "stage1":
            loss, _ = self._stage1(it, j, x, text)
            loss.backward()
            self._update("generator", it)
            float(loss.detach())
            return
        # stage 2 (training.stage2.Stage2.train_step with one micro-batch)
        plan = sample_simulation_plan(self.gen("plan", it, j), self.dcfg)
        noise = torch.randn(x.shape, generator=self.gen("rollout-noise", it, j, 0, device=dev), device=dev, dtype=x.dtype)
        s1 = self._stage1(it, j, x, text)[0] if self.dcfg.cotrain_stage1 else None
        neg = self.negative_text.expand(x.shape[0], -1, -1)
        loss, info = generator_loss(self.role("generator"), self.role(None), self.role("fake_score"), noise, text, neg,
                                    plan, self.dcfg, tau_generator=self.gen("tau", it, j, 0, device=dev),
                                    rollout_generator=self.gen("rollout", it, j, 0, device=dev), stage1=s1)
        self._activate("generator")
        loss.backward()
        if self.schedule in ("pipelined", "overlapped"):
            lc, _ = critic_loss(self.role("fake_score"), info["x0"], text, self.gen("critic", it, j, 0, device=dev),
                                self.dcfg)
            self._activate("fake_score")
            lc.backward()
            self._update("generator", it)
            self._update("fake_score", it)
        else:
            self._update("generator", it)
            with torch.no_grad():
                x0, _ = backward_simulation(self.role("generator"), noise, text, plan, self.dcfg,
                                            generator=self.gen("rollout", it, j, 0, device=dev))
            lc, _ = critic_loss(self.role("fake_score"), x0, text, self.gen("critic", it, j, 0, device=dev), self.dcfg)
            self._activate("fake_score")
            lc.backward()
            self._update("fake_score", it)
        self._activate("generator")
        float(loss.detach()), float(lc.detach())  # the trainer's logged metrics sync the same way

    def _stage1(self, it, j, x, text):
        from megatron_anyflow.anyflow.objective import stage1_loss

        mbs = x.shape[0]
        return stage1_loss(self.role("generator"), x, text, self.negative_text, self.s1cfg,
                           time_generator=self.gen("time", it, j),
                           noise_generator=self.gen("noise", it, j, 0, device=self.device),
                           global_batch=mbs, global_offset=0, dp_group=None)

    def close(self):
        if self.loader is not None:
            self.loader.close()
        self.hf = self.opt = self.params = self.ema = None


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def stage2_plans(a, iterations) -> List[Tuple[int, int]]:
    """The rollout plans (N, k) the stage-2 iterations ``iterations`` draw: the trainer's plan seed
    ``derive_seed(seed, "plan", iteration, 0)`` (micro-batch 0), which the reference uses too."""
    from megatron_anyflow.anyflow.distill import DistillConfig, sample_simulation_plan
    from megatron_anyflow.training.trainer import derive_seed

    dcfg = DistillConfig(num_steps_choices=tuple(a.simulation_steps))
    plans = []
    for it in iterations:
        p = sample_simulation_plan(torch.Generator().manual_seed(derive_seed(a.seed, "plan", it, 0)), dcfg)
        plans.append((p.N, p.k))
    return plans


def _max_over_ranks(values: List[float]) -> List[float]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(a, impl: str, step: str, schedule: Optional[str], matmul: Dict, cotrain: bool = True) -> Dict:
    """Build one implementation, warm up, time ``a.iters`` iterations, and fill one result row (FLOPs of
    the timed iterations: `iteration_flops` with their own stage-2 draws)."""
    label = f"{'FAR ' if is_far(a) else ''}{step}{'/' + schedule if schedule else ''} [{impl}]"
    row = {"step": step, "schedule": schedule, "implementation": impl, "model": getattr(a, "model", "bidirectional")}
    mem = PeakMemory()
    mem.local = impl == "reference"  # rank 0 alone: no collective
    mem.start()
    num_samples = max(64, (a.warmup + a.iters) * a.micro_batch_size * _world())
    runner = None
    try:
        t0 = time.perf_counter()
        runner = (OursRunner if impl == "megatron_anyflow" else ReferenceRunner)(a, step, schedule, num_samples)
        _sync()
        say(f"  {label}: built in {time.perf_counter() - t0:.1f} s")
        for it in range(a.warmup):
            t0 = time.perf_counter()
            runner.step(it)
            _sync()
            say(f"  {label}: warm-up {it + 1}/{a.warmup} {time.perf_counter() - t0:.3f} s")
        times = []
        for k in range(a.iters):
            it = a.warmup + k
            _sync()
            t0 = time.perf_counter()
            runner.step(it)
            _sync()
            times.append(time.perf_counter() - t0)
            say(f"  {label}: iteration {k + 1}/{a.iters} {times[-1]:.3f} s")
        times = _max_over_ranks(times) if impl == "megatron_anyflow" else times
        peaks = mem.peaks_gib()
        if getattr(a, "profile", False) and impl == "megatron_anyflow":  # one more iteration, profiled
            try:
                row["profile"] = profile_categories(lambda: runner.step(a.warmup + a.iters))
            except Exception as e:  # noqa: BLE001 -- the timing stands without the profile
                row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
                say(f"  {label}: profile failed: {row['profile_error']}")
        if row.get("profile"):
            say(f"  {label}: profiled one iteration: " + ", ".join(
                f"{k} {v['ms']:.1f} ms ({100 * v['share']:.0f} %)" for k, v in row["profile"]["categories"].items()))
        world, gb = runner.world, runner.global_batch
    except Exception as e:  # noqa: BLE001 -- an OOM or a missing package ends this row, not the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        say(f"  {label}: FAILED: {msg}")
        row["error"] = msg
        return row
    finally:
        if runner is not None:
            runner.close()
        runner = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    from megatron_anyflow.measure.flops import mfu

    peak = (getattr(a, "datasheet", None) or {}).get("tflops")
    cfg = arch_config(a.preset, a.num_layers)
    timed = range(a.warmup, a.warmup + a.iters)
    flops = iteration_flops(a, cfg, step, schedule, cotrain, stage2_plans(a, timed) if step == "stage2" else None,
                            iterations=timed)
    # stage 2 and FAR: mean time and the mean of the iterations' own FLOPs (= sum of FLOPs / sum of times)
    varying = step == "stage2" or is_far(a)
    s_iter = statistics.mean(times) if varying else statistics.median(times)
    S = _tokens(a)
    tflops = gb * flops["flops_per_sample"] / s_iter / world / 1e12
    hw_tflops = gb * flops["hardware_flops_per_sample"] / s_iter / world / 1e12
    row.update({
        "s_per_iter": s_iter, "s_per_iter_statistic": "mean" if varying else "median",
        "iteration_times_s": times, "world_size": world, "global_batch": gb,
        "tokens_per_s_per_gpu": gb * S / s_iter / world,
        "model_flops_per_iteration": gb * flops["flops_per_sample"],
        "hardware_flops_per_iteration": gb * flops["hardware_flops_per_sample"],
        "model_tflops_per_s_per_gpu": tflops, "hardware_tflops_per_s_per_gpu": hw_tflops,
        "mfu": mfu(tflops, matmul["tflops"]), "hfu": mfu(hw_tflops, matmul["tflops"]),
        # the field's MFU: against the data-sheet peak (None on a CPU / an unknown device)
        "mfu_datasheet": mfu(tflops, peak) if peak else None,
        "hfu_datasheet": mfu(hw_tflops, peak) if peak else None,
        "peak_memory_gib": peaks["allocated"], "peak_reserved_gib": peaks["reserved"], "peak_memory_kind": mem.kind,
        "recompute": a.recompute_granularity if impl == "megatron_anyflow" else
        ("gradient_checkpointing" if a.recompute_granularity != "none" else "none"),
        "lora_targets": list(lora_targets(step)) if impl == "megatron_anyflow" else peft_targets(step),
    })
    if is_far(a):
        row["far_plans"] = flops["far_plans"]
        row["chunk_partition"] = flops["chunk_partition"]
        row["model_flops_per_iteration_each"] = [gb * f["model_flops_per_sample"] for f in flops["per_iteration"]]
    if step == "stage2":
        row["rollout_plans"] = flops["plans"]
        row["rollout_segments"] = flops["rollout_segments"]
        row["rollout_segments_measured_mean"] = statistics.mean(flops["rollout_segments"])
        row["model_flops_per_iteration_each"] = [gb * f["model_flops_per_sample"] for f in flops["per_iteration"]]
    res = f", reserved {peaks['reserved']:.3f} GiB" if peaks["reserved"] is not None else ""
    say(f"  {label}: {s_iter:.4f} s/iter, {row['tokens_per_s_per_gpu']:.1f} tokens/s/GPU, "
        f"{tflops:.4g} model / {hw_tflops:.4g} hardware TFLOP/s/GPU, peak {peaks['allocated']:.3f} GiB{res}")
    return row


def _tokens(a) -> int:
    from megatron_anyflow.measure.flops import tokens

    return tokens(arch_config(a.preset, a.num_layers), *a.latent)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def markdown(report: Dict) -> str:
    m, rows = report["meta"], report["rows"]
    cpu = m["device_kind"] == "cpu"
    far = m.get("model") == "far"
    out = [f"# AnyFlow{'-FAR' if far else ''} training throughput: {m['preset']} on {m['device']}", ""]
    if m.get("complete") is False:
        out += [f"**Partial: {len(rows)} of {m.get('rows_planned', '?')} rows** (written after each row; the run "
                "had not finished when this was written).", ""]
    if cpu:
        out += ["**Measured on the CPU (no CUDA device)**: a smoke run of the benchmark at a tiny size. The "
                "numbers say nothing about GPU training speed; MFU is against an fp32 CPU matmul (one thread "
                "unless --threads); memory is the increase of the process's peak host RSS, which depends on what "
                "earlier rows left in the process (indicative only, no memory ratio).", ""]
    F, H, W = m["latent_shape"]
    out += [f"- date {m['date']}, torch {m['torch']}, megatron-core {m['megatron_core']}, diffusers {m['diffusers']}, "
            f"peft {m['peft']}",
            f"- model `{m['preset']}`: {m['num_layers']} layers, hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, "
            f"{m['parameters_base'] / 1e6:.1f}M base parameters; LoRA rank {m['lora_rank']}, alpha {m['lora_alpha']}",
            f"- latents {F} x {H} x {W} ({m['tokens_per_sample']} tokens / sample), text {m['text_len']} tokens, "
            f"micro-batch {m['micro_batch_size']}, {'bf16' if m['bf16'] else 'fp32'}, world size {m['world_size']} "
            f"(TP {m['tp']}, CP {m['cp']}, SP {m['sequence_parallel']}), backend {m['backend']}, attention "
            f"{m['attention_impl']}, recompute {m['recompute_granularity']}, fp8 {m['fp8_format']}",
            f"- measured matmul rate: {m['matmul']['tflops']:.4g} TFLOP/s ({m['matmul']['dtype']} "
            f"{m['matmul']['n']}^3 on {m['matmul']['device']}; the denominator of MFU (matmul)); data-sheet peak: "
            + (f"{m['datasheet']['tflops']:.4g} TFLOP/s ({m['datasheet']['source']}; the denominator of MFU (data sheet), "
               "the field's convention)" if (m.get("datasheet") or {}).get("tflops") else "none (MFU (data sheet) not "
               "reported)"),
            f"- {m['iters']} timed iterations after {m['warmup']} warm-up; s/iter is "
            + ("the mean (every FAR iteration draws its chunk count n, the bidirectional coin and, in stage 2, its "
               "rollout length; each is credited with its own FLOPs)" if far else
               "the median (teacher, stage 1) or the mean (stage 2: random rollout lengths, same draws for both "
               "implementations)"), ""]
    mem_label = "peak host RSS increase (GiB)" if cpu else "peak allocated / reserved (GiB)"
    out += [f"| step | schedule | implementation | recompute | s/iter | tokens/s/GPU | model TFLOP/s/GPU | "
            f"MFU (matmul) | MFU (data sheet) | hardware TFLOP/s/GPU | {mem_label} | speed-up vs reference | "
            "memory vs reference |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['step']} | {r['schedule'] or '-'} | {r['implementation']} | | failed: {r['error']} "
                       "| | | | | | | | |")
            continue
        tf = r["model_tflops_per_s_per_gpu"]
        mem = f"{r['peak_memory_gib']:.3f}" + (f" / {r['peak_reserved_gib']:.3f}" if r.get("peak_reserved_gib")
                                                 is not None else "")
        out.append(f"| {('FAR ' if r.get('model') == 'far' else '') + r['step']} | {r['schedule'] or '-'} | "
                   f"{r['implementation']} | {r.get('recompute', '-')} | "
                   f"{r['s_per_iter']:.4g} | {r['tokens_per_s_per_gpu']:.4g} | {tf:.4g} | {fmt(100 * r['mfu'], '.2f')}% | "
                   f"{pct(r.get('mfu_datasheet'))} | "
                   f"{r['hardware_tflops_per_s_per_gpu']:.4g} | {mem} | {fmt(r.get('speedup_vs_reference'), '.2f')} | "
                   f"{fmt(r.get('memory_vs_reference'), '.2f')} |")
    out += ["", "Speed-up = tokens/s/GPU of megatron_anyflow / of the reference (same step and schedule); memory "
            "ratio likewise. tokens/s/GPU counts each sample's video tokens once per iteration.", "",
            "Model FLOPs (measure/flops.py; docs/design/anyflow.md 7), one forward of one sample, S video tokens, C text "
            "tokens, hidden h, FFN F, L layers: `L [2Sh(3h) + 4S^2h + 2Shh  +  2Shh + 4Chh + 4SCh + 2Shh  +  4ShF]` "
            "+ patch embedding, text embedding, head, time embedders. Per iteration, in forward-equivalents "
            "(a forward with grad = 3, a no-grad forward = 1). Hardware FLOPs (`flops.pass_hardware_flops`): "
            "what runs -- the frozen base's dgrad only (no wgrad), the LoRA GEMMs (both grads of the trained "
            "adapter), attention backward 2.5x its forward (fused kernels recompute the scores); this project's "
            "count, credited to both implementations (PEFT's separate q/k/v adapters differ by < 1 %).", "",
            "| step | forward-equivalents per sample | model GFLOP per sample | hardware GFLOP per sample |",
            "|---|---:|---:|---:|"]
    for k, f in m["flops"].items():
        hw = f.get("hardware_flops_per_sample")
        out.append(f"| {k} | {f['forward_equivalents']:.4g} | {f['flops_per_sample'] / 1e9:.4g} | "
                   f"{fmt(hw / 1e9 if hw is not None else None, '.4g')} |")
    if far:
        out += ["", f"AnyFlow-FAR (the causal model, chunks {tuple(m['chunk_partition'])}): the same per-token formula over "
                "the FarLayout tokens (compressed context, full chunks, clean copies), self-attention 4 P h with P the "
                "allowed (query, key) pairs of the grouped attention (block-sparse), cached steps q x (cache + q), "
                "prefills without head (`flops.far_step_flops`). Stage 1: 6 F_tf(n) (+ 3 F_bi + 1 F_bi with the "
                "bidirectional branch); stage 2: generator 3 n_seg sum_k F_step(k) + the prefills + real 2 F_bi + "
                "fake 1 F_bi + co-training 6 F_tf(n), critic n_seg sum_k F_step(k) + the prefills (sequential) + 3 F_bi. "
                "Each timed iteration is credited with its own draws (n, the bidirectional coin, (N, k)); "
                "forward-equivalents in bidirectional forwards F_bi. No reference implementation for FAR rows."]
    e = m.get("expected_segments")
    if e is not None:
        out += ["", "Stage 2 = generator step (rollout with grad 3n + real score 2 + fake score 1 + stage-1 "
                "co-training 6) + critic step (no-grad rollout R + fake score with grad 3), each timed iteration "
                "credited with its own draw: n = 1 + (k > 0) + (k < N - 1) rollout segments of its plan (N, k) "
                "(the trainer's seeds, the same for both implementations); R = n (sequential) or 0 (pipelined: the "
                f"critic reuses the generator's rollout). Expectation over N in {m['simulation_steps']}: {e:.4g} "
                "segments. Both implementations are credited with the same FLOPs."]
        seg = {r["rollout_segments_measured_mean"] for r in rows if "rollout_segments_measured_mean" in r}
        if seg:
            out.append(f"The timed stage-2 iterations drew {sorted(seg)[0]:.3g} rollout segments on average "
                       f"(expectation {e:.4g}); the table above is per timed iteration.")
    out += [""] if far else ["", "Reference = diffusers `AnyFlowTransformer3DModel` + PEFT LoRA (same rank, alpha and target linears), "
            "eager PyTorch, SDPA attention, diffusers' gradient checkpointing whenever this project's row "
            "recomputes, the same AnyFlow step functions with `kernel_backend=\"torch\"`, "
            "AdamW per adapter, clipping, EMA" + (", bf16 weights (diffusers' fp32 modules kept fp32), fp32 "
                                                  "adapters, torch.autocast(bf16)" if m["bf16"] else ", fp32") + ". "
            "Stage 2 of the public reference keeps three full models (generator, fake score, real score); here the "
            "reference is ONE diffusers model with two PEFT adapters switched per call (the real score with "
            "adapters disabled), the fair single-GPU memory comparison."]
    for r in rows:
        prof = r.get("profile")
        if prof:
            label = f"{r['step']}{'/' + r['schedule'] if r['schedule'] else ''}"
            out += ["", f"Profile of one {label} iteration ({prof['source']}, torch.profiler key averages grouped by "
                    "name patterns, `measure.profile.KERNEL_CATEGORIES`):", "",
                    "| category | ms | share | calls |", "|---|---:|---:|---:|"]
            out += [f"| {k} | {v['ms']:.2f} | {100 * v['share']:.1f} % | {v['calls']} |"
                    for k, v in prof["categories"].items()]
            out += ["", "| top kernels | category | ms | calls |", "|---|---|---:|---:|"]
            out += [f"| `{t['name']}` | {t['category']} | {t['ms']:.2f} | {t['calls']} |" for t in prof["top"]]
    if m["world_size"] > 1:
        one = "one GPU" if m["device_kind"] == "cuda" else "one process"
        out.append(f"The reference ran on rank 0 only ({one}, micro-batch {m['micro_batch_size']}); its per-GPU "
                   "numbers are compared with the per-GPU numbers of the parallel run.")
    return "\n".join(out) + "\n"



def _count_params(a) -> int:
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel

    far = {"far": True, "chunk_partition": far_chunk_partition(a)} if is_far(a) else {}
    cfg = wan_config(a.preset, perform_initialization=False, **far,
                     **({"num_layers": a.num_layers} if a.num_layers else {}))
    with torch.device("meta"):
        m = WanModel(cfg)
    return sum(p.numel() for p in m.parameters())


