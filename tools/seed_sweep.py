#!/usr/bin/env python
"""Seed sweep of a training stage: K seeds trained from one cached teacher and data set, each evaluated at
chosen iterations (the student's N-step PSNR against the teacher's 50-step samples), summarised as a table
(mean +- sd, min, max per N and iteration) and a plot of PSNR vs iterations with a band over seeds.

    # the README's tiny stage 1 (examples/pretrain_anyflow_tiny.sh step 5) at 3 seeds, evaluated at 150 / 400 / 800:
    python tools/seed_sweep.py --stage stage1 --teacher outputs/tiny/ckpt/teacher \\
        --data-path outputs/tiny/synthetic --eval-data-path outputs/tiny/data \\
        --output sweeps/stage1_base --seeds 1234 1235 1236 --iters 150 400 800
    # an ablation arm is the same sweep with extra trainer arguments after "--" (they override the recipe's):
    python tools/seed_sweep.py ... --output sweeps/stage1_lr3e-4 -- --lr 3e-4 --min-lr 3e-5
    # the recipe before the issue-#17 fix (LoRA on the time / delta embedders too, as the reference):
    python tools/seed_sweep.py ... --output sweeps/stage1_embedder_lora -- --lora-exclude none
    # one table over several sweeps (arms):
    python tools/seed_sweep.py --summarize sweeps/stage1_base sweeps/stage1_lr3e-4

Each seed trains in its own run directory (``OUTPUT/runs/seed_<s>/``: checkpoints, ``train.log``, TensorBoard
with the stage-1 diagnostics) as one run of ``--train-iters`` iterations (the lr schedule spans all of
them) cut into segments with ``--exit-after-iters``: train to the first evaluation iteration, evaluate its
checkpoint, resume (bit-exact) to the next, ... Seeds run one after the other (one trainer process at a
time). The sweep is resumable: ``OUTPUT/results.json`` records every evaluated (seed, iteration) cell and a
re-launch skips them, and a seed's training resumes from its newest checkpoint. Stopping the sweep (Ctrl-C or
SIGTERM) stops the running trainer too.

Evaluation: the prompts and noise of ``tools/evaluate_anyflow.py`` (``--num-samples`` prompts spread over
``--eval-data-path``, noise from ``--eval-seed``), the teacher's ``--reference-steps``-step Euler ODE samples as
the reference (computed once, cached in ``OUTPUT/reference.pt``), the student's N-step flow-map Euler samples
(EMA weights unless ``--no-ema``), PSNR of the decoded videos (pixel codec), otherwise the latent PSNR
(peak-to-peak 2). The teacher's own N-step PSNR is recorded once as the yardstick.

Stages: ``stage1`` (default recipe: the tiny script's step 5) and ``stage2`` (step 6; give the stage-1
checkpoint with ``--init-adapters-from``) and ``far-stage1`` (AnyFlow-FAR stage 1, the FAR demo's step 1;
give ``--chunk-partition`` after ``--``; its students sample chunk by chunk with the KV cache, N steps per
chunk, as ``tools/evaluate_far.py`` does). ``--recipe none`` passes no recipe arguments (give them all after
``--``), so any model / data scale works.

Outputs: ``results.json``, ``table.md`` (summary and per-seed tables), ``psnr_vs_iters.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The README's tiny recipe (examples/pretrain_anyflow_tiny.sh, steps 5 and 6); extra arguments override these.
RECIPES = {
    "stage1": ["--model-preset", "tiny-video", "--log-interval", "25", "--guidance", "1", "--lora-rank", "32",
               "--lora-alpha", "32", "--micro-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "50",
               "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--ema-decay", "0.99", "--ema-start-iter", "0",
               "--lora-exclude", "condition_embedder.*"],
    # examples/pretrain_anyflow_far_tiny.sh step 1 (give --chunk-partition after "--" to match the data's frames)
    "far-stage1": ["--model", "far", "--model-preset", "tiny-video", "--log-interval", "25", "--guidance", "1",
                   "--lora-rank", "32", "--lora-alpha", "32", "--micro-batch-size", "8", "--lr", "1e-3",
                   "--lr-warmup-iters", "50", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--ema-decay", "0.99",
                   "--ema-start-iter", "0", "--lora-exclude", "condition_embedder.*"],
    "stage2": ["--model-preset", "tiny-video", "--log-interval", "25", "--guidance", "1", "--micro-batch-size", "4",
               "--lr", "1e-4", "--critic-lr", "1e-4", "--ema-start-iter", "0", "--ema-decay", "0.9",
               "--simulation-steps", "2", "4", "8", "16", "--real-guidance", "0"],  # LoRA targets: the stage-1 checkpoint's
}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", nargs="+", default=None, metavar="SWEEP_DIR",
                   help="only print one summary table over these sweep outputs (arms) and exit")
    p.add_argument("--stage", choices=["stage1", "stage2", "far-stage1"], default="stage1",
                   help="far-stage1: AnyFlow-FAR stage 1 (the FAR demo's step 1), evaluated chunk by chunk with the "
                        "KV cache (anyflow.causal.sample_chunked, N steps per chunk)")
    p.add_argument("--teacher", help="teacher checkpoint (the --pretrained base and the evaluation reference)")
    p.add_argument("--data-path", help="training data (the teacher-synthesised set)")
    p.add_argument("--eval-data-path", default=None, help="prompts of the evaluation (default: --data-path)")
    p.add_argument("--init-adapters-from", default=None, help="stage 2: the stage-1 checkpoint")
    p.add_argument("--output")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    p.add_argument("--iters", type=int, nargs="+", default=[150, 400], help="evaluation iterations")
    p.add_argument("--train-iters", type=int, default=None, help="length of each run (lr schedule); default max(--iters)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="sampling steps N evaluated")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0, help="teacher CFG of the reference (the tiny job: 1)")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--no-ema", action="store_true", help="evaluate the live weights instead of the EMA")
    p.add_argument("--recipe", choices=["tiny", "none"], default="tiny")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the trainer (default: inherited, else 2)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every evaluated checkpoint (default: only the newest, to resume from)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.extra = extra
    if args.summarize is None:
        for name in ("teacher", "data_path", "output"):
            if getattr(args, name) is None:
                p.error(f"--{name.replace('_', '-')} is required")
        if args.stage == "stage2" and args.recipe == "tiny" and not args.init_adapters_from:
            p.error("--stage stage2 needs --init-adapters-from (the stage-1 checkpoint)")
        args.iters = sorted(set(args.iters))
        args.train_iters = args.train_iters or args.iters[-1]
        if args.iters[-1] > args.train_iters or args.iters[0] < 1:
            p.error(f"--iters must lie in 1..--train-iters ({args.train_iters}), got {args.iters}")
        args.eval_data_path = args.eval_data_path or args.data_path
    return args


# ----------------------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------------------
def load_results(out: str) -> dict:
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}, "teacher": {}, "config": {}}


def save_results(out: str, res: dict) -> None:
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def cell_key(seed: int, it: int) -> str:
    return f"{seed}/{it}"


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------
def trainer_command(args, seed: int, ckpt_dir: str, tb_dir: str, exit_after: int):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_anyflow.py"), "--stage", args.stage.replace("far-", "")]
    cmd += RECIPES[args.stage] if args.recipe == "tiny" else []
    cmd += ["--pretrained", args.teacher, "--data-path", args.data_path]
    if args.init_adapters_from:
        cmd += ["--init-adapters-from", args.init_adapters_from]
    cmd += list(args.extra)
    cmd += ["--seed", str(seed), "--train-iters", str(args.train_iters), "--exit-after-iters", str(exit_after),
            "--save", ckpt_dir, "--load", ckpt_dir, "--tensorboard-dir", tb_dir]
    return cmd


def current_iteration(ckpt_dir: str) -> int:
    from megatron_anyflow.checkpoint import store as ckpt

    tag = ckpt.read_tracker(ckpt_dir) if os.path.isdir(ckpt_dir) else None  # "iter_0000400" (or an old "400")
    digits = str(tag or "").replace("iter_", "")
    return int(digits) if digits.isdigit() else 0


def train_to(args, seed: int, run_dir: str, it: int, log) -> None:
    """Train seed ``seed`` (resuming) until its checkpoint at iteration ``it`` exists."""
    ckpt_dir = os.path.join(run_dir, "ckpt")
    cur = current_iteration(ckpt_dir)
    if cur >= it:
        return
    cmd = trainer_command(args, seed, ckpt_dir, os.path.join(run_dir, "tb"), it - cur)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS", 2))
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            rc = proc.wait()
        finally:
            # the sweep is being stopped (SIGTERM, Ctrl-C, an error here): the trainer goes with it instead of
            # training on unobserved (its checkpoints are written atomically, so the seed resumes on a re-launch)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        raise RuntimeError(f"seed {seed}: the trainer failed (exit {rc}); see {run_dir}/train.log")
    log(f"seed {seed}: trained {cur} -> {it} in {time.time() - t0:.0f} s")
    with open(os.path.join(run_dir, "wall_times.jsonl"), "a") as f:
        f.write(json.dumps({"from": cur, "to": it, "seconds": round(time.time() - t0, 1)}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------
class Evaluator:
    """The fixed evaluation of a sweep: prompts, noise, the teacher's reference (cached), PSNR per N."""

    def __init__(self, args, out: str, log):
        import torch

        sys.path.insert(0, os.path.join(ROOT, "tools"))
        from evaluate_anyflow import evaluation_inputs

        from megatron_anyflow.data.latent_dataset import LatentDataset
        from megatron_anyflow.parallel.state import initialize_parallel
        from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
        from megatron_anyflow.checkpoint.model_io import load_for_inference

        enable_megatron_cpu_compat()
        initialize_parallel(1)
        self.torch, self.args, self.log = torch, args, log
        self._load = load_for_inference
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        ds = LatentDataset(args.eval_data_path)
        _, self.text, self.neg, self.noise, self.decode = evaluation_inputs(ds, args.num_samples, args.eval_seed, self.device)
        self._teacher = None
        key = {"teacher": os.path.abspath(args.teacher), "eval_data": os.path.abspath(args.eval_data_path),
               "num_samples": args.num_samples, "eval_seed": args.eval_seed, "reference_steps": args.reference_steps,
               "guidance": args.guidance, "shift": args.shift}
        path = os.path.join(out, "reference.pt")
        cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        if cached is not None and cached.get("key") == json.dumps(key, sort_keys=True):
            self.ref = cached["ref"].to(self.device)
        else:
            from megatron_anyflow.anyflow.sampler import TeacherEulerSampler

            log(f"teacher reference: {args.reference_steps} steps")
            with torch.no_grad():
                self.ref = TeacherEulerSampler(args.reference_steps, shift=args.shift, guidance_scale=args.guidance)(
                    self.teacher(), self.noise, self.text, self._neg())
            torch.save({"key": json.dumps(key, sort_keys=True), "ref": self.ref.cpu()}, path)
        self.ref_px = self.decode(self.ref).float() if self.decode is not None else None

    def _neg(self):
        return self.neg.expand(self.noise.shape[0], -1, -1) if self.neg.shape[0] == 1 else self.neg

    def teacher(self):
        if self._teacher is None:
            self._teacher = self._load(self.args.teacher).to(self.device)
        return self._teacher

    def metrics(self, out) -> dict:
        from megatron_anyflow.anyflow.evaluation import psnr

        mse = float((out.double() - self.ref.double()).pow(2).mean())
        # latent PSNR with peak-to-peak 2 (latents of unit scale, like videos in [-1, 1]): the metric of data
        # sets without a pixel decoder, e.g. the mini set-up (megatron_anyflow/testing/quality.py)
        m = {"latent_mse": mse, "latent_psnr": 10 * math.log10(4.0 / mse)}
        if self.decode is not None:
            mse = float((self.decode(out).float() - self.ref_px).pow(2).mean())
            m.update(pixel_mse=mse, psnr=psnr(mse))
        return m

    def teacher_metrics(self, steps) -> dict:
        from megatron_anyflow.anyflow.sampler import TeacherEulerSampler

        res = {}
        with self.torch.no_grad():
            for n in steps:
                out = TeacherEulerSampler(n, shift=self.args.shift, guidance_scale=self.args.guidance)(
                    self.teacher(), self.noise, self.text, self._neg())
                res[str(n)] = self.metrics(out)
        return res

    def student_metrics(self, ckpt_dir: str, steps) -> dict:
        from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler

        student = self._load(ckpt_dir, adapter="generator", ema=not self.args.no_ema).to(self.device)
        res = {}
        with self.torch.no_grad():
            for n in steps:
                if student.config.far:  # AnyFlow-FAR: chunk by chunk with the KV cache, N steps per chunk
                    from megatron_anyflow.anyflow.causal import sample_chunked
                    from megatron_anyflow.models.wan.far import FarModelRunner

                    out = sample_chunked(FarModelRunner(student), self.noise, self.text,
                                         tuple(student.config.chunk_partition), n, shift=self.args.shift)
                else:
                    out = FlowMapEulerSampler(n, shift=self.args.shift)(student, self.noise, self.text)
                res[str(n)] = self.metrics(out)
        return res


