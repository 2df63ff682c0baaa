#!/usr/bin/env python
"""The model against diffusers on the suite's device (`benchmarks/gpu_suite.sh`, part "correctness").

The megatron-core Wan / AnyFlow DiT and diffusers' ``AnyFlowTransformer3DModel`` with the same weights
(``hf_to_megatron``), forward and the gradient w.r.t. the latents, in fp32 (TF32 off) and in bf16 (the
model in bf16 against diffusers in fp32), with the attention kernel ``auto`` resolves to. Norm-wise
relative errors; limits: fp32 1e-4 (the CPU tests hold 1e-5; CUDA kernels reorder sums), bf16 3e-2.
Writes a markdown table and JSON (rewritten after each row, atomically); exits 1 if a limit is broken.

Two helpers of the suite live here too, neither importing torch:

* ``--budgets``: the suite's part estimates on an H200 (`gpu_budgets`), derived from the FLOP count of
  each part's rows and the CPU seconds of each part in the suite's CPU dry run; `benchmarks/gpu_suite.sh`
  carries them in its PARTS table and `tests/test_gpu_suite.py` checks that the two agree.
* ``--stub PART --seconds T``: a stand-in for a part in the suite's ``GPU_SUITE_DRY=stub`` mode (the
  suite's mechanics -- order, budgets, archives, kills -- without torch): it writes the part's rows one
  by one over T seconds, JSON and markdown rewritten after each.

    python benchmarks/gpu_checks.py --json out.json --markdown out.md
    python benchmarks/gpu_checks.py --budgets
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

LIMITS = {"fp32": 1e-4, "bf16": 3e-2}


def write_atomic(path: str, text: str) -> None:
    """Temporary file + os.replace (as `megatron_anyflow.measure.report.write_atomic`, without torch)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# the suite's budgets
# ------------------------------------------------------------------------------------------------
#: CPU seconds (user + system, all processes) of each part in the suite's CPU dry run (GPU_SUITE_DRY=1,
#: tiny sizes; the "cpu s" column of its summary, 2 cores, 2026-12): process start-up, imports, model
#: building and the host-side work. A GPU run does the same host work on similar cores, so this is the
#: part's start-up term on the GPU. It is also each part's estimate in the dry mode itself.
DRY_CPU_S = {"01_env": 14, "02_model_vs_diffusers": 16, "03_stage1": 22, "04_generation": 14, "05_profile_stage1": 18,
             "06_stage2": 30, "07_attention": 12, "08_far": 26, "09_kernels": 8, "10_pytest_gpu": 40,
             "11_steps": 30, "12_teacher": 20}
GPU_RATE = 790e12  # bf16 dense matmul measured on the H200 this suite is sized for (data sheet: 989)
MFU_OURS, MFU_REF = 0.35, 0.25  # assumed model-FLOP fractions of GPU_RATE (ours: selective recompute,
#                                 fused attention; the reference: eager, full gradient checkpointing)
GENERATION_STEPS = (1, 4)  # 04_generation: N per video (the comparison points)
BUILD_S = 8.0  # one 1.3B model (+ adapters, optimiser) built and moved to the GPU, per row
COMPILE_S = 60.0  # 09_kernels with torch.compile: ~6 graphs (only when this much is left)
GPU_FIXED_S = {"01_env": 3, "02_model_vs_diffusers": 4, "09_kernels": 6, "10_pytest_gpu": 30, "11_steps": 10}
SUITE_ITERS = {"stage1": (1, 2), "generation": (1, 2), "profile": (1, 1), "stage2": (1, 1), "far": (1, 1),
               "teacher": (1, 2)}  # (warm-up, timed)


