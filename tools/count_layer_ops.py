#!/usr/bin/env python
"""Kernels launched, bytes moved and activation bytes saved per Wan block (forward + backward), on CPU.

    python tools/count_layer_ops.py [--preset tiny-video] [--grid 2 8 8] [--label before]

A thin command line over `megatron_anyflow.measure.op_counter` (see its docstring for what is counted).
Prints a table and writes ``benchmarks/results/layer_ops_<date>_cpu[_<label>].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-video")
    p.add_argument("--grid", type=int, nargs=3, default=[2, 8, 8], metavar=("F", "H", "W"),
                   help="patched token grid (tokens = F * H * W)")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--label", default="", help="suffix of the result files (e.g. before / after)")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--cases", nargs="*", default=None, help="subset of case labels (default: all)")
    args = p.parse_args(argv)

    import torch

    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.measure.op_counter import DEFAULT_CASES, measure_block

    torch.set_num_threads(1)
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    rows, details = [], []
    for label, kw in DEFAULT_CASES:
        if args.cases and label not in args.cases:
            continue
        kw = dict(kw)
        m = measure_block(label, preset=args.preset, grid=tuple(args.grid), text_len=args.text_len, **kw)
        rows.append(m.row())
        details.append({**m.row(), "saved_by_dtype_per_token": m.saved_by_dtype_per_token, "top_ops": m.top_ops})
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    head = (f"Per Wan block (one layer), forward + backward, preset {args.preset}, token grid {tuple(args.grid)}, "
            f"text {args.text_len}, LoRA on every default target; CPU ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {date} UTC. `python tools/count_layer_ops.py"
            + (f" --label {args.label}" if args.label else "") + "`")
    print(head)
    print("\n".join(table))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"layer_ops_{date}_cpu" + (f"_{args.label}" if args.label else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": {"preset": args.preset, "grid": args.grid, "text_len": args.text_len, "date": date,
                            "device": "cpu", "torch": torch.__version__, "label": args.label},
                   "rows": details}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(head + "\n\n" + "\n".join(table) + "\n\nTop ops per case (forward + backward calls):\n\n")
        for d in details:
            f.write(f"- {d['config']}: " + ", ".join(f"{k} {v}" for k, v in d["top_ops"].items()) + "\n")
    print(f"wrote {stem}.json / .md")
    return rows


if __name__ == "__main__":
    main()
