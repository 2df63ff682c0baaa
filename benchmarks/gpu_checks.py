#!/usr/bin/env python
"""The model against diffusers on the suite's device (`benchmarks/gpu_suite.sh`, part "correctness").

The megatron-core Wan / AnyFlow DiT and diffusers' ``AnyFlowTransformer3DModel`` with the same weights
(``hf_to_megatron``), forward and the gradient w.r.t. the latents, in fp32 (TF32 off) and in bf16 (the
model in bf16 against diffusers in fp32), with the attention kernel ``auto`` resolves to. Norm-wise
relative errors; limits: fp32 1e-4 (the CPU tests hold 1e-5; CUDA kernels reorder sums), bf16 3e-2.
Writes a markdown table and JSON; exits 1 if a limit is broken.

    python benchmarks/gpu_checks.py --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

LIMITS = {"fp32": 1e-4, "bf16": 3e-2}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(dtype_name: str, device: torch.device, shape, heads: int, head_dim: int) -> dict:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("B", "F", "H", "W"),
                   help="latents (default 2 5 32 32 on CUDA, 1 3 8 8 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="default 4 (CUDA: x 128 wide heads), 2 x 32 on CPU")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shape = tuple(a.shape or ((2, 5, 32, 32) if cuda else (1, 3, 8, 8)))
    heads, head_dim = (a.heads or 4, 128) if cuda else (a.heads or 2, 32)
    rows = []
    for dt in ("fp32", "bf16"):
        try:
            rows.append(check(dt, device, shape, heads, head_dim))
        except Exception as e:  # noqa: BLE001 -- reported as a failed check
            rows.append({"dtype": dt, "device": str(device), "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    md = [f"# Model vs diffusers on {torch.cuda.get_device_name() if cuda else 'CPU'}", "",
          "| dtype | attention | forward rel. err | d latents rel. err | limit | ok |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['dtype']} | | {r['error']} | | | no |")
        else:
            md.append(f"| {r['dtype']} | {r['attention']} | {r['forward_rel_err']:.3e} | {r['grad_rel_err']:.3e} | "
                      f"{r['limit']:.0e} | {'yes' if r['ok'] else 'NO'} |")
    text = "\n".join(md) + "\n"
    print(text, flush=True)
    for path, body in ((a.json, json.dumps(rows, indent=1) + "\n"), (a.markdown, text)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(body)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