def gpu_budgets(detail: bool = False):
    """Each part's estimate in seconds on one H200 at the suite's GPU sizes (1.3B, 81 x 480 x 832, text 512):
    ``DRY_CPU_S`` (start-up and host work) + the model FLOPs of its rows' iterations at ``MFU_OURS`` /
    ``MFU_REF`` x ``GPU_RATE`` + ``BUILD_S`` per row (+ ``GPU_FIXED_S`` where a part has no FLOP count).
    Integers, as `benchmarks/gpu_suite.sh` carries them. ``detail``: also the terms."""
    import argparse as _ap

    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.measure.harness import stage2_plans
    from megatron_anyflow.measure.flops import far_inference_flops, forward_flops, rollout_segments, step_flops

    cfg = wan_config("wan2.1-1.3b")
    shape = (21, 60, 104, 512)
    ours, ref = GPU_RATE * MFU_OURS, GPU_RATE * MFU_REF
    fl = {s: step_flops(cfg, s, *shape).flops_per_sample for s in ("teacher", "stage1")}

    def s2(it: int, schedule: str) -> float:  # stage 2, iteration it: its own rollout draw (the trainer's seeds)
        (N, k), = stage2_plans(_ap.Namespace(seed=1234, simulation_steps=[2, 4, 8, 16, 50]), [it])
        n = rollout_segments(N, k)
        return (step_flops(cfg, "stage2_generator", *shape, rollout_grad_segments=n).flops_per_sample
                + step_flops(cfg, "stage2_critic", *shape, rollout_segments=n if schedule == "sequential" else 0
                             ).flops_per_sample)

    w, t = SUITE_ITERS["stage1"]
    compute = {"03_stage1": ((w + t) * fl["stage1"] / ours + (w + t) * fl["stage1"] / ref, 2)}
    # generation: per N, (1 + 2) videos of each implementation, bidirectional (N forwards) and FAR (N steps per
    # chunk + the prefills, the recipe's chunks); no backward, so forward MFU is taken as the training one
    w, t = SUITE_ITERS["generation"]
    gen = sum(N * forward_flops(cfg, *shape) + far_inference_flops(cfg, shape[1], shape[2], N, shape[3],
                                                                   (1, 3, 3, 3, 3, 3, 3, 2))
              for N in GENERATION_STEPS)
    compute["04_generation"] = ((w + t) * gen * (1 / ours + 1 / ref), 2)  # builds: one pair per model kind
    w, t = SUITE_ITERS["profile"]
    compute["05_profile_stage1"] = ((w + t + 1.5) * fl["stage1"] / ours, 1)  # + one profiled (x 1.5) iteration
    w, t = SUITE_ITERS["stage2"]
    its = range(w + t)
    compute["06_stage2"] = (sum(s2(i, "pipelined") for i in its) * (1 / ours + 1 / ref)
                            + sum(s2(i, "sequential") for i in its) * (1 / ours + 1 / ref)
                            + sum(s2(i, "pipelined") for i in its) / ours, 5)  # overlapped: ours only
    # attention: 1.3B and 14B self / cross at 32,760 tokens; ~3 kernels run (auto, cudnn, sdpa; math is over
    # its memory cap, flash / fa3 absent); (1 + 5) forward and (1 + 5) forward + backward (3.5x) calls; 60 %
    attn = sum(4 * sq * sk * n * 128 for sq, sk, n in ((32760, 32760, 12), (32760, 512, 12), (32760, 32760, 40),
                                                        (32760, 512, 40)))
    compute["07_attention"] = (3 * 6 * 4.5 * attn / (0.6 * GPU_RATE), 0)
    # AnyFlow-FAR on a 10-layer slice: ~10/30 of the 1.3B stage rows, x 1.3 for the FAR layout's extra tokens
    w, t = SUITE_ITERS["far"]
    far = 10 / 30 * 1.3
    compute["08_far"] = ((w + t) * far * (fl["stage1"] + sum(s2(i, "sequential") for i in range(w + t)) / (w + t))
                         / ours, 2 * 0.5)
    w, t = SUITE_ITERS["teacher"]
    compute["12_teacher"] = ((w + t) * fl["teacher"] * (1 / ours + 1 / ref), 2)
    out, terms = {}, {}
    for part, cpu in DRY_CPU_S.items():
        flop_s, builds = compute.get(part, (0.0, 0))
        est = cpu + flop_s + builds * BUILD_S + GPU_FIXED_S.get(part, 0)
        out[part] = int(round(est))
        terms[part] = {"dry_cpu_s": cpu, "flops_s": round(flop_s, 1), "build_s": builds * BUILD_S,
                       "fixed_s": GPU_FIXED_S.get(part, 0), "estimate_s": out[part]}
    return (out, terms) if detail else out


