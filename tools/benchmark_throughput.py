#!/usr/bin/env python
"""Training throughput of the AnyFlow steps: megatron_anyflow against the reference way of doing them.

For the teacher step, the stage-1 step and the stage-2 step (schedules ``sequential`` and ``pipelined``)
at one preset and size, this times whole training iterations and reports, per row:

* **s/iter** -- seconds per iteration (forwards, backwards, gradient reduction, clipping, AdamW steps,
  EMA; with the data of the iteration). Each iteration is timed between device synchronisations
  (``torch.cuda.synchronize`` + ``time.perf_counter``) after ``--warmup`` untimed ones. Teacher and
  stage 1: the **median** over ``--iters``. Stage 2: the **mean**, because every iteration draws its own
  rollout length (N from ``--simulation-steps``, k ~ U{0..N-1}: 1 to 3 generator calls) and the FLOP
  count below is the expectation over that draw; both implementations see the same draws (same seeds),
  and the JSON keeps every iteration's time and the mean segment count of the measured draws.
* **tokens/s/GPU** -- video tokens processed per second per GPU, each sample's tokens counted **once per
  iteration** whatever the number of forwards: ``global_batch x S / (s/iter) / world_size`` with
  ``S = F' x H' x W'`` tokens per sample (latents after the (1, 2, 2) patch). The global batch is
  ``--micro-batch-size`` x the data-parallel size (one micro-batch per iteration).
* **model TFLOP/s/GPU** -- ``global_batch x model FLOPs per sample and iteration / (s/iter) / world_size``,
  the model FLOPs from :mod:`megatron_anyflow.training.flops` (ANYFLOW.md section 7; the forward formula
  is printed in the markdown):

  - teacher: ``step_flops(cfg, "teacher")`` = 3 forwards (one forward with grad = 3 forward-equivalents);
  - stage 1: ``step_flops(cfg, "stage1")`` = 6 (cond with grad 3; null, plus, minus 1 each);
  - stage 2: generator step + critic step, ``E = expected_segments(--simulation-steps)`` (3 - 2/N averaged
    over N; 2.617 for {2, 4, 8, 16, 50}):
    ``step_flops(cfg, "stage2_generator", rollout_grad_segments=E)`` (rollout with grad 3 E + real score
    cond/uncond 2 + fake score 1 + stage-1 co-training 6) plus ``step_flops(cfg, "stage2_critic",
    rollout_segments=R)`` (no-grad rollout R + fake score with grad 3), where ``R = E`` for ``sequential``
    (the critic's own rollout of the updated generator) and ``R = 0`` for ``pipelined`` (the critic trains
    on the generator's rollout: no second rollout). Both implementations are credited with the *same*
    model FLOPs for the same row, so the pipelined schedule's saved rollout shows up as speed, not FLOPs.

  Model FLOPs count a backward as 2x its forward also for the frozen LoRA base (whose weight-gradient
  GEMMs are skipped): hardware FLOPs are lower than model FLOPs.
* **MFU** -- model TFLOP/s/GPU over the measured dense matmul rate of this device: on CUDA the median of
  bf16 ``8192 x 8192 x 8192`` matmuls (``--matmul-size``), not the data-sheet peak; on CPU an fp32 matmul
  of ``--matmul-size`` (default 2048), labelled as such.
* **peak memory** -- CUDA: ``torch.cuda.max_memory_allocated`` (reset before building each model, so it
  includes that implementation's weights, adapters, optimiser states and the steps' activations; max
  over ranks). CPU: the increase of the process's peak resident set size over the same span (VmHWM reset
  through ``/proc/self/clear_refs``; ``resource.getrusage`` as the fallback, which cannot be reset):
  *host* memory, labelled as such, and indicative only -- memory freed by earlier rows stays in the
  process, so later rows under-report; no memory ratio is given on CPU.
* **speed-up vs reference** -- (tokens/s/GPU of megatron_anyflow) / (tokens/s/GPU of the reference) for
  the same step and schedule; and the peak-memory ratio.

The two implementations:

* ``megatron_anyflow``: exactly what training runs -- ``Trainer(parse_args(argv))`` with mock data of the
  requested size, then ``trainer.stage.train_step(iteration, trainer.sampler.micro_batches(consumed))``
  per iteration (layer backend, attention, recomputation, FP8, TP / SP / CP as given; the stage-1 loss
  kernels on ``--kernel-backend``, Triton on CUDA by default). Stage 2 starts from fresh adapters
  (no ``--init-adapters-from``): the cost of an iteration does not depend on the adapters' values.
* ``reference``: the way the public reference implementation does it: diffusers'
  ``AnyFlowTransformer3DModel`` of the same architecture, LoRA adapters of the same rank / alpha on the
  same linears through the ``peft`` library (``attn1.to_q/to_k/to_v/to_out.0``, ``ffn.net.0.proj``,
  ``ffn.net.2``, the time and delta embedders' ``linear_1/2``), eager PyTorch with SDPA attention, the
  same AnyFlow step functions of this project (``anyflow.objective.stage1_loss`` /
  ``flow_matching_loss`` with ``kernel_backend="torch"`` -- the reference has no fused kernels --, and
  ``anyflow.distill`` for stage 2) called through ``lambda z, T, R, text: hf(z, T, R, text,
  return_dict=False)[0]``, the same data and seeds, ``torch.optim.AdamW`` per adapter, gradient
  clipping and the same EMA. Precision: with ``--bf16`` the weights are bf16 except diffusers'
  ``_keep_in_fp32_modules`` (as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads them), the PEFT
  adapters fp32 (PEFT's default) and the forwards run under ``torch.autocast(bfloat16)`` (accelerate's
  ``mixed_precision="bf16"``); otherwise fp32. **Stage 2 of the reference keeps three full models**
  (generator, fake score, real score); here it is *one* diffusers model with the ``generator`` and
  ``fake_score`` PEFT adapters switched per call (``set_adapter``; the real score with the adapters
  disabled), which is the fair single-GPU memory comparison (the three-model reference needs about
  three times the base weights). Under ``torchrun`` the reference runs on rank 0 only, on one GPU (the
  other ranks wait); its per-GPU numbers are then compared with the per-GPU numbers of the parallel run.

Sizes: ``--frames --height --width`` are video frames and pixels, mapped through the Wan VAE (4x time,
8x space): latents ``((frames - 1) / 4 + 1, height / 8, width / 8)`` (81 x 480 x 832 -> 21 x 60 x 104
-> 32,760 tokens). ``--latent-shape F H W`` gives the latent size directly (needed for presets whose
latents are not Wan-VAE latents, e.g. ``tiny-video``; the channels always come from the preset).
Defaults: on CUDA ``wan2.1-1.3b``, 81 x 480 x 832, text 512, bf16; without CUDA the ``tiny`` preset at
latents 3 x 16 x 16 (192 tokens), text 16, micro-batch 2, fp32, one thread (``--threads``), 3 timed
iterations after 1 warm-up -- a CPU smoke run that finishes in about a minute and says at the top of its
output that it measured the CPU.

Output: progress on stdout, then the markdown table; ``--json`` / ``--markdown`` paths (default
``--output-dir benchmarks/results/`` with ``throughput_<date>_<device>.json/.md``).

Usage::

    python tools/benchmark_throughput.py                                 # CPU smoke run / 1.3B on one GPU
    python tools/benchmark_throughput.py --preset wan2.1-14b --num-layers 10 --recompute-granularity full
    torchrun --nproc_per_node 8 tools/benchmark_throughput.py --preset wan2.1-14b \\
        --tensor-model-parallel-size 2 --sequence-parallel --context-parallel-size 4 --backend te
    python tools/benchmark_throughput.py --steps stage2 --schedules pipelined --no-reference
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

STEPS = ("teacher", "stage1", "stage2")
SCHEDULES = ("sequential", "pipelined")
IMPLS = ("megatron_anyflow", "reference")
# diffusers / PEFT names of the linears AnyFlow trains (the same set as models.lora.DEFAULT_TARGETS)
PEFT_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2",
                "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                "condition_embedder.delta_embedder.linear_1", "condition_embedder.delta_embedder.linear_2"]


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the device-dependent ones (None here; their help text names them)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    g = p.add_argument_group("what to measure")
    g.add_argument("--preset", default=None, choices=["tiny", "tiny-video", "wan2.1-1.3b", "wan2.1-14b"],
                   help="model preset (default: wan2.1-1.3b on CUDA, tiny on CPU)")
    g.add_argument("--num-layers", type=int, default=None,
                   help="override the preset's layer count (a slice of the model, e.g. 14B with 10 layers)")
    g.add_argument("--frames", type=int, default=None,
                   help="video frames (Wan VAE: (frames - 1) / 4 + 1 latent frames; default 81)")
    g.add_argument("--height", type=int, default=None, help="video height in pixels (latents: / 8; default 480)")
    g.add_argument("--width", type=int, default=None, help="video width in pixels (latents: / 8; default 832)")
    g.add_argument("--latent-shape", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="latent frames / height / width directly (overrides --frames/--height/--width; "
                        "default on CPU: 3 16 16)")
    g.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 on CUDA, 16 on CPU)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per GPU (default 1 CUDA, 2 CPU)")
    g.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    g.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                   help="stage-2 schedules")
    g.add_argument("--simulation-steps", type=int, nargs="+", default=[2, 4, 8, 16, 50],
                   help="stage-2 rollout budgets N")
    g.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 CUDA, 3 CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 CUDA, 1 CPU)")
    g.add_argument("--no-reference", action="store_true", help="skip the diffusers + PEFT reference")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch intra-op threads (default 1: the tiny CPU run's small ops gain nothing "
                        "from more, and OpenMP spin-waiting makes timings erratic on a shared machine)")

    g = p.add_argument_group("megatron_anyflow settings (passed to the trainer)")
    g.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bf16 (default on CUDA)")
    g.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 (default on CPU)")
    g.add_argument("--lora-rank", type=int, default=None, help="default: 256 (Wan presets), the preset's own (tiny)")
    g.add_argument("--lora-alpha", type=float, default=None, help="default: = rank")
    g.add_argument("--recompute-granularity", choices=["none", "full", "selective"], default="none")
    g.add_argument("--backend", choices=["local", "te"], default="local")
    g.add_argument("--attention-impl", choices=["sdpa", "flash", "math"], default="sdpa")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None)
    g.add_argument("--kernel-backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--extra-trainer-args", default="",
                   help="more pretrain_anyflow.py arguments, one string (e.g. '--grad-through no_grad_prefix')")

    g = p.add_argument_group("output")
    g.add_argument("--matmul-size", type=int, default=None, help="matmul n for the rate (default 8192 CUDA, 2048 CPU)")
    g.add_argument("--output-dir", default="benchmarks/results")
    g.add_argument("--json", default=None, metavar="PATH", help="default: <output-dir>/throughput_<date>_<device>.json")
    g.add_argument("--markdown", default=None, metavar="PATH", help="default: <output-dir>/throughput_<date>_<device>.md")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and fill the device-dependent defaults.

    Raises:
        SystemExit (argparse error): sizes that do not map onto whole latents / patches.
    """
    p = build_parser()
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    a.device_kind = "cuda" if cuda else "cpu"
    if a.preset is None:
        a.preset = "wan2.1-1.3b" if cuda else "tiny"
    video_given = any(v is not None for v in (a.frames, a.height, a.width))
    if a.latent_shape is None and not cuda and not video_given:
        a.latent_shape = [3, 16, 16]
    a.frames, a.height, a.width = a.frames or 81, a.height or 480, a.width or 832
    if a.bf16 is None:
        a.bf16 = cuda
    for name, gpu, cpu in (("text_len", 512, 16), ("micro_batch_size", 1, 2), ("iters", 10, 3), ("warmup", 3, 1),
                           ("matmul_size", 8192, 2048)):
        if getattr(a, name) is None:
            setattr(a, name, gpu if cuda else cpu)
    if a.iters < 1 or a.warmup < 0 or a.micro_batch_size < 1 or a.text_len < 1:
        p.error("--iters >= 1, --warmup >= 0, --micro-batch-size >= 1, --text-len >= 1")
    from megatron_anyflow.models.wan.config import PRESETS, wan_config

    pre = wan_config(a.preset)
    if a.lora_rank is None:
        a.lora_rank = 256 if a.preset.startswith("wan") else int(PRESETS[a.preset].get("lora_rank", pre.lora_rank))
    if a.lora_alpha is None:
        a.lora_alpha = float(a.lora_rank)
    if a.latent_shape is not None:
        a.latent = tuple(int(v) for v in a.latent_shape)
    else:
        if pre.in_channels != 16:
            p.error(f"preset {a.preset} has {pre.in_channels}-channel latents (not the Wan VAE's): give --latent-shape")
        if (a.frames - 1) % 4 or a.height % 8 or a.width % 8:
            p.error(f"--frames must be 4k + 1 and --height/--width multiples of 8; got {a.frames}x{a.height}x{a.width}")
        a.latent = ((a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)
    pt, ph, pw = pre.patch_size
    F, H, W = a.latent
    if F % pt or H % ph or W % pw or min(a.latent) < 1:
        p.error(f"latent size {a.latent} does not divide into patches {pre.patch_size}")
    return a


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------
def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def say(*a, **k):
    if _rank() == 0:
        print(*a, **k, flush=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    n = torch.get_num_threads()
    return f"CPU ({cpu}, {n} thread{'s' if n != 1 else ''})"


def device_slug() -> str:
    if torch.cuda.is_available():
        name = re.sub(r"^NVIDIA[ _-]*", "", torch.cuda.get_device_name())
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        return f"{_world()}x{slug}"
    return "cpu"


def measure_matmul_tflops(n: int, reps: int = 10) -> Dict[str, object]:
    """Dense matmul rate: bf16 on CUDA, fp32 on CPU (median of ``reps`` timed products)."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    reps = reps if cuda else 3
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    _sync()
    times = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    del a, b
    t = statistics.median(times)
    return {"tflops": 2.0 * n ** 3 / t / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "device": "cuda" if cuda else "cpu", "seconds": t}


class PeakMemory:
    """Peak memory of one measurement: CUDA allocator peak, or the host RSS peak increase on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.kind = "cuda_max_memory_allocated" if self.cuda else "host_peak_rss_increase"

    @staticmethod
    def _status(key: str) -> Optional[int]:
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        self.resettable = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux >= 4.0)
            self.resettable = self._status("VmHWM") is not None
        if self.resettable:
            self.base = self._status("VmRSS")
            self.kind = "host_peak_rss_increase"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "host_peak_rss_increase_getrusage"

    def peak_gib(self) -> float:
        if self.cuda:
            v = float(torch.cuda.max_memory_allocated())
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1:
                t = torch.tensor([v], device="cuda")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                v = float(t)
            return v / 2 ** 30
        peak = self._status("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0.0, (peak - self.base)) / 2 ** 30


# ------------------------------------------------------------------------------------------------
# model FLOPs
# ------------------------------------------------------------------------------------------------
def arch_config(preset: str, num_layers: Optional[int]):
    from megatron_anyflow.models.wan.config import wan_config

    return wan_config(preset, **({"num_layers": num_layers} if num_layers else {}))


def iteration_flops(cfg, step: str, schedule: Optional[str], latent, text_len: int, simulation_steps,
                    cotrain: bool = True) -> Dict[str, float]:
    """Model FLOPs per sample of one iteration (see the module docstring) and its forward-equivalents."""
    from megatron_anyflow.training.flops import expected_segments, step_flops

    F, H, W = latent
    if step in ("teacher", "stage1"):
        s = step_flops(cfg, step, F, H, W, text_len)
        return {"flops_per_sample": s.flops_per_sample, "forward_equivalents": s.forward_equivalents}
    e = expected_segments(simulation_steps)
    gen = step_flops(cfg, "stage2_generator", F, H, W, text_len, rollout_grad_segments=e, cotrain=cotrain)
    crit = step_flops(cfg, "stage2_critic", F, H, W, text_len, rollout_segments=e if schedule == "sequential" else 0.0)
    return {"flops_per_sample": gen.flops_per_sample + crit.flops_per_sample,
            "forward_equivalents": gen.forward_equivalents + crit.forward_equivalents, "expected_segments": e}


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
    argv = ["--stage", step, "--model-preset", a.preset, "--mock-data", "--mock-latent-shape", str(F), str(C), str(H),
            str(W), "--mock-text-len", str(a.text_len), "--mock-num-samples", str(num_samples),
            "--micro-batch-size", str(a.micro_batch_size), "--train-iters", "1000000", "--log-interval", "1000000",
            "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha), "--seed", str(a.seed),
            "--recompute-granularity", a.recompute_granularity, "--backend", a.backend,
            "--attention-impl", a.attention_impl, "--kernel-backend", a.kernel_backend,
            "--tensor-model-parallel-size", str(a.tensor_model_parallel_size),
            "--context-parallel-size", str(a.context_parallel_size),
            "--simulation-steps", *map(str, a.simulation_steps)]
    if schedule:
        argv += ["--schedule", schedule]
    if a.bf16:
        argv.append("--bf16")
    if a.sequence_parallel:
        argv.append("--sequence-parallel")
    if a.fp8_format:
        argv += ["--fp8-format", a.fp8_format]
    argv += a.extra_trainer_args.split()
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

    def step(self, it: int) -> None:
        t = self.trainer
        t.stage.train_step(it, t.sampler.micro_batches(it * self.global_batch))

    def close(self):
        self.trainer = None


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
        from diffusers import AnyFlowTransformer3DModel

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
        kw = dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_attention_heads,
                  attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_hidden_size, num_layers=cfg.num_layers,
                  cross_attn_norm=cfg.cross_attn_norm, eps=cfg.layernorm_epsilon, rope_max_seq_len=cfg.rope_max_seq_len,
                  gate_value=cfg.delta_gate, deltatime_type=cfg.deltatime_type)
        torch.manual_seed(a.seed)
        old = torch.get_default_dtype()
        try:  # build directly on the device in the target dtype (a 14B fp32 copy would not fit)
            torch.set_default_dtype(self.dtype)
            with torch.device(self.device):
                hf = AnyFlowTransformer3DModel(**kw)
        finally:
            torch.set_default_dtype(old)
        if self.bf16:  # from_pretrained(torch_dtype=bf16) keeps these in fp32
            keep = set(getattr(hf, "_keep_in_fp32_modules", None) or [])
            for n, p in hf.named_parameters():
                if keep.intersection(n.split(".")):
                    p.data = p.data.float()
        hf.requires_grad_(False)
        hf.train()
        self.adapters = ["generator", "fake_score"] if step == "stage2" else (["teacher"] if step == "teacher" else ["generator"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about a second adapter on one model: intended
            for name in self.adapters:
                hf.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, target_modules=PEFT_TARGETS,
                                          init_lora_weights=True), adapter_name=name)
        self.hf = hf
        self.params = {name: [p for n, p in hf.named_parameters() if f".{name}." in n] for name in self.adapters}
        lr = {"fake_score": args.critic_lr}
        self.opt = {name: torch.optim.AdamW(ps, lr=lr.get(name, args.lr), betas=(args.adam_beta1, args.adam_beta2),
                                            eps=args.adam_eps, weight_decay=args.weight_decay)
                    for name, ps in self.params.items()}
        self.ema = {name: [p.detach().float().clone() for p in ps] for name, ps in self.params.items()}
        self._activate(self.adapters[0])

        self.dataset = MockLatentDataset(args.mock_num_samples, args.mock_latent_shape, args.mock_text_len,
                                         cfg.text_dim, seed=args.seed)
        self.sampler = DataParallelSampler(len(self.dataset), self.global_batch, self.global_batch, 1, 0, seed=args.seed)
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

        (idx,) = self.sampler.micro_batches(it * self.global_batch)
        j, dev = 0, self.device
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
        if self.schedule == "pipelined":
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
        self.hf = self.opt = self.params = self.ema = None


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def rollout_segments_of(a, iterations) -> float:
    """Mean generator calls of the stage-2 rollouts drawn in ``iterations`` (the trainer's plan seeds)."""
    from megatron_anyflow.anyflow.distill import DistillConfig, sample_simulation_plan
    from megatron_anyflow.training.trainer import derive_seed

    dcfg = DistillConfig(num_steps_choices=tuple(a.simulation_steps))
    calls = []
    for it in iterations:
        g = torch.Generator().manual_seed(derive_seed(a.seed, "plan", it, 0))
        p = sample_simulation_plan(g, dcfg)
        calls.append(1 + (p.k > 0) + (p.k < p.N - 1))
    return sum(calls) / len(calls)


def _max_over_ranks(values: List[float]) -> List[float]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(a, impl: str, step: str, schedule: Optional[str], flops: Dict[str, float], matmul: Dict) -> Dict:
    """Build one implementation, warm up, time ``a.iters`` iterations, and fill one result row."""
    label = f"{step}{'/' + schedule if schedule else ''} [{impl}]"
    row = {"step": step, "schedule": schedule, "implementation": impl}
    mem = PeakMemory()
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
        peak = mem.peak_gib() if impl == "megatron_anyflow" else _local_peak(mem)
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
    s_iter = statistics.mean(times) if step == "stage2" else statistics.median(times)
    S = _tokens(a)
    tflops = gb * flops["flops_per_sample"] / s_iter / world / 1e12
    from megatron_anyflow.training.flops import mfu

    row.update({
        "s_per_iter": s_iter, "s_per_iter_statistic": "mean" if step == "stage2" else "median",
        "iteration_times_s": times, "world_size": world, "global_batch": gb,
        "tokens_per_s_per_gpu": gb * S / s_iter / world,
        "model_flops_per_iteration": gb * flops["flops_per_sample"],
        "model_tflops_per_s_per_gpu": tflops, "mfu": mfu(tflops, matmul["tflops"]),
        "peak_memory_gib": peak, "peak_memory_kind": mem.kind,
    })
    if step == "stage2":
        row["rollout_segments_measured_mean"] = rollout_segments_of(a, range(a.warmup, a.warmup + a.iters))
    say(f"  {label}: {s_iter:.4f} s/iter, {row['tokens_per_s_per_gpu']:.1f} tokens/s/GPU, "
        f"{tflops:.4g} TFLOP/s/GPU, peak {peak:.3f} GiB")
    return row


def _local_peak(mem: PeakMemory) -> float:
    """Peak of a rank-0-only measurement (no collective)."""
    if mem.cuda:
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return mem.peak_gib()


def _tokens(a) -> int:
    from megatron_anyflow.training.flops import tokens

    return tokens(arch_config(a.preset, a.num_layers), *a.latent)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(report: Dict) -> str:
    m, rows = report["meta"], report["rows"]
    cpu = m["device_kind"] == "cpu"
    out = [f"# AnyFlow training throughput: {m['preset']} on {m['device']}", ""]
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
            f"{m['matmul']['n']}^3 on {m['matmul']['device']}; the MFU denominator)",
            f"- {m['iters']} timed iterations after {m['warmup']} warm-up; s/iter is the median (teacher, stage 1) "
            f"or the mean (stage 2: random rollout lengths, same draws for both implementations)", ""]
    mem_label = "peak host RSS increase (GiB)" if cpu else "peak memory (GiB)"
    out += [f"| step | schedule | implementation | s/iter | tokens/s/GPU | model TFLOP/s/GPU | MFU | {mem_label} | "
            "speed-up vs reference | memory vs reference |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['step']} | {r['schedule'] or '-'} | {r['implementation']} | failed: {r['error']} "
                       "| | | | | | |")
            continue
        tf = r["model_tflops_per_s_per_gpu"]
        out.append(f"| {r['step']} | {r['schedule'] or '-'} | {r['implementation']} | {r['s_per_iter']:.4g} | "
                   f"{r['tokens_per_s_per_gpu']:.4g} | {tf:.4g} | {_fmt(100 * r['mfu'], '.2f')}% | "
                   f"{r['peak_memory_gib']:.3f} | {_fmt(r.get('speedup_vs_reference'), '.2f')} | "
                   f"{_fmt(r.get('memory_vs_reference'), '.2f')} |")
    out += ["", "Speed-up = tokens/s/GPU of megatron_anyflow / of the reference (same step and schedule); memory "
            "ratio likewise. tokens/s/GPU counts each sample's video tokens once per iteration.", "",
            "Model FLOPs (training/flops.py; ANYFLOW.md section 7), one forward of one sample, S video tokens, C text "
            "tokens, hidden h, FFN F, L layers: `L [2Sh(3h) + 4S^2h + 2Shh  +  2Shh + 4Chh + 4SCh + 2Shh  +  4ShF]` "
            "+ patch embedding, text embedding, head, time embedders. Per iteration, in forward-equivalents "
            "(a forward with grad = 3, a no-grad forward = 1):", "",
            "| step | forward-equivalents per sample | model GFLOP per sample |", "|---|---:|---:|"]
    for k, f in m["flops"].items():
        out.append(f"| {k} | {f['forward_equivalents']:.4g} | {f['flops_per_sample'] / 1e9:.4g} |")
    e = m.get("expected_segments")
    if e is not None:
        out += ["", f"Stage 2 = generator step (rollout with grad 3E + real score 2 + fake score 1 + stage-1 "
                f"co-training 6) + critic step (no-grad rollout R + fake score with grad 3), E = expected rollout "
                f"segments over N in {m['simulation_steps']} = {e:.4g}; R = E (sequential) or 0 (pipelined: the "
                "critic reuses the generator's rollout). Both implementations are credited with the same FLOPs."]
        seg = {r["rollout_segments_measured_mean"] for r in rows if "rollout_segments_measured_mean" in r}
        if seg:
            out.append(f"The measured stage-2 iterations drew {sorted(seg)[0]:.3g} rollout segments on average "
                       f"(expectation {e:.4g}).")
    out += ["", "Reference = diffusers `AnyFlowTransformer3DModel` + PEFT LoRA (same rank, alpha and target linears), "
            "eager PyTorch, SDPA attention, the same AnyFlow step functions with `kernel_backend=\"torch\"`, "
            "AdamW per adapter, clipping, EMA" + (", bf16 weights (diffusers' fp32 modules kept fp32), fp32 "
                                                  "adapters, torch.autocast(bf16)" if m["bf16"] else ", fp32") + ". "
            "Stage 2 of the public reference keeps three full models (generator, fake score, real score); here the "
            "reference is ONE diffusers model with two PEFT adapters switched per call (the real score with "
            "adapters disabled), the fair single-GPU memory comparison."]
    if m["world_size"] > 1:
        one = "one GPU" if m["device_kind"] == "cuda" else "one process"
        out.append(f"The reference ran on rank 0 only ({one}, micro-batch {m['micro_batch_size']}); its per-GPU "
                   "numbers are compared with the per-GPU numbers of the parallel run.")
    return "\n".join(out) + "\n"


