#!/usr/bin/env python
"""Two experts trained each on its own time range, through the real trainer, on Gaussian data.

    python benchmarks/two_expert_training.py [--seeds 1 2 3] [--out benchmarks/results/two_expert_training]

benchmarks/two_expert_routing.py chose how a flow map uses Wan2.2 A14B's two experts with *exact* per-expert
maps. This run checks that the trainer and the sampler route the same way with *trained* experts: stage 1
of ``pretrain_anyflow.py`` (the ``tiny-wan2.2-t2v-a14b`` preset, full fine-tuning from random init, the
recipe of tests/test_stage1_quality.py's Gaussian check) trains the high-noise expert with ``--expert high``
(t, r in [b, 1]) and the low-noise one with ``--expert low`` ([0, b]), b = 0.875, on Gaussian data
(`testing.quality.write_gaussian_dataset`, whose exact flow map is known). A single model of the ``tiny``
preset trained on the full range with the same recipe and iterations is the reference: what one model of
the same size learns, without experts.

Sampling from the same noise at N = 1, 2, 4, 8 (shift 5), with the EMA weights; error: RMS of (x - x_exact)
over 1024 samples, relative to RMS(x_exact), x_exact the exact flow map 1 -> 0 of the same noise:

- ``snap`` (the library: ``FlowMapEulerSampler(N, boundary=b)``, `sampler.route_experts`): no jump crosses b;
- ``split``: a crossing jump of the plain grid is split at b (N + 1 evaluations);
- ``by-t``: the plain grid, a crossing jump given to the expert of its start time (diffusers' per-timestep
  rule): the high expert never learned jumps that end below b;
- ``single``: the full-range model on the plain grid.

Each seed trains all three models (``--seed``); the table gives mean +- sd over seeds. Runs the trainer as
subprocesses with ``OMP_NUM_THREADS`` = ``--threads``. Results: ``OUT.md`` and ``OUT.json``.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from two_expert_routing import run  # noqa: E402

from megatron_anyflow.anyflow.timesteps import flow_map_time_grid  # noqa: E402

B = 0.875
STEPS = (1, 2, 4, 8)
ROUTINGS = ("snap", "split", "by-t", "single")
ITERS = 600
RECIPE = ["--lora-rank", "0", "--micro-batch-size", "128", "--train-iters", str(ITERS), "--lr", "3e-3",
          "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--guidance", "1",
          "--text-dropout", "0", "--ema-decay", "0.95", "--ema-start-iter", "0", "--log-interval", "200"]
MODELS = {"high": ["--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", "high"],
          "low": ["--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", "low"],
          "single": ["--model-preset", "tiny"]}


def train(root, data_path, seed, threads):
    """The three stage-1 runs of one seed; returns {name: checkpoint root}."""
    out = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for name, extra in MODELS.items():
        ckpt = os.path.join(root, f"seed{seed}_{name}")
        if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
            print(f"training {name} (seed {seed}, {ITERS} iterations)", flush=True)
            subprocess.run([sys.executable, os.path.join(REPO, "pretrain_anyflow.py"), "--stage", "stage1", *extra,
                            "--data-path", data_path, *RECIPE, "--seed", str(seed), "--save", ckpt], check=True,
                           env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        out[name] = ckpt
    return out


def jump(model, text):
    """``(z, t, r) -> z - (t - r) u(z, T, R)`` of a trained model (float32 model, float64 state)."""

    def f(z, t, r):
        n = z.shape[0]
        T = torch.full((n, z.shape[1]), 1000.0 * t)
        R = torch.full((n, z.shape[1]), 1000.0 * r)
        with torch.no_grad():
            u = model(z.float(), T, R, text.expand(n, -1, -1)).double()
        return z - (t - r) * u

    return f


def evaluate(models, data, text, n=1024, seed=123):
    """{routing: {N: relative RMS error}} of the final samples against the exact map 1 -> 0."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.mu.shape), generator=g, dtype=torch.float64)
    exact = data.flow_map(noise, 1.0, 0.0)
    scale = exact.pow(2).mean().sqrt().item()
    hi, lo, single = (jump(models[k], text) for k in ("high", "low", "single"))
    res = {}
    for routing in ROUTINGS:
        res[routing] = {}
        for steps in STEPS:
            grid = flow_map_time_grid(steps)
            if routing == "single":
                x, _ = run(single, single, grid, B, "by-t", noise)
            else:
                x, _ = run(hi, lo, grid, B, routing, noise)
            res[routing][steps] = (x - exact).pow(2).mean().sqrt().item() / scale
    return res


def markdown(per_seed):
    seeds = sorted(per_seed)
    out = ["# Two experts trained on their own time ranges (Gaussian data, the real trainer)", "",
           "Written by `benchmarks/two_expert_training.py` (see its docstring): stage 1 of `pretrain_anyflow.py`, "
           f"{ITERS} iterations per model, seeds {', '.join(map(str, seeds))}; relative RMS error of the final "
           "sample against the exact flow map 1 -> 0 of the same noise (1024 samples), mean +- sd over seeds. "
           "NFE: N (`split`: N + 1 where a step crosses b = 0.875).", "",
           "| N | " + " | ".join(ROUTINGS) + " |", "|---|" + "---|" * len(ROUTINGS)]
    for steps in STEPS:
        cells = []
        for routing in ROUTINGS:
            v = [per_seed[s][routing][steps] for s in seeds]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} +- {sd:.4f}")
        out.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="training folder (kept; default: a temporary one)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "two_expert_training"))
    args = p.parse_args(argv)
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.testing.quality import write_gaussian_dataset
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    work = args.work or tempfile.mkdtemp(prefix="two_expert_training_")
    data, text = write_gaussian_dataset(os.path.join(work, "data"))
    per_seed = {}
    for seed in args.seeds:
        ckpts = train(work, os.path.join(work, "data"), seed, args.threads)
        models = {k: load_for_inference(v, ema=True).eval() for k, v in ckpts.items()}
        per_seed[seed] = evaluate(models, data, text)
        print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"boundary": B, "iters": ITERS, "per_seed": per_seed}, f, indent=1)
    text_md = markdown(per_seed)
    with open(args.out + ".md", "w") as f:
        f.write(text_md + "\n")
    print(text_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