def budgets_markdown() -> str:
    out, terms = gpu_budgets(detail=True)
    lines = [f"| part | dry-run CPU s | FLOPs at {MFU_OURS:.0%} / {MFU_REF:.0%} of {GPU_RATE / 1e12:.0f} TFLOP/s | "
             "model builds | fixed | estimate (s) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {p} | {t['dry_cpu_s']} | {t['flops_s']} | {t['build_s']:.0f} | {t['fixed_s']} | {t['estimate_s']} |"
              for p, t in terms.items()]
    lines.append(f"| total | | | | | {sum(out.values())} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# the stub parts of GPU_SUITE_DRY=stub
# ------------------------------------------------------------------------------------------------
STUB_ROWS = {
    "02_model_vs_diffusers": ["fp32", "bf16"],
    "03_stage1": ["stage1 megatron_anyflow", "stage1 reference"],
    "04_generation": [f"{m} N={n} {i}" for m in ("bidirectional", "far") for n in GENERATION_STEPS
                      for i in ("megatron_anyflow", "diffusers")],
    "05_profile_stage1": ["stage1 megatron_anyflow (profiled)"],
    "06_stage2": ["sequential megatron_anyflow", "sequential reference", "pipelined megatron_anyflow",
                  "pipelined reference", "overlapped megatron_anyflow"],
    "07_attention": ["1.3b-self", "1.3b-cross", "14b-self", "14b-cross"],
    "08_far": ["FAR stage1", "FAR stage2"],
    "09_kernels": ["flow_map_loss fwd", "flow_map_loss fwd+bwd", "adaptive_reweight fwd", "adaptive_reweight fwd+bwd"],
    "12_teacher": ["teacher megatron_anyflow", "teacher reference"],
}


def stub(part: str, seconds: float, json_path: str, md_path: str, note: str = "") -> int:
    rows, labels = [], STUB_ROWS.get(part, ["row"])

    def write(complete: bool):
        meta = {"stub": True, "part": part, "complete": complete, "rows_planned": len(labels), "note": note}
        write_atomic(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        md = [f"# {part} (stub: GPU_SUITE_DRY=stub, no measurement)", ""]
        if not complete:
            md += [f"**Partial: {len(rows)} of {len(labels)} rows**", ""]
        md += ([note, ""] if note else []) + ["| row | seconds |", "|---|---:|"]
        md += [f"| {r['label']} | {r['seconds']:.2f} |" for r in rows]
        write_atomic(md_path, "\n".join(md) + "\n")

    write(False)
    for label in labels:
        t0 = time.perf_counter()
        time.sleep(seconds / len(labels))
        rows.append({"label": label, "seconds": time.perf_counter() - t0})
        print(f"{part}: {label} done", flush=True)
        write(False)
    write(True)
    return 0


def rel(a, b) -> float:  # noqa: D103
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(dtype_name: str, device, shape, heads: int, head_dim: int) -> dict:
    import torch
    from diffusers import AnyFlowTransformer3DModel

    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.convert import hf_to_megatron, load_full_state_dict
    from megatron_anyflow.models.wan.model import WanModel

    h = heads * head_dim
    kw = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16, text_dim=384,
              freq_dim=32, ffn_dim=4 * h, num_layers=2)
    torch.manual_seed(0)
    hf = AnyFlowTransformer3DModel(**kw).eval().to(device)
    bf16 = dtype_name == "bf16"
    model = WanModel(wan_config("tiny", hidden_size=h, num_attention_heads=heads, ffn_hidden_size=4 * h,
                                num_layers=2, bf16=bf16, attention_impl="auto"))
    load_full_state_dict(model, hf_to_megatron(hf.state_dict(), head_dim), "diffusers")
    model = model.eval().to(device)
    b, f, H, W = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, f, 16, H, W, generator=g).to(device)
    t = (torch.rand(b, 1, generator=g) * 1000).expand(b, f).contiguous().to(device)  # [b, f] (diffusers' layout)
    r = t * torch.rand(b, 1, generator=g).to(device)
    txt = torch.randn(b, 7, 384, generator=g).to(device)
    xr = x.clone().requires_grad_(True)
    ref = hf(xr, t, r, txt, return_dict=False)[0]
    ref.float().square().sum().backward()
    xm = (x.bfloat16() if bf16 else x).clone().requires_grad_(True)
    out = model(xm, t, r, txt.bfloat16() if bf16 else txt)
    out.float().square().sum().backward()
    res = {"dtype": dtype_name, "device": str(device), "shape": list(shape), "hidden": h,
           "attention": getattr(model.blocks[0].self_attention.core_attention, "resolved", None),
           "forward_rel_err": rel(out.float(), ref.float()), "grad_rel_err": rel(xm.grad.float(), xr.grad.float()),
           "limit": LIMITS[dtype_name]}
    res["ok"] = res["forward_rel_err"] < res["limit"] and res["grad_rel_err"] < res["limit"]
    return res