# ----------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------
def _metric_name(res: dict) -> str:
    """"psnr" (decoded videos) where the data set has a pixel decoder, else "latent_psnr" (peak 2), else
    "latent_mse" (results written before latent PSNR existed)."""
    for cell in res["cells"].values():
        for m in cell.values():
            return next(k for k in ("psnr", "latent_psnr", "latent_mse") if k in m)
    return "psnr"


def _is_db(key: str) -> bool:
    return key.endswith("psnr")


def summary_rows(res: dict):
    """(iteration, N, values over seeds) for every evaluated (iteration, N)."""
    key = _metric_name(res)
    by = {}
    for ck, cell in res["cells"].items():
        seed, it = (int(v) for v in ck.split("/"))
        for n, m in cell.items():
            by.setdefault((it, int(n)), []).append((seed, m[key]))
    return [(it, n, sorted(v)) for (it, n), v in sorted(by.items())]


def _stats(vals):
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, sd, min(vals), max(vals)


def write_table(out: str, res: dict) -> str:
    key = _metric_name(res)
    unit = {"psnr": "PSNR (dB)", "latent_psnr": "latent PSNR (dB, peak 2)"}.get(key, "latent MSE")
    cfg = res.get("config", {})
    lines = [f"# Seed sweep: {cfg.get('stage', '?')}, {unit} vs the teacher's {cfg.get('reference_steps', 50)}-step samples", ""]
    if cfg:
        lines += [f"Trainer arguments beyond the recipe ({cfg.get('recipe')}): `{' '.join(cfg.get('extra', [])) or '(none)'}`; "
                  f"train iterations {cfg.get('train_iters')}; {'live' if cfg.get('no_ema') else 'EMA'} weights; "
                  f"{cfg.get('num_samples')} evaluation samples.", ""]
    fmt = (lambda v: f"{v:.2f}") if _is_db(key) else (lambda v: f"{v:.4g}")  # noqa: E731
    lines += ["| iteration | N | seeds | mean | sd | min | max | teacher N-step |", "|---|---|---|---|---|---|---|---|"]
    for it, n, vals in summary_rows(res):
        mean, sd, lo, hi = _stats([v for _, v in vals])
        t = res.get("teacher", {}).get(str(n), {}).get(key)
        lines.append(f"| {it} | {n} | {len(vals)} | {fmt(mean)} | {fmt(sd)} | {fmt(lo)} | {fmt(hi)} | "
                     f"{'' if t is None else fmt(t)} |")
    seeds = sorted({int(k.split('/')[0]) for k in res["cells"]})
    iters = sorted({int(k.split('/')[1]) for k in res["cells"]})
    steps = sorted({int(n) for c in res["cells"].values() for n in c})
    lines += ["", f"Per seed ({unit}):", "", "| seed | N | " + " | ".join(f"it {i}" for i in iters) + " |",
              "|---|---|" + "---|" * len(iters)]
    for s in seeds:
        for n in steps:
            cells = []
            for i in iters:
                v = res["cells"].get(cell_key(s, i), {}).get(str(n), {}).get(key)
                cells.append("" if v is None else fmt(v))
            lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    path = os.path.join(out, "table.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_plot(out: str, res: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _metric_name(res)
    rows = summary_rows(res)
    path = os.path.join(out, "psnr_vs_iters.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for i, n in enumerate(sorted({n for _, n, _ in rows})):
        pts = [(it, [v for _, v in vals]) for it, m, vals in rows if m == n]
        xs = [it for it, _ in pts]
        st = [_stats(v) for _, v in pts]
        color = f"C{i}"
        ax.plot(xs, [s[0] for s in st], "o-", color=color, label=f"student, {n} steps (mean)")
        ax.fill_between(xs, [s[2] for s in st], [s[3] for s in st], color=color, alpha=0.15)
        ax.fill_between(xs, [s[0] - s[1] for s in st], [s[0] + s[1] for s in st], color=color, alpha=0.25)
        t = res.get("teacher", {}).get(str(n), {}).get(key)
        if t is not None:
            ax.axhline(t, color=color, ls="--", lw=0.8)
    ax.set_xlabel("training iteration")
    ax.set_ylabel({"psnr": "PSNR vs teacher 50-step (dB)", "latent_psnr": "latent PSNR vs teacher 50-step (dB)"}
                  .get(key, "latent MSE"))
    n_seeds = len({k.split('/')[0] for k in res["cells"]})
    ax.set_title(f"{res.get('config', {}).get('stage', '')} seed sweep ({n_seeds} seeds): "
                 "band = min..max, dark = +-sd; dashed = teacher N-step", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(dirs) -> str:
    """One markdown table over several sweeps (arms): per arm, iteration and N, mean +- sd [min, max]."""
    lines = ["| arm | extra arguments | iteration | N | seeds | mean +- sd | min | max | per seed |", "|---" * 9 + "|"]
    for d in dirs:
        res = load_results(d)
        extra = " ".join(res.get("config", {}).get("extra", [])) or "(recipe)"
        fmt = (lambda v: f"{v:.2f}") if _is_db(_metric_name(res)) else (lambda v: f"{v:.4g}")  # noqa: E731
        for it, n, vals in summary_rows(res):
            mean, sd, lo, hi = _stats([v for _, v in vals])
            per = ", ".join(f"{s}: {fmt(v)}" for s, v in vals)
            lines.append(f"| {os.path.basename(os.path.normpath(d))} | `{extra}` | {it} | {n} | {len(vals)} | "
                         f"{fmt(mean)} +- {fmt(sd)} | {fmt(lo)} | {fmt(hi)} | {per} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so train_to's clean-up stops the running trainer
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    sys.path.insert(0, ROOT)
    os.makedirs(args.output, exist_ok=True)
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:7.1f}s] {s}", flush=True)  # noqa: E731
    res = load_results(args.output)
    config = {"stage": args.stage, "recipe": args.recipe, "extra": args.extra, "train_iters": args.train_iters,
              "teacher": os.path.abspath(args.teacher), "data_path": os.path.abspath(args.data_path),
              "eval_data_path": os.path.abspath(args.eval_data_path), "num_samples": args.num_samples,
              "eval_seed": args.eval_seed, "reference_steps": args.reference_steps, "guidance": args.guidance,
              "no_ema": args.no_ema, "init_adapters_from": args.init_adapters_from}
    if res["cells"] and res.get("config") and {k: v for k, v in res["config"].items() if k != "seeds"} != config:
        raise SystemExit(f"{args.output} holds a sweep with another configuration ({res['config']}); use another --output")
    res["config"] = config
    from megatron_anyflow.checkpoint import store as ckpt

    todo = [(s, it) for s in args.seeds for it in args.iters
            if not all(str(n) in res["cells"].get(cell_key(s, it), {}) for n in args.steps)]
    log(f"{len(args.seeds) * len(args.iters) - len(todo)} of {len(args.seeds) * len(args.iters)} cells done; "
        f"{len(todo)} to go")
    ev = None
    if todo or any(str(n) not in res["teacher"] for n in args.steps):
        ev = Evaluator(args, args.output, log)
        missing = [n for n in args.steps if str(n) not in res["teacher"]]
        if missing:
            res["teacher"].update(ev.teacher_metrics(missing))
            save_results(args.output, res)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="seed/iteration cells", disable=args.no_progress, file=sys.stdout)
    except ImportError:  # pragma: no cover
        bar = None
    for seed, it in todo:
        run_dir = os.path.join(args.output, "runs", f"seed_{seed}")
        os.makedirs(run_dir, exist_ok=True)
        d = os.path.join(run_dir, "ckpt", ckpt.tag_for(it))
        if not os.path.isdir(d):
            if current_iteration(os.path.join(run_dir, "ckpt")) > it:
                log(f"seed {seed}: the checkpoint of iteration {it} is gone (the run is past it): cell skipped")
                bar and bar.update(1)
                continue
            train_to(args, seed, run_dir, it, log)
        cell = ev.student_metrics(d, args.steps)
        res["cells"].setdefault(cell_key(seed, it), {}).update(cell)
        save_results(args.output, res)
        key = _metric_name(res)
        log(f"seed {seed} iteration {it}: " + ", ".join(f"N={n} {key} {v[key]:.4g}" for n, v in cell.items()))
        if not args.keep_checkpoints:  # keep the newest (resume point); drop older evaluated ones
            for other in args.iters:
                od = os.path.join(run_dir, "ckpt", ckpt.tag_for(other))
                if other < it and os.path.isdir(od):
                    import shutil

                    shutil.rmtree(od)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    paths = [write_table(args.output, res), write_plot(args.output, res)]
    with open(paths[0]) as f:
        print(f.read())
    log(f"wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
