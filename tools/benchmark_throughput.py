#!/usr/bin/env python
"""Training throughput of the AnyFlow steps: megatron_anyflow against the reference way of doing them.

For the teacher step, the stage-1 step and the stage-2 step (schedules ``sequential`` and ``pipelined``)
at one preset and size, this times whole training iterations and reports, per row:

* **s/iter** -- seconds per iteration (forwards, backwards, gradient reduction, clipping, AdamW steps,
  EMA; with the data of the iteration). Each iteration is timed between device synchronisations
  (``torch.cuda.synchronize`` + ``time.perf_counter``) after ``--warmup`` untimed ones. Teacher and
  stage 1: the **median** over ``--iters``. Stage 2: the **mean**, because every iteration draws its own
  rollout length (N from ``--simulation-steps``, k ~ U{0..N-1}: 1 to 3 generator calls); each timed
  iteration is credited with the FLOPs of its own draw (the plans are known from the seeds), so the rate
  is the sum of the iterations' FLOPs over the sum of their times. Both implementations see the same
  draws (same seeds); the JSON keeps every iteration's time, plan (N, k) and FLOPs.
* **tokens/s/GPU** -- video tokens processed per second per GPU, each sample's tokens counted **once per
  iteration** whatever the number of forwards: ``global_batch x S / (s/iter) / world_size`` with
  ``S = F' x H' x W'`` tokens per sample (latents after the (1, 2, 2) patch). The global batch is
  ``--micro-batch-size`` x the data-parallel size (one micro-batch per iteration).
* **model TFLOP/s/GPU** -- ``global_batch x model FLOPs per sample and iteration / (s/iter) / world_size``,
  the model FLOPs from :mod:`megatron_anyflow.measure.flops` (docs/design/anyflow.md 7; the forward formula
  is printed in the markdown):

  - teacher: ``step_flops(cfg, "teacher")`` = 3 forwards (one forward with grad = 3 forward-equivalents);
  - stage 1: ``step_flops(cfg, "stage1")`` = 6 (cond with grad 3; null, plus, minus 1 each);
  - stage 2: generator step + critic step of each timed iteration's plan (N, k), ``n = 1 + (k > 0) +
    (k < N - 1)`` generator calls (`flops.stage2_iteration_flops`): ``step_flops(cfg, "stage2_generator",
    rollout_grad_segments=n)`` (rollout with grad 3 n + real score cond/uncond 2 + fake score 1 + stage-1
    co-training 6) plus ``step_flops(cfg, "stage2_critic", rollout_segments=R)`` (no-grad rollout R + fake
    score with grad 3), ``R = n`` for ``sequential`` (the critic's own rollout of the updated generator) and
    ``R = 0`` for ``pipelined`` (the critic trains on the generator's rollout). The expectation
    (``expected_segments``: 2.617 for N in {2, 4, 8, 16, 50}) is printed for comparison only. Both
    implementations are credited with the *same* FLOPs for the same row, so the pipelined schedule's
    saved rollout shows up as speed, not FLOPs.

  Model FLOPs (the field's convention) count a backward as 2x its forward also for the frozen LoRA base
  and leave LoRA out.
* **hardware TFLOP/s/GPU** -- the same rate with hardware FLOPs (`flops.step_hardware_flops`): what the
  GPU executes -- frozen base dgrad only (no wgrad), LoRA GEMMs included (both grads of the trained
  adapter; forward in the no-grad calls unless ``--lora-nograd-merge``), attention backward 2.5x its
  forward (fused kernels recompute the scores; ``--attention-impl math``: the explicit-matmul count).
  At 32k tokens attention dominates and hardware FLOPs exceed model FLOPs by ~9 % (1.3B).
* **MFU**, twice -- model TFLOP/s/GPU over (a) the measured dense matmul rate of this device ("MFU
  (matmul)": on CUDA the median of bf16 ``8192 x 8192 x 8192`` matmuls, ``--matmul-size``; on CPU an fp32
  matmul of ``--matmul-size`` (default 2048), labelled as such) and (b) the data-sheet dense bf16 peak ("MFU
  (data sheet)", the field's convention: H100 SXM 989, H200 989 TFLOP/s, `benchmark.DATASHEET_BF16_TFLOPS`,
  ``--peak-tflops`` to override; not reported on CPU). A measured matmul reaches ~80 % of the data sheet on
  an H200, so (a) reads ~25 % above (b).
* **peak memory** -- CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (what the
  caching allocator held: fragmentation included; both reset before building each model, so they
  include that implementation's weights, adapters, optimiser states and the steps' activations; max
  over ranks). CPU: the increase of the process's peak resident set size over the same span (VmHWM reset
  through ``/proc/self/clear_refs``; ``resource.getrusage`` as the fallback, which cannot be reset):
  *host* memory, labelled as such, and indicative only -- memory freed by earlier rows stays in the
  process, so later rows under-report; no memory ratio is given on CPU.
* **speed-up vs reference** -- (tokens/s/GPU of megatron_anyflow) / (tokens/s/GPU of the reference) for
  the same step and schedule; and the peak-memory ratio.

The two implementations:

* ``megatron_anyflow``: exactly what training runs -- ``Trainer(parse_args(argv))`` with mock data of the
  requested size (or ``--data-path DIR``: the dataset through the trainer's data loader, ``--num-workers``
  worker processes prefetching the next iteration, as training reads it), then
  ``trainer.stage.train_step(iteration, micro-batches)`` per iteration (layer backend, attention, recomputation, FP8, TP / SP / CP as given; the stage-1 loss
  kernels on ``--kernel-backend``, Triton on CUDA by default). Stage 2 starts from fresh adapters
  (no ``--init-adapters-from``): the cost of an iteration does not depend on the adapters' values.
* ``reference``: the way the public reference implementation does it: diffusers'
  ``AnyFlowTransformer3DModel`` of the same architecture, LoRA adapters of the same rank / alpha on the
  same linears through the ``peft`` library (stages 1 and 2: ``attn1.to_q/to_k/to_v/to_out.0``,
  ``ffn.net.0.proj``, ``ffn.net.2``, the time and delta embedders' ``linear_1/2``, as
  ``models.lora.DEFAULT_TARGETS``; the teacher: attention and FFN only, as ``TEACHER_TARGETS``), eager
  PyTorch with SDPA attention, diffusers' gradient checkpointing
  (``enable_gradient_checkpointing()``) whenever this project's row recomputes (``--recompute-granularity``
  not none), the same data (with ``--data-path``: through the same loader), the
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

Trainer options: the ones below are passed on; any option this tool does not know is forwarded to
``pretrain_anyflow.py`` unchanged (e.g. ``--recompute-policy save-attention``, ``--lora-nograd-merge
cache``, ``--grad-through no_grad_prefix``); ``--extra-trainer-args '...'`` does the same in one string.

``--model far``: the AnyFlow-FAR rows instead (the causal model, docs/design/far.md): FAR stage 1 (teacher forcing +
the bidirectional branch) and FAR stage 2 (causal rollouts through the KV cache, bidirectional scores),
``--chunk-partition`` (default the recipe's (1, 3, 3, 3, 3, 3, 3, 2) cut to the latent frames), credited
with FAR model / hardware FLOPs (`flops.far_step_flops`: block-sparse attention pairs from `FarLayout`,
each timed iteration with its own draws of n, the bidirectional coin and (N, k); s/iter the mean). No
teacher row (the teacher is bidirectional) and no reference (there is no diffusers + PEFT FAR trainer
to compare with).

``--profile``: after timing, one more iteration of each megatron_anyflow row runs under
``torch.profiler``; the report adds its time per kernel category (attention, GEMM, elementwise,
communication: `measure.profile.KERNEL_CATEGORIES`) and the top kernels.

Rows run in plan order, each megatron_anyflow row followed at once by the reference row of the same step
and schedule, so a run cut short keeps whole comparisons.

Output: progress on stdout, then the markdown table; ``--json`` / ``--markdown`` paths (default
``--output-dir benchmarks/results/`` with ``throughput_<date>_<device>.json/.md``), both rewritten after
every row (temporary file + ``os.replace``: never half-written; ``meta.complete`` is false until the end).

Usage::

    python tools/benchmark_throughput.py                                 # CPU smoke run / 1.3B on one GPU
    python tools/benchmark_throughput.py --preset wan2.1-14b --num-layers 10 --recompute-granularity full
    torchrun --nproc_per_node 8 tools/benchmark_throughput.py --preset wan2.1-14b \\
        --tensor-model-parallel-size 2 --sequence-parallel --context-parallel-size 4 --backend te
    python tools/benchmark_throughput.py --steps stage2 --schedules pipelined --no-reference
    python tools/benchmark_throughput.py --steps stage1 --data-path data/wan --num-workers 4 --compile
    python tools/benchmark_throughput.py --model far --steps stage1 stage2 --schedules sequential  # AnyFlow-FAR

The measurement itself lives in :mod:`megatron_anyflow.measure.harness`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from typing import Dict

import torch

from megatron_anyflow.measure.device import (_rank, _world, datasheet_peak_tflops, device_name, device_slug,
                                             measure_matmul_tflops, say)
from megatron_anyflow.measure.harness import (DEFAULT_SCHEDULES, SCHEDULES, STEPS, _count_params, _tokens, arch_config,
                                              far_chunk_partition, iteration_flops, markdown, measure, preset_with_layers,
                                              stage2_plans)
from megatron_anyflow.measure.report import print_report, write_atomic

__all__ = ["build_parser", "parse_args", "main", "arch_config", "preset_with_layers"]


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
    g.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(DEFAULT_SCHEDULES),
                   help="stage-2 schedules; overlapped = pipelined with --overlap-critic (compare it with the "
                        "pipelined row of the same run)")
    g.add_argument("--simulation-steps", type=int, nargs="+", default=[2, 4, 8, 16, 50],
                   help="stage-2 rollout budgets N")
    g.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 CUDA, 3 CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 CUDA, 1 CPU)")
    g.add_argument("--no-reference", action="store_true", help="skip the diffusers + PEFT reference")
    g.add_argument("--model", choices=["bidirectional", "far"], default="bidirectional",
                   help="far: the AnyFlow-FAR rows (causal model; stages 1 and 2, no reference)")
    g.add_argument("--chunk-partition", type=int, nargs="+", default=None,
                   help="--model far: latent frames per chunk (default (1, 3, 3, 3, 3, 3, 3, 2) cut to the latent frames)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch intra-op threads (default 1: the tiny CPU run's small ops gain nothing "
                        "from more, and OpenMP spin-waiting makes timings erratic on a shared machine)")

    g = p.add_argument_group("megatron_anyflow settings (passed to the trainer)")
    g.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bf16 (default on CUDA)")
    g.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 (default on CPU)")
    g.add_argument("--lora-rank", type=int, default=None, help="default: 256 (Wan presets), the preset's own (tiny)")
    g.add_argument("--lora-alpha", type=float, default=None, help="default: = rank")
    g.add_argument("--recompute-granularity", choices=["none", "full", "selective"], default="none",
                   help="also switches the reference's gradient checkpointing on (any value but none)")
    g.add_argument("--backend", choices=["local", "te"], default="local")
    g.add_argument("--attention-impl", choices=["auto", "cudnn", "fa3", "flash", "sdpa", "math"], default="auto",
                   help="the trainer's attention kernel (the reference keeps PyTorch SDPA)")
    g.add_argument("--compile", action="store_true", help="torch.compile each block (the trainer's --compile)")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None)
    g.add_argument("--kernel-backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--extra-trainer-args", default="",
                   help="more pretrain_anyflow.py arguments, one string (e.g. '--grad-through no_grad_prefix'); "
                        "unknown options on the command line are forwarded the same way")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, metavar="DIR",
                   help="time with this precomputed-latent dataset through the trainer's data loader (workers, "
                        "pinned memory, prefetch) instead of mock data; the latent size and text length are the "
                        "dataset's")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers (the trainer's --num-workers; default: the trainer's)")

    g = p.add_argument_group("output")
    g.add_argument("--matmul-size", type=int, default=None, help="matmul n for the rate (default 8192 CUDA, 2048 CPU)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="data-sheet dense bf16 peak for MFU (data sheet) (default: from the device name, "
                        "benchmark.DATASHEET_BF16_TFLOPS: H100 SXM 989, H200 989; none on CPU)")
    g.add_argument("--profile", action="store_true",
                   help="after timing, profile one more iteration of each megatron_anyflow row: time per kernel "
                        "category (attention, GEMM, elementwise, communication; torch.profiler) in the report")
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
    a, unknown = p.parse_known_args(argv)
    if unknown and not unknown[0].startswith("-"):
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    a.trainer_extra = a.extra_trainer_args.split() + unknown  # forwarded to pretrain_anyflow.py
    if a.data_path:
        index = os.path.join(a.data_path, "index.json")
        if not os.path.isfile(index):
            p.error(f"--data-path {a.data_path}: no index.json (expected a dataset written by tools/prepare_dataset.py)")
        with open(index) as f:
            meta = json.load(f)
        Fl, _, Hl, Wl = meta["latent_shape"]
        a.latent_shape, a.text_len = [Fl, Hl, Wl], int(meta["text_len"])
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
    if a.chunk_partition and a.model != "far":
        p.error("--chunk-partition needs --model far")
    if a.model == "far":
        if "teacher" in a.steps:  # the teacher is bidirectional: FAR rows are stages 1 and 2
            a.steps = [s for s in a.steps if s != "teacher"]
            if not a.steps:
                p.error("--model far measures stage1 / stage2 (the teacher is bidirectional)")
        a.no_reference = True  # no diffusers + PEFT FAR trainer to compare with
        cp = far_chunk_partition(a)
        if any(c < 1 for c in cp) or sum(cp) > F or ("stage2" in a.steps and sum(cp) != F):
            p.error(f"--chunk-partition {list(cp)} (sum {sum(cp)}) must cover the {F} latent frames (stage 2: exactly)")
        if H % 4 or W % 4:
            p.error(f"--model far: latent {H} x {W} must divide by the compressed patch (4 x 4)")
    return a



def _link(rows, device_kind: str) -> None:
    """Speed-up and memory ratio of each of our rows against the reference row of the same step and schedule
    (when both are there), and the overlapped row against our pipelined row."""
    ours = {(r["step"], r["schedule"]): r for r in rows if r["implementation"] == "megatron_anyflow"}
    for r in rows:
        o = ours.get((r["step"], r["schedule"]))
        if r["implementation"] == "reference" and o and "error" not in o and "error" not in r:
            o["speedup_vs_reference"] = o["tokens_per_s_per_gpu"] / r["tokens_per_s_per_gpu"]
            # host RSS peaks depend on what earlier rows left in the process: no ratio on CPU
            o["memory_vs_reference"] = (o["peak_memory_gib"] / r["peak_memory_gib"]
                                        if device_kind == "cuda" and r["peak_memory_gib"] > 0 else None)
    piped = ours.get(("stage2", "pipelined"))
    over = ours.get(("stage2", "overlapped"))
    if piped and over and "error" not in piped and "error" not in over:
        over["speedup_vs_pipelined"] = over["tokens_per_s_per_gpu"] / piped["tokens_per_s_per_gpu"]


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
        f"micro-batch {a.micro_batch_size}, {'bf16' if a.bf16 else 'fp32'}, LoRA rank {a.lora_rank}"
        + (f"; AnyFlow-FAR, chunks {far_chunk_partition(a)} (no reference rows)" if a.model == "far" else ""))
    say(f"measuring the {'bf16' if a.device_kind == 'cuda' else 'fp32'} matmul rate (n = {a.matmul_size}) ...")
    matmul = measure_matmul_tflops(a.matmul_size)
    a.datasheet = (datasheet_peak_tflops(device_name(), a.peak_tflops) if a.device_kind == "cuda" or a.peak_tflops
                   else {"tflops": None, "source": "CPU: no data-sheet peak"})
    say(f"  {matmul['tflops']:.4g} TFLOP/s measured; data-sheet peak: "
        + (f"{a.datasheet['tflops']:.4g} TFLOP/s ({a.datasheet['source']})" if a.datasheet["tflops"] else
           a.datasheet["source"]))

    plan = [(s, None) for s in a.steps if s != "stage2"]
    if "stage2" in a.steps:
        plan += [("stage2", sch) for sch in a.schedules]
    cotrain = "--no-cotrain-stage1" not in a.trainer_extra
    timed = range(a.warmup, a.warmup + a.iters)
    expected, flops = {}, {}
    for step, sch in plan:  # stage 2: the expectation (printed); the rows credit the timed iterations' own draws
        key = f"{step}{'/' + sch if sch else ''}"
        expected[key] = iteration_flops(a, cfg, step, sch, cotrain)
        flops[key] = (iteration_flops(a, cfg, step, sch, cotrain, stage2_plans(a, timed), iterations=timed)
                      if step == "stage2" else expected[key])

    import diffusers
    import megatron.core

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    with_reference = [(s, sch) for s, sch in plan if not a.no_reference and sch != "overlapped"]
    meta = {
        "date": date, "device": device_name(), "device_kind": a.device_kind, "world_size": _world(),
        "torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "?"),
        "diffusers": diffusers.__version__, "peft": peft_version, "preset": a.preset, "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size, "parameters_base": _count_params(a),
        "latent_shape": list(a.latent), "channels": cfg.in_channels, "tokens_per_sample": S, "text_len": a.text_len,
        "micro_batch_size": a.micro_batch_size, "bf16": a.bf16, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha,
        "tp": a.tensor_model_parallel_size, "cp": a.context_parallel_size, "sequence_parallel": a.sequence_parallel,
        "backend": a.backend, "attention_impl": a.attention_impl, "recompute_granularity": a.recompute_granularity,
        "fp8_format": a.fp8_format, "kernel_backend": a.kernel_backend, "simulation_steps": list(a.simulation_steps),
        "iters": a.iters, "warmup": a.warmup, "matmul": matmul, "datasheet": a.datasheet, "flops": flops,
        "compile": a.compile, "data": a.data_path or "mock", "num_workers": a.num_workers,
        "trainer_extra": list(a.trainer_extra),
        "reference_recompute": "gradient_checkpointing" if a.recompute_granularity != "none" else "none",
        "expected_segments": next((f["expected_segments"] for f in expected.values() if "expected_segments" in f), None),
        "reference_notes": "diffusers AnyFlowTransformer3DModel + PEFT LoRA, eager, SDPA; ONE model with adapters "
                           "switched per call for stage 2 (the public reference keeps three full models)",
        "model": a.model, "chunk_partition": list(far_chunk_partition(a)) if a.model == "far" else None,
        "row_order": "interleaved: each megatron_anyflow row, then the reference row of the same step and schedule",
        "rows_planned": len(plan) + len(with_reference),
        "command": " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])),
    }
    stem = os.path.join(a.output_dir, f"throughput_{date}_{device_slug()}")
    jpath, mpath = a.json or stem + ".json", a.markdown or stem + ".md"
    rows = []

    def write(complete: bool) -> Dict:
        """The report so far, rewritten after every row (atomically): a run cut short keeps its rows."""
        _link(rows, a.device_kind)
        report = {"meta": dict(meta, complete=complete), "rows": rows}
        if _rank() == 0:
            write_atomic(jpath, json.dumps(report, indent=1, default=float) + "\n")
            write_atomic(mpath, markdown(report))
        return report

    multi = grp = None
    if with_reference:
        import torch.distributed as dist

        multi = dist.is_initialized() and dist.get_world_size() > 1
        grp = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) if multi else None
        if multi:
            say(f"reference: rank 0 only, on one device (the other {dist.get_world_size() - 1} ranks wait)")
    write(False)
    for step, sch in plan:  # ours, then the reference of the same row: a run cut short keeps whole comparisons
        f = expected[f"{step}{'/' + sch if sch else ''}"]
        say(f"{'FAR ' if a.model == 'far' else ''}{step}{' (' + sch + ')' if sch else ''}: "
            f"{f['forward_equivalents']:.4g} forward-equivalents, {f['flops_per_sample'] / 1e9:.4g} model GFLOP per "
            f"sample and iteration" + (" (the timed iterations' own draws)" if a.model == "far" else ""))
        rows.append(measure(a, "megatron_anyflow", step, sch, matmul, cotrain))
        write(False)
        if (step, sch) in with_reference:
            if _rank() == 0:
                rows.append(measure(a, "reference", step, sch, matmul, cotrain))
            if multi:
                torch.distributed.barrier(group=grp)
            write(False)
    report = write(True)
    print_report(markdown(report), jpath, mpath)
    return report


if __name__ == "__main__":
    main()