def markdown(rows, title: str) -> str:
    md = [f"# Model vs diffusers on {title}", "",
          "| dtype | attention | forward rel. err | d latents rel. err | limit | ok |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['dtype']} | | {r['error']} | | | no |")
        else:
            md.append(f"| {r['dtype']} | {r['attention']} | {r['forward_rel_err']:.3e} | {r['grad_rel_err']:.3e} | "
                      f"{r['limit']:.0e} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("B", "F", "H", "W"),
                   help="latents (default 2 5 32 32 on CUDA, 1 3 8 8 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="default 4 (CUDA: x 128 wide heads), 2 x 32 on CPU")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--budgets", action="store_true", help="print the suite's derived part estimates and exit")
    p.add_argument("--stub", default=None, metavar="PART", help="the stand-in of a suite part (GPU_SUITE_DRY=stub)")
    p.add_argument("--seconds", type=float, default=1.0, help="--stub: how long its rows take in all")
    p.add_argument("--note", default="", help="--stub: a line for its markdown")
    a = p.parse_args(argv)
    if a.budgets:
        print(budgets_markdown(), end="")
        print(json.dumps(gpu_budgets()))
        return 0
    if a.stub:
        return stub(a.stub, a.seconds, a.json or f"{a.stub}.json", a.markdown or f"{a.stub}.md", a.note)
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shape = tuple(a.shape or ((2, 5, 32, 32) if cuda else (1, 3, 8, 8)))
    heads, head_dim = (a.heads or 4, 128) if cuda else (a.heads or 2, 32)
    title = torch.cuda.get_device_name() if cuda else "CPU"
    rows = []
    for dt in ("fp32", "bf16"):
        try:
            rows.append(check(dt, device, shape, heads, head_dim))
        except Exception as e:  # noqa: BLE001 -- reported as a failed check
            rows.append({"dtype": dt, "device": str(device), "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
        for path, body in ((a.json, json.dumps(rows, indent=1) + "\n"), (a.markdown, markdown(rows, title))):
            if path:  # after every row: a cut keeps the rows so far
                write_atomic(path, body)
    print(markdown(rows, title), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
