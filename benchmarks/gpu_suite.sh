#!/usr/bin/env bash
# One prepared GPU call: every CUDA check and benchmark of this project, each part under its own time
# limit, results written as they come to benchmarks/results/<date>_<device>/ (one log per part, its
# markdown / JSON where the part writes one, summary.md rewritten after every part, so a timeout or a
# killed call keeps what was measured).
#
#   bash benchmarks/gpu_suite.sh                   # on a GPU machine (about 9 minutes in all)
#   GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh   # CPU dry run: the same parts at tiny sizes (tests/test_gpu_suite.py)
#
# Parts, in order (budget in seconds; each part also stops at the suite's own deadline):
#   01_env                 nvidia-smi, versions                                                  20
#   02_pytest_gpu          pytest -m gpu over the files that have GPU tests; tests/test_kernels.py
#                          (on CUDA its Triton kernels are compiled and checked for real)        75
#   03_model_vs_diffusers  benchmarks/gpu_checks.py: fp32 and bf16, forward and d latents         45
#   04_steps               pretrain_anyflow.py: one stage-1 and one stage-2 iteration (tiny)     50
#   05_attention           tools/benchmark_attention.py: matmul / copy ceilings, each attention
#                          kernel at the 1.3B and 14B shapes                                     50
#   06_throughput_t_s1     tools/benchmark_throughput.py teacher + stage 1 vs the reference,
#                          then one more iteration of each of our rows under torch.profiler     150
#   07_profile_stage1      06's stage-1 profile: time per kernel category (attention, GEMM,
#                          elementwise, communication)                                           10
#   08_kernels             tools/benchmark_kernels.py                                            25
#   10_throughput_far      tools/benchmark_throughput.py --model far: AnyFlow-FAR stage 1 and stage 2
#                          (sequential), a 10-layer slice of 1.3B at 81 x 480 x 832, selective recompute,
#                          FAR FLOPs (block-sparse attention pairs, each iteration its own draws); runs
#                          before 09 so that the rest of the budget stays 09's                    60
#   09_throughput_stage2   tools/benchmark_throughput.py stage 2: sequential, pipelined and overlapped
#                          (pipelined + --overlap-critic: the overlap's time against pipelined), vs reference,
#                          --recompute-granularity selective (the reference: gradient checkpointing)  the rest
# Throughput: wan2.1-1.3b, 81 x 480 x 832 video (21 x 60 x 104 latents), text 512, bf16, batch 1.
#
# Environment:
#   GPU_SUITE_DRY=1        CPU, tiny sizes, each part a few seconds
#   GPU_SUITE_BUDGET_S     the whole suite's deadline in seconds (default 530 on GPU, 300 dry: a loaded CPU is slow to import)
#   GPU_SUITE_OUT          results folder (default benchmarks/results/<UTC date>_<device>)
#   GPU_SUITE_WHEELS       folder of wheels to install first (default .whl; benchmarks/prepare_gpu_wheels.sh)
#   GPU_SUITE_PARTS        space-separated subset of part names to run (default: all)
#   GPU_SUITE_PART_LIMIT_S a cap on every part's limit (default: none)
#   GPU_SUITE_THROUGHPUT_ARGS  extra options for every benchmark_throughput.py call (e.g. "--compile")
#   PYTHON                 interpreter (default python3)
#
# shellcheck disable=SC2329  # the p_* parts are called by name through run_part's `bash -c`
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=${GPU_SUITE_DRY:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
if [ "$DRY" = 1 ]; then
    BUDGET=${GPU_SUITE_BUDGET_S:-300}
    export CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu-dry
else
    BUDGET=${GPU_SUITE_BUDGET_S:-530}
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
             | sed -e 's/^NVIDIA[ _-]*//' -e 's/[^A-Za-z0-9]\{1,\}/-/g' -e 's/-$//' | tr '[:upper:]' '[:lower:]')
    DEVICE=${DEVICE:-nogpu}
fi
DEADLINE=$((START + BUDGET))
OUTDIR=${GPU_SUITE_OUT:-$REPO/benchmarks/results/$(date -u +%Y%m%d-%H%M)_$DEVICE}
mkdir -p "$OUTDIR" || exit 2
STATUS="$OUTDIR/.status"
: > "$STATUS"