def main(argv=None) -> Dict:
    a = parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(a.threads or 1)
    for msg in (".*Transformer Engine and Apex are not installed.*", ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg)
    cfg = arch_config(a.preset, a.num_layers)
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    say(f"AnyFlow throughput benchmark on {device_name()}")
    if a.device_kind == "cpu":
        say("*** NO CUDA: measuring on the CPU (fp32, tiny size): a smoke run, not a GPU result ***")
    S = _tokens(a)
    say(f"preset {a.preset} ({cfg.num_layers} layers), latents {a.latent} -> {S} tokens/sample, text {a.text_len}, "
        f"micro-batch {a.micro_batch_size}, {'bf16' if a.bf16 else 'fp32'}, LoRA rank {a.lora_rank}")
    say(f"measuring the {'bf16' if a.device_kind == 'cuda' else 'fp32'} matmul rate (n = {a.matmul_size}) ...")
    matmul = measure_matmul_tflops(a.matmul_size)
    say(f"  {matmul['tflops']:.4g} TFLOP/s")

    plan = [(s, None) for s in a.steps if s != "stage2"]
    if "stage2" in a.steps:
        plan += [("stage2", sch) for sch in a.schedules]
    flops = {}
    cotrain = "--no-cotrain-stage1" not in a.extra_trainer_args.split()
    for step, sch in plan:
        flops[f"{step}{'/' + sch if sch else ''}"] = iteration_flops(cfg, step, sch, a.latent, a.text_len,
                                                                    a.simulation_steps, cotrain)
    rows = []
    for step, sch in plan:
        f = flops[f"{step}{'/' + sch if sch else ''}"]
        say(f"{step}{' (' + sch + ')' if sch else ''}: {f['forward_equivalents']:.4g} forward-equivalents, "
            f"{f['flops_per_sample'] / 1e9:.4g} model GFLOP per sample and iteration")
        rows.append(measure(a, "megatron_anyflow", step, sch, f, matmul))
    if not a.no_reference:
        import torch.distributed as dist

        multi = dist.is_initialized() and dist.get_world_size() > 1
        grp = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) if multi else None
        if _rank() == 0:
            if multi:
                say(f"reference: rank 0 only, on one device (the other {dist.get_world_size() - 1} ranks wait)")
            for step, sch in plan:
                rows.append(measure(a, "reference", step, sch, flops[f"{step}{'/' + sch if sch else ''}"], matmul))
        if multi:
            dist.barrier(group=grp)
        ours = {(r["step"], r["schedule"]): r for r in rows if r["implementation"] == "megatron_anyflow"}
        for r in rows:
            o = ours.get((r["step"], r["schedule"]))
            if r["implementation"] == "reference" and o and "error" not in o and "error" not in r:
                o["speedup_vs_reference"] = o["tokens_per_s_per_gpu"] / r["tokens_per_s_per_gpu"]
                # host RSS peaks depend on what earlier rows left in the process: no ratio on CPU
                o["memory_vs_reference"] = (o["peak_memory_gib"] / r["peak_memory_gib"]
                                            if a.device_kind == "cuda" and r["peak_memory_gib"] > 0 else None)
        order = {k: i for i, k in enumerate(plan)}
        rows.sort(key=lambda r: (order[(r["step"], r["schedule"])], IMPLS.index(r["implementation"])))

    import diffusers
    import megatron.core

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    base_params = _count_params(a)
    meta = {
        "date": date, "device": device_name(), "device_kind": a.device_kind, "world_size": _world(),
        "torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?"),
        "diffusers": diffusers.__version__, "peft": peft_version, "preset": a.preset, "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size, "parameters_base": base_params,
        "latent_shape": list(a.latent), "channels": cfg.in_channels, "tokens_per_sample": S, "text_len": a.text_len,
        "micro_batch_size": a.micro_batch_size, "bf16": a.bf16, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha,
        "tp": a.tensor_model_parallel_size, "cp": a.context_parallel_size, "sequence_parallel": a.sequence_parallel,
        "backend": a.backend, "attention_impl": a.attention_impl, "recompute_granularity": a.recompute_granularity,
        "fp8_format": a.fp8_format, "kernel_backend": a.kernel_backend, "simulation_steps": list(a.simulation_steps),
        "iters": a.iters, "warmup": a.warmup, "matmul": matmul, "flops": flops,
        "expected_segments": next((f["expected_segments"] for f in flops.values() if "expected_segments" in f), None),
        "reference_notes": "diffusers AnyFlowTransformer3DModel + PEFT LoRA, eager, SDPA; ONE model with adapters "
                           "switched per call for stage 2 (the public reference keeps three full models)",
        "command": " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])),
    }
    report = {"meta": meta, "rows": rows}
    if _rank() == 0:
        md = markdown(report)
        print()
        print(md, flush=True)
        stem = os.path.join(a.output_dir, f"throughput_{date}_{device_slug()}")
        jpath, mpath = a.json or stem + ".json", a.markdown or stem + ".md"
        for path, text in ((jpath, json.dumps(report, indent=1, default=float) + "\n"), (mpath, md)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        print(f"wrote {jpath} and {mpath}", flush=True)
    return report


def _count_params(a) -> int:
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel

    cfg = wan_config(a.preset, perform_initialization=False, **({"num_layers": a.num_layers} if a.num_layers else {}))
    with torch.device("meta"):
        m = WanModel(cfg)
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    main()
