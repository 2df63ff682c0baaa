"""The stage-1 diagnostics of a trainer log, one row per logged iteration (issue #17).

    python benchmarks/results/stage1_sweep/log_diagnostics.py RUN/train.log [metric ...]
"""
import re
import sys

log = sys.argv[1]
keys = sys.argv[2:] or ["loss_boundary", "loss_r0", "loss_free", "rw_mean", "rw_max", "fd/v_r0", "fd/v_free",
                        "generator/grad_norm", "generator/gn_temb", "generator/gn_attn", "generator/gn_ffn",
                        "generator/B_temb", "generator/B_attn", "generator/B_ffn"]
short = [k.replace("generator/", "") for k in keys]
print("it    " + " ".join(f"{s:>10s}" for s in short))
for line in open(log):
    m = re.match(r"\s*iteration\s+(\d+)/", line)
    if not m:
        continue
    vals = dict(re.findall(r"\| ([\w/]+) ([-\d.e+]+)", line))
    print(f"{int(m.group(1)):5d} " + " ".join(f"{float(vals[k]):10.4g}" if k in vals else f"{'-':>10s}" for k in keys))