# Carried wheels (megatron-core, diffusers, ...): installed into a private folder, first on the path.
WHEELS=${GPU_SUITE_WHEELS:-$REPO/.whl}
SITE=${TMPDIR:-/tmp}/gpu_suite_site
if [ "$DRY" != 1 ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl > "$OUTDIR/00_wheels.log" 2>&1 || echo "wheel install failed (see 00_wheels.log)" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project from this checkout; its Triton kernels under their import name without `pip install`.
if ! "$PY" -c "import megatron_anyflow_kernels" > /dev/null 2>&1; then
    mkdir -p "$SITE.src" && ln -sfn "$REPO/kernels/megatron_anyflow_kernels" "$SITE.src/megatron_anyflow_kernels"
    export PYTHONPATH="$SITE.src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OUTDIR PY DRY REPO

# -- sizes ------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    THR_SIZE=(--preset tiny --latent-shape 2 8 8 --text-len 8 --matmul-size 128 --simulation-steps 2 4)
    THR_ITERS=(--iters 1 --warmup 0)
    THR2_ITERS=(--iters 1 --warmup 0 --recompute-granularity selective)
    STEP_ARGS=(--model-preset tiny --mock-latent-shape 2 16 8 8 --mock-text-len 8 --num-workers 0)
    ATTN_ARGS=(--tiny --iters 1 --warmup 0)
    KERNEL_ARGS=(--device cpu --iters 2 --warmup 1)
    PYTEST_KERNELS=()  # without CUDA its Triton tests skip; the CPU suite runs the rest
    # AnyFlow-FAR: 5 one-frame chunks (teacher forcing with compressed context, rollouts through the KV cache)
    FAR_SIZE=(--preset tiny --latent-shape 5 8 8 --chunk-partition 1 1 1 1 1 --text-len 8 --matmul-size 128
              --simulation-steps 2 4)
    FAR_ITERS=(--iters 1 --warmup 0 --recompute-granularity selective)
else
    THR_SIZE=(--preset wan2.1-1.3b --frames 81 --height 480 --width 832 --text-len 512 --bf16)
    THR_ITERS=(--iters 3 --warmup 1)
    # stage 2 does not fit one GPU without recomputation: the save-attention policy here, diffusers'
    # gradient checkpointing on the reference side
    THR2_ITERS=(--iters 1 --warmup 1 --recompute-granularity selective)
    STEP_ARGS=(--model-preset tiny --mock-latent-shape 3 16 16 16 --mock-text-len 16 --bf16)
    ATTN_ARGS=()
    KERNEL_ARGS=()
    PYTEST_KERNELS=(tests/test_kernels.py)
    # AnyFlow-FAR rows on a 10-layer slice of 1.3B (per-layer rates as the whole model's; the recipe's chunks
    # (1, 3, 3, 3, 3, 3, 3, 2)): one warm-up and one timed iteration per row within the part's minute
    FAR_SIZE=(--preset wan2.1-1.3b --num-layers 10 --frames 81 --height 480 --width 832 --text-len 512 --bf16)
    FAR_ITERS=(--iters 1 --warmup 1 --recompute-granularity selective)
fi
read -r -a THR_EXTRA <<< "${GPU_SUITE_THROUGHPUT_ARGS:-}"

# -- parts ------------------------------------------------------------------------------------------
# Each runs in its own `bash -c` under `timeout` (run_part).
p_env() {
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    "$PY" - <<'EOF'
import importlib.metadata as md
import importlib.util as iu
for dist, mod in (("megatron-core", "megatron.core"), ("diffusers", "diffusers"), ("peft", "peft"),
                  ("triton", "triton"), ("transformer-engine", "transformer_engine"), ("flash-attn", "flash_attn"),
                  (None, "flash_attn_interface"), (None, "megatron_anyflow"), (None, "megatron_anyflow_kernels")):
    try:
        spec = iu.find_spec(mod)
    except ModuleNotFoundError:
        spec = None
    try:
        ver = md.version(dist) if dist else "present"
    except md.PackageNotFoundError:
        ver = "present"
    print(f"{mod}: {ver + ' (' + str(spec.origin) + ')' if spec else 'missing'}")
EOF
    git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || true
}

p_pytest_gpu() {
    local files rc=0
    mapfile -t files < <(grep -l "pytest.mark.gpu" tests/*.py)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu "${files[@]}" || rc=$?
    if [ "${#PYTEST_KERNELS[@]}" -gt 0 ]; then
        "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_KERNELS[@]}" || rc=$?
    fi
    return "$rc"
}

p_model_vs_diffusers() {
    "$PY" benchmarks/gpu_checks.py --json "$OUTDIR/03_model_vs_diffusers.json" --markdown "$OUTDIR/03_model_vs_diffusers.md"
}

p_steps() {
    local rc=0 stage pids=()
    for stage in stage1 stage2; do  # side by side: tiny models, the start-up dominates
        "$PY" pretrain_anyflow.py --stage "$stage" --mock-data --mock-num-samples 8 --micro-batch-size 1 \
            --train-iters 1 --log-interval 1 --simulation-steps 2 4 "${STEP_ARGS[@]}" > "$OUTDIR/04_steps_$stage.txt" 2>&1 &
        pids+=("$!")
    done
    for i in 0 1; do
        wait "${pids[$i]}" || rc=$?
    done
    for stage in stage1 stage2; do
        echo "== one $stage iteration"
        cat "$OUTDIR/04_steps_$stage.txt"
        rm -f "$OUTDIR/04_steps_$stage.txt"
    done
    return "$rc"
}

p_attention() {
    "$PY" tools/benchmark_attention.py "${ATTN_ARGS[@]}" --json "$OUTDIR/05_attention.json" \
        --markdown "$OUTDIR/05_attention.md"
}

p_throughput_t_s1() {
    "$PY" tools/benchmark_throughput.py "${THR_SIZE[@]}" "${THR_ITERS[@]}" --steps teacher stage1 --profile \
        "${THR_EXTRA[@]}" --json "$OUTDIR/06_throughput_t_s1.json" --markdown "$OUTDIR/06_throughput_t_s1.md"
}

p_profile_stage1() {  # the stage-1 row of 06 profiled one extra iteration (--profile): its table alone
    "$PY" - "$OUTDIR/06_throughput_t_s1.json" "$OUTDIR/07_profile_stage1.md" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
row = next(r for r in rep["rows"] if r["step"] == "stage1" and r["implementation"] == "megatron_anyflow")
if "profile" not in row:
    sys.exit(f"no profile in the stage-1 row: {row.get('profile_error') or row.get('error')}")
p, m = row["profile"], rep["meta"]
out = [f"# One stage-1 iteration of {m['preset']} on {m['device']}, by kernel category", "",
       f"{p['source']}; torch.profiler key averages grouped by name (megatron_anyflow.training.benchmark."
       f"KERNEL_CATEGORIES); the timed iterations ran {row['s_per_iter']:.4g} s each.", "",
       "| category | ms | share | calls |", "|---|---:|---:|---:|"]
out += [f"| {k} | {v['ms']:.2f} | {100 * v['share']:.1f} % | {v['calls']} |" for k, v in p["categories"].items()]
out += ["", "| top kernels | category | ms | calls |", "|---|---|---:|---:|"]
out += [f"| `{t['name']}` | {t['category']} | {t['ms']:.2f} | {t['calls']} |" for t in p["top"]]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
}

p_kernels() {
    "$PY" tools/benchmark_kernels.py "${KERNEL_ARGS[@]}" --json "$OUTDIR/08_kernels.json" \
        | tee "$OUTDIR/08_kernels.md"
}

p_throughput_stage2() {
    "$PY" tools/benchmark_throughput.py "${THR_SIZE[@]}" "${THR2_ITERS[@]}" --steps stage2 \
        --schedules sequential pipelined overlapped "${THR_EXTRA[@]}" \
        --json "$OUTDIR/09_throughput_stage2.json" --markdown "$OUTDIR/09_throughput_stage2.md"
}

p_throughput_far() {
    "$PY" tools/benchmark_throughput.py --model far "${FAR_SIZE[@]}" "${FAR_ITERS[@]}" --steps stage1 stage2 \
        --schedules sequential "${THR_EXTRA[@]}" --json "$OUTDIR/10_throughput_far.json" \
        --markdown "$OUTDIR/10_throughput_far.md"
}

PARTS=(
    "01_env 20 p_env"
    "02_pytest_gpu 75 p_pytest_gpu"
    "03_model_vs_diffusers 45 p_model_vs_diffusers"
    "04_steps 50 p_steps"
    "05_attention 50 p_attention"
    "06_throughput_t_s1 150 p_throughput_t_s1"
    "07_profile_stage1 10 p_profile_stage1"
    "08_kernels 25 p_kernels"
    "10_throughput_far 60 p_throughput_far"
    "09_throughput_stage2 100000 p_throughput_stage2"
)

summary() {
    {
        echo "# GPU suite: $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        if [ "$DRY" = 1 ]; then
            echo "**Dry run on the CPU at tiny sizes** (GPU_SUITE_DRY=1): checks that every part runs; no figure here says anything about GPU speed."
            echo
        fi
        echo "Command: \`bash benchmarks/gpu_suite.sh\`, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s."
        echo
        echo "| part | status | exit | seconds | limit (s) |"
        echo "|---|---|---:|---:|---:|"
        cat "$STATUS"
        local f
        for f in "$OUTDIR"/[0-9][0-9]_*.md; do
            [ -e "$f" ] || continue
            echo
            echo "## $(basename "$f" .md)"
            echo
            head -n 60 "$f"
        done
    } > "$OUTDIR/summary.md.tmp" && mv "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
}

run_part() {
    local name=$1 budget=$2 fn=$3 now left limit t0 rc status
    if [ -n "${GPU_SUITE_PARTS:-}" ] && [[ " $GPU_SUITE_PARTS " != *" $name "* ]]; then
        return 0
    fi
    now=$(date +%s)
    left=$((DEADLINE - now - 3))
    if [ "$left" -lt 5 ]; then
        echo "skipped: the suite's deadline (${BUDGET} s) has passed" > "$OUTDIR/$name.log"
        echo "| $name | skipped (out of time) | | 0 | 0 |" >> "$STATUS"
        summary
        return 0
    fi
    limit=$((budget < left ? budget : left))
    if [ -n "${GPU_SUITE_PART_LIMIT_S:-}" ] && [ "$GPU_SUITE_PART_LIMIT_S" -lt "$limit" ]; then
        limit=$GPU_SUITE_PART_LIMIT_S
    fi
    echo "[gpu_suite] $name (limit ${limit} s) -> $OUTDIR/$name.log"
    t0=$(date +%s)
    # shellcheck disable=SC2163  # exports the function that $fn names
    export -f "$fn"
    # shellcheck disable=SC2016  # expanded by the inner shell
    timeout -k 5 "$limit" bash -c 'eval "$ARRAYS"; "$0"' "$fn" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (partial results kept)" ;;
        *) status=FAILED ;;
    esac
    echo "[gpu_suite] $name: $status (exit $rc, $(($(date +%s) - t0)) s)"
    echo "| $name | $status | $rc | $(($(date +%s) - t0)) | $limit |" >> "$STATUS"
    summary
}

# arrays do not cross `bash -c`: the parts read them from these declarations
ARRAYS=$(declare -p THR_SIZE THR_ITERS THR2_ITERS STEP_ARGS ATTN_ARGS KERNEL_ARGS PYTEST_KERNELS THR_EXTRA FAR_SIZE \
         FAR_ITERS)
export ARRAYS
for part in "${PARTS[@]}"; do
    read -r name budget fn <<< "$part"
    run_part "$name" "$budget" "$fn"
done
summary
echo "[gpu_suite] done in $(($(date +%s) - START)) s: $OUTDIR/summary.md"
grep -q "FAILED\|TIMEOUT\|skipped" "$STATUS" && exit 1
exit 0
