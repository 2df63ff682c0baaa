#!/usr/bin/env python
"""How should an any-step flow map use Wan2.2 A14B's two experts? A closed-form Gaussian experiment.

    python benchmarks/two_expert_routing.py [--out benchmarks/results/two_expert_routing]

Wan2.2 A14B runs ``transformer`` (high noise, H) for t >= b and ``transformer_2`` (low noise, L) below
(b = 0.875 T2V, 0.9 I2V, on the shifted time the scheduler feeds the model). The composed PF-ODE is
``dz/dt = v_H(z, t)`` for t >= b and ``v_L(z, t)`` for t < b, and its exact map from t to r is
``Phi_L(b -> r) o Phi_H(t -> b)`` for a jump that crosses b (`_exact`). Here the two experts are two
*different exact* velocity fields, those of two Gaussians (`anyflow.gaussian.GaussianData`, closed-form
flow maps, float64), and each expert knows only its own field, as a frozen expert base and the teacher
built on it do. Routings of a jump t -> r:

- ``by-t``: the expert of the start time t takes the whole jump (its own flow map), N evaluations;
- ``by-r``: the expert of the target time r takes it (the alternative), N evaluations;
- ``split``: a jump that crosses b is split at b, H to b then L from b, N + 1 evaluations when one
  step crosses (the FastGen-style "each expert distilled on its own range" gives the same maps);
- ``snap``: the N-step grid point nearest b is moved to b (any-step flow maps take any grid), so no
  step crosses: N evaluations for N >= 2 (N = 1 must split). The library's choice:
  `timesteps.two_expert_time_grid` and `sampler.route_experts` (``FlowMapEulerSampler(..., boundary=b)``). The step that starts at b goes to L: it
  lies below b, although diffusers' per-timestep rule (t >= b -> H) would pick H for its start time.

Two students per expert: the ideal one (the expert's exact flow map: what a perfectly distilled
any-step student of that expert is) and the undistilled teacher (one Euler step of the expert's
velocity per jump). Error: RMS of (x - x_exact) over 4096 samples x 64 dims of the same noise, relative
to the RMS of x_exact, against the exact composed map of the Wan grid (shift 5, `flow_map_time_grid`)
for N = 1, 2, 4, 8. Results: ``OUT.md`` (tables) and ``OUT.json``.
"""

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anyflow.anyflow.gaussian import GaussianData  # noqa: E402
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, two_expert_time_grid  # noqa: E402

DIM, SAMPLES = 64, 4096
STEPS = (1, 2, 4, 8)
ROUTINGS = ("by-t", "by-r", "split", "snap")


def experts(kind: str):
    """(H, L): the Gaussians whose exact PF-ODE fields are the two experts' velocity fields.

    ``near``: L's data mean / std differ from H's by ~10 % (experts that model nearby fields, as two
    experts trained on the same data do); ``far``: L's mean is mirrored and its std doubled (a stress case).
    """
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.5
    hi = GaussianData(mu, 0.5)
    if kind == "near":
        return hi, GaussianData(mu + 0.1 * torch.randn(DIM, generator=g, dtype=torch.float64), 0.55)
    return hi, GaussianData(-mu, 1.0)


def step(expert: GaussianData, student: str, z, t: float, r: float):
    """One jump t -> r of ``expert``: its exact flow map, or one Euler step of its velocity."""
    if student == "flow-map":
        return expert.flow_map(z, t, r)
    return z - (t - r) * expert.velocity(z, t)


def _exact(hi, lo, z, t: float, r: float, b: float):
    """The composed PF-ODE's exact map t -> r (r <= t): H above b, L below."""
    if r >= b:
        return hi.flow_map(z, t, r)
    if t <= b:
        return lo.flow_map(z, t, r)
    return lo.flow_map(hi.flow_map(z, t, b), b, r)


def run(jump_hi, jump_lo, grid, b: float, routing: str, z):
    """Sample along ``grid`` with a routing; ``jump_hi`` / ``jump_lo``: ``(z, t, r) -> z_r``, one jump of each
    expert (also used by benchmarks/two_expert_training.py with trained experts). Returns (x, NFE)."""
    if routing == "snap":  # the library's grid: what FlowMapEulerSampler(..., boundary=b) samples on
        grid = two_expert_time_grid(len(grid) - 1, 5.0, b)
    grid = [float(v) for v in grid]
    nfe = 0
    for t, r in zip(grid[:-1], grid[1:]):
        crosses = t > b > r
        if routing in ("split", "snap") and crosses:
            z = jump_lo(jump_hi(z, t, b), b, r)
            nfe += 2
            continue
        if routing == "by-t":  # diffusers' rule for the start time: H at t >= b
            z = (jump_hi if t >= b else jump_lo)(z, t, r)
        else:  # by-r; split / snap on a step that does not cross: the region the step lies in
            # (r >= b: [r, t] is H's; else L's, a step starting exactly at b included, which the rule
            # "t >= b -> H" would give to the wrong expert)
            z = (jump_hi if r >= b else jump_lo)(z, t, r)
        nfe += 1
    return z, nfe


def experiment(boundaries=(0.875, 0.9)):
    rows = []
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(SAMPLES, DIM, generator=g, dtype=torch.float64)
    for kind in ("near", "far"):
        hi, lo = experts(kind)
        for b in boundaries:
            for n in STEPS:
                grid = flow_map_time_grid(n)
                exact = noise
                for t, r in zip(grid[:-1].tolist(), grid[1:].tolist()):
                    exact = _exact(hi, lo, exact, t, r, b)
                scale = exact.pow(2).mean().sqrt().item()
                for student in ("flow-map", "euler"):
                    for routing in ROUTINGS:
                        x, nfe = run(functools.partial(step, hi, student), functools.partial(step, lo, student),
                                     grid, b, routing, noise)
                        err = (x - exact).pow(2).mean().sqrt().item() / scale
                        rows.append(dict(experts=kind, boundary=b, steps=n, student=student, routing=routing,
                                         nfe=nfe, rel_rms_error=err))
    return rows


def markdown(rows) -> str:
    out = ["# Two-expert routing of an any-step flow map (Gaussian closed form)", "",
           "Written by `benchmarks/two_expert_routing.py` (see its docstring). Relative RMS error of the final",
           "sample against the exact composed (H above b, L below) map of the same noise; NFE = expert",
           "evaluations. Grid: Wan's shift-5 flow-map grid; `snap` moves its point nearest b onto b.", ""]
    for kind in ("near", "far"):
        for b in sorted({r["boundary"] for r in rows}):
            for student in ("flow-map", "euler"):
                sel = [r for r in rows if (r["experts"], r["boundary"], r["student"]) == (kind, b, student)]
                out.append(f"## experts `{kind}`, boundary {b}, student: "
                           + ("exact per-expert flow map (ideal any-step student)" if student == "flow-map"
                              else "one Euler step of the expert's velocity (undistilled teacher)"))
                out.append("")
                out.append("| N | " + " | ".join(f"{r} (NFE)" for r in ROUTINGS) + " |")
                out.append("|---|" + "---|" * len(ROUTINGS))
                for n in STEPS:
                    cells = []
                    for routing in ROUTINGS:
                        r = next(x for x in sel if x["steps"] == n and x["routing"] == routing)
                        cells.append(f"{r['rel_rms_error']:.2e} ({r['nfe']})")
                    out.append(f"| {n} | " + " | ".join(cells) + " |")
                out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "two_expert_routing"),
                   help="output path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    rows = experiment()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(dim=DIM, samples=SAMPLES, shift=5.0, rows=rows), f, indent=1)
    text = markdown(rows)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
