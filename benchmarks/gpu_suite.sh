#!/usr/bin/env bash
# One prepared GPU call: every CUDA check and benchmark of this project, ordered by value, brought back
# whole or in part under $OUT however the call ends.
#
# On a lent GPU (the one command; README.md, section Benchmarks):
#   here:   bash benchmarks/prepare_gpu_wheels.sh     # .whl/: megatron-core, diffusers, ... and .whl/COMMIT
#   device: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600, kind="nvidia-h200")
# CPU dry runs (tests/test_gpu_suite.py):
#   GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh      # the same tools at tiny sizes on the CPU
#   GPU_SUITE_DRY=stub bash benchmarks/gpu_suite.sh   # the suite's mechanics only: each part a stand-in
#                                                     # (benchmarks/gpu_checks.py --stub) writing its rows
#
# The machine: one H200 (nvidia-h200). 1.3B at 81 x 480 x 832 with selective recompute is planned at
# 32.7 GiB (stage 1) and 67.8 GiB (stage 2, tools/memory_plan.py), which leaves an H100's 79.6 GiB no room
# for the reference's and the allocator's peaks; stage 1 without recompute (108.6 GiB) fits no 80 GB card.
# The budgets below are sized for the H200; on another card the summary says so.
#
# What comes back: $OUT (GPU_SUITE_OUT) holds at most 6 files at any moment: results.tgz (every part's
# log, JSON and markdown so far, re-packed after every part and every 20 s by a background packer,
# replaced atomically), summary.md (the headline first, then the status of every part) and
# suite_stdout.txt (this script's own progress); transiently .results.tgz.fg / .bg and .summary.md.tmp.
# The parts write into a work folder outside $OUT (GPU_SUITE_WORK), packed as results.tgz:<stem>/...
#
# Parts, by value (estimate on an H200 in seconds: `python benchmarks/gpu_checks.py --budgets` derives
# them from each part's CPU seconds in the dry run and the FLOP count of its rows; checked by the tests):
#   01_env                 the wheels (installed first; exit 3 if megatron.core, diffusers or peft do not
#                          import), nvidia-smi, versions, the commit                                17
#   02_model_vs_diffusers  benchmarks/gpu_checks.py: fp32 and bf16, forward and d latents          20
#   03_stage1              benchmark_throughput stage 1, ours then the reference (diffusers' gradient
#                          checkpointing), --recompute-granularity selective, 1 + 2 iterations      82
#   04_generation          benchmark_generation: model time per video at N = 1 and 4, bidirectional
#                          and FAR, ours then diffusers' AnyFlowPipeline / AnyFlowFARPipeline, 1 + 2 103
#   05_profile_stage1      our stage-1 iteration under torch.profiler: time per kernel category      47
#   06_stage2              stage 2 sequential (ours, reference), pipelined (ours, reference), overlapped
#                          (ours), selective recompute, 1 + 1 iterations                            294
#   07_attention           benchmark_attention: matmul / copy ceilings, each kernel at 1.3B / 14B    17
#   08_far                 benchmark_throughput --model far: FAR stages 1 and 2, 10-layer slice      57
#   09_kernels             benchmark_kernels (torch.compile rows only if 60 s more are left)         14
#   10_pytest_gpu          pytest -m gpu, tests/test_kernels.py (Triton compiled for real)           70
#   11_steps               pretrain_anyflow.py: one stage-1 and one stage-2 iteration (tiny)         40
#   12_teacher             benchmark_throughput teacher, ours then the reference                     58
# Throughput and generation rows: wan2.1-1.3b, 81 x 480 x 832 video (21 x 60 x 104 latents), text 512,
# bf16, batch 1 (generation: one video, text encoding and VAE excluded); every tool rewrites its JSON and markdown after each row, and ours and the reference alternate per row.
#
# Time: the budget B (GPU_SUITE_BUDGET_S, default 560: the device's 600 s less the transfers) is a hard
# stop: the last summary and archive are written by B. Each estimate scales by B / 560 (dry: by B over the
# dry budget). A part may run until the time left, less the estimates of the parts after it, but always
# for its own estimate when that much is left (value order: a late part gives way to an earlier one), so
# what an early part leaves goes to whatever is still running. SIGTERM / SIGINT stop the running part,
# then the summary and the archive are written.
#
# Environment:
#   GPU_SUITE_DRY          0 (GPU), 1 (CPU, tiny sizes) or stub (the mechanics only)
#   GPU_SUITE_BUDGET_S     the hard stop in seconds (default 560 GPU, 900 dry, 60 stub)
#   GPU_SUITE_OUT          where results.tgz / summary.md / suite_stdout.txt go (default $OUT when set,
#                          else benchmarks/results/<UTC date>_<device>)
#   GPU_SUITE_WORK         the work folder (default a new folder under ${TMPDIR:-/tmp})
#   GPU_SUITE_WHEELS       wheels to install first (default .whl; benchmarks/prepare_gpu_wheels.sh). Dry
#                          modes install none unless this is set
#   GPU_SUITE_COMMIT       the commit measured (default: $GPU_SUITE_WHEELS/COMMIT, else git, else ?)
#   GPU_SUITE_PARTS        space-separated subset of part names (default: all)
#   GPU_SUITE_PACK_S       seconds between background packs (default 20)
#   GPU_SUITE_STUB_FRACTION  stub mode: the share of its limit each stand-in part takes (default 0.5)
#   GPU_SUITE_THROUGHPUT_ARGS  extra options for every benchmark_throughput.py call (e.g. "--compile")
#   PYTHON                 interpreter (default python3)
# Exit: 0 all parts ok; 1 a part failed, timed out or was skipped; 3 the packages are missing (nothing
# else ran); 143 stopped by a signal.
#
# shellcheck disable=SC2329  # the p_* parts are called by name through run_part's `bash -c`
set -u -o pipefail
{  # the whole script is parsed before it runs: editing this file during a run cannot change the run

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=${GPU_SUITE_DRY:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
case $DRY in
    0) BASE=560 ;;
    1) BASE=900 ;;
    stub) BASE=560 ;;  # the GPU plan in miniature
    *) echo "GPU_SUITE_DRY must be 0, 1 or stub, not '$DRY'" >&2; exit 2 ;;
esac
if [ "$DRY" = 0 ]; then
    BUDGET=${GPU_SUITE_BUDGET_S:-560}
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
             | sed -e 's/^NVIDIA[ _-]*//' -e 's/[^A-Za-z0-9]\{1,\}/-/g' -e 's/-$//' | tr '[:upper:]' '[:lower:]')
    DEVICE=${DEVICE:-nogpu}
else
    export CUDA_VISIBLE_DEVICES=""
    if [ "$DRY" = 1 ]; then BUDGET=${GPU_SUITE_BUDGET_S:-900}; DEVICE=cpu-dry; else BUDGET=${GPU_SUITE_BUDGET_S:-60}; DEVICE=cpu-stub; fi
fi
RESERVE=$(( BUDGET / 60 > 3 ? BUDGET / 60 : 3 ))  # the last summary and pack
DEADLINE=$((START + BUDGET - RESERVE))
STEM=$(date -u +%Y%m%d-%H%M)_$DEVICE
OUTDIR=${GPU_SUITE_OUT:-${OUT:-$REPO/benchmarks/results/$STEM}}
RUNDIR=${GPU_SUITE_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}
WORK=$RUNDIR/$STEM
mkdir -p "$OUTDIR" "$WORK" || exit 2
STATUS=$WORK/status.md
LOCK=$RUNDIR/.pack.lock
: > "$STATUS"
: > "$OUTDIR/suite_stdout.txt"

log() {
    echo "$*"
    echo "$*" >> "$OUTDIR/suite_stdout.txt"
}

# -- the archive and the summary ---------------------------------------------------------------------
pack() {  # $1: fg | bg. Serialised by a lock, so the last results.tgz moved in is the newest snapshot.
    local tmp="$OUTDIR/.results.tgz.$1"
    {
        if command -v flock > /dev/null; then flock -w 60 9 || true; fi
        cp -f "$OUTDIR/suite_stdout.txt" "$WORK/suite_stdout.txt" 2> /dev/null
        # GNU tar exits 1 when a file changed while read (a log still growing): the archive is still good
        tar -czf "$tmp" -C "$RUNDIR" "$STEM" 2> /dev/null
        if [ $? -le 1 ] && [ -s "$tmp" ]; then mv -f "$tmp" "$OUTDIR/results.tgz"; else rm -f "$tmp"; fi
    } 9> "$LOCK"
}

headline() {  # the comparisons measured so far, one line each (stdlib only)
    "$PY" - "$WORK" <<'EOF' 2> /dev/null
import glob, json, os, sys
out = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "0[3468]_*.json")) + glob.glob(os.path.join(sys.argv[1], "12_*.json"))):
    try:
        rep = json.load(open(path))
    except (OSError, ValueError):
        continue
    rows = rep.get("rows", []) if isinstance(rep, dict) else []
    part = os.path.basename(path)[:-5]
    gen = part == "04_generation"  # generation: one line per (model, N), ours against diffusers' pipeline
    key = (lambda x: (x.get("model"), x.get("steps"))) if gen else (lambda x: (x.get("step"), x.get("schedule")))
    ref_impl = "diffusers" if gen else "reference"
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"
    for r in rows:
        if r.get("implementation") != "megatron_anyflow":
            continue
        what = f"{r['model']} N={r['steps']}" if gen else f"{r['step']}{'/' + r['schedule'] if r.get('schedule') else ''}"
        if "error" in r:
            out.append(f"- {part} {what}: ours failed: {r['error'][:120]}")
            continue
        ref = next((x for x in rows if x.get("implementation") == ref_impl and key(x) == key(r)), None)
        if gen:
            line = (f"- {part} {what}: ours {r['s_per_video']:.3g} s/video, {r['model_tflops_per_s']:.4g} model "
                    f"TFLOP/s, MFU {pct(r.get('mfu_datasheet'))} of the data sheet, peak {r['peak_memory_gib']:.1f} GiB")
        else:
            line = (f"- {part} {what}: ours {r['s_per_iter']:.3g} s/iter, {r['model_tflops_per_s_per_gpu']:.4g} model "
                    f"TFLOP/s, MFU {pct(r.get('mfu'))} of the measured matmul / {pct(r.get('mfu_datasheet'))} of the "
                    f"data sheet, peak {r['peak_memory_gib']:.1f} GiB")
        if ref is not None and "error" in ref:
            line += f"; {ref_impl} failed: {ref['error'][:120]}"
        elif ref is not None and gen:
            line += (f"; diffusers {ref['s_per_video']:.3g} s/video: ours takes {r['time_vs_diffusers']:.2f}x its "
                     f"time, latents rel. err {r.get('rel_err_vs_diffusers') or float('nan'):.1e}")
        elif ref is not None:
            line += (f"; reference {ref['s_per_iter']:.3g} s/iter, peak {ref['peak_memory_gib']:.1f} GiB: "
                     f"speed-up {r.get('speedup_vs_reference', float('nan')):.2f}x")
        elif r.get("speedup_vs_pipelined"):
            line += f"; vs our pipelined row {r['speedup_vs_pipelined']:.2f}x"
        out.append(line)
print("\n".join(out) if out else "- none yet")
EOF
}

summary() {
    local f part
    {
        echo "# GPU suite: $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        case $DRY in
            1) echo "**Dry run on the CPU at tiny sizes** (GPU_SUITE_DRY=1): checks that every part runs; no figure here says anything about GPU speed."; echo ;;
            stub) echo "**Stub run** (GPU_SUITE_DRY=stub): the suite's mechanics with stand-in parts; nothing was measured."; echo ;;
        esac
        echo "Command: \`bash benchmarks/gpu_suite.sh\`, commit $COMMIT, budget ${BUDGET} s (hard stop), $(($(date +%s) - START)) s so far. Every part's log, JSON and markdown: results.tgz ($STEM/)."
        [ -n "${GPU_NOTE:-}" ] && { echo; echo "$GPU_NOTE"; }
        echo
        echo "## Headline"
        echo
        headline
        echo
        echo "| part | status | exit | seconds | limit (s) | estimate (s) | cpu s |"
        echo "|---|---|---:|---:|---:|---:|---:|"
        cat "$STATUS"
        for part in "${ORDER[@]}"; do
            f=$WORK/$part.md
            [ -e "$f" ] || continue
            echo
            echo "## $part"
            echo
            head -n 60 "$f"
        done
    } > "$WORK/summary.md"
    cp -f "$WORK/summary.md" "$OUTDIR/.summary.md.tmp" && mv -f "$OUTDIR/.summary.md.tmp" "$OUTDIR/summary.md"
}

# -- sizes ------------------------------------------------------------------------------------------
SEL=(--recompute-granularity selective)
if [ "$DRY" = 0 ]; then
    THR_SIZE=(--preset wan2.1-1.3b --frames 81 --height 480 --width 832 --text-len 512 --bf16)
    S1_ITERS=(--warmup 1 --iters 2)
    PROF_ITERS=(--warmup 1 --iters 1)
    S2_ITERS=(--warmup 1 --iters 1)
    T_ITERS=(--warmup 1 --iters 2)
    STEP_ARGS=(--model-preset tiny --mock-latent-shape 3 16 16 16 --mock-text-len 16 --bf16)
    ATTN_ARGS=(--iters 5 --warmup 1)
    KERNEL_ARGS=(--no-compile)
    PYTEST_KERNELS=(tests/test_kernels.py)
    # AnyFlow-FAR on a 10-layer slice of 1.3B (per-layer rates as the whole model's), the recipe's chunks
    FAR_SIZE=(--preset wan2.1-1.3b --num-layers 10 --frames 81 --height 480 --width 832 --text-len 512 --bf16)
    FAR_ITERS=(--iters 1 --warmup 1)
    GEN_ARGS=(--preset wan2.1-1.3b --frames 81 --height 480 --width 832 --text-len 512 --bf16 --steps 1 4
              --warmup 1 --iters 2)
else
    THR_SIZE=(--preset tiny --latent-shape 2 8 8 --text-len 8 --matmul-size 128 --simulation-steps 2 4)
    S1_ITERS=(--iters 1 --warmup 0)
    PROF_ITERS=(--iters 1 --warmup 0)
    S2_ITERS=(--iters 1 --warmup 0)
    T_ITERS=(--iters 1 --warmup 0)
    STEP_ARGS=(--model-preset tiny --mock-latent-shape 2 16 8 8 --mock-text-len 8 --num-workers 0)
    ATTN_ARGS=(--tiny --iters 1 --warmup 0)
    KERNEL_ARGS=(--device cpu --iters 2 --warmup 1 --no-compile)
    PYTEST_KERNELS=()  # without CUDA its Triton tests skip; the CPU suite runs the rest
    FAR_SIZE=(--preset tiny --latent-shape 5 8 8 --chunk-partition 1 1 1 1 1 --text-len 8 --matmul-size 128
              --simulation-steps 2 4)
    FAR_ITERS=(--iters 1 --warmup 0)
    GEN_ARGS=(--preset tiny --latent-shape 3 16 32 --chunk-partition 1 1 1 --text-len 8 --fp32 --steps 1 4
              --warmup 1 --iters 1 --matmul-size 128)  # one warm-up: a cold first call is not the comparison
fi
read -r -a THR_EXTRA <<< "${GPU_SUITE_THROUGHPUT_ARGS:-}"

# -- parts ------------------------------------------------------------------------------------------
# Each runs in its own `bash -c` under `timeout`, writing into $WORK (run_part); $PART_LIMIT is its limit.
stub_part() {  # GPU_SUITE_DRY=stub: the part's rows over half its limit (GPU_SUITE_STUB_FRACTION)
    "$PY" benchmarks/gpu_checks.py --stub "$1" \
        --seconds "$(awk -v l="$PART_LIMIT" -v f="${GPU_SUITE_STUB_FRACTION:-0.5}" 'BEGIN { print l * f }')" \
        --json "$WORK/$1.json" --markdown "$WORK/$1.md" --note "${2:-}"
}

p_env() {
    # the packages first: exit 3 at once when one is missing (nothing else can run)
    "$PY" - <<'EOF' || return 3
import importlib.util as iu, sys
missing = []
for mod in ("torch", "megatron.core", "diffusers", "peft"):
    try:
        ok = iu.find_spec(mod) is not None
    except (ImportError, ValueError):
        ok = False
    if not ok:
        missing.append(mod)
if missing:
    sys.exit(f"MISSING: {', '.join(missing)} -- build the wheels here with bash benchmarks/prepare_gpu_wheels.sh "
             "and carry .whl (README.md, section Benchmarks)")
print("packages found: torch, megatron.core, diffusers, peft")
EOF
    if [ "$DRY" != stub ]; then
        "$PY" -c "import megatron.core, diffusers, peft, torch; print('packages import')" 2>&1 | tail -n 3
        [ "${PIPESTATUS[0]}" = 0 ] || { echo "MISSING: megatron.core / diffusers / peft / torch do not import"; return 3; }
    fi
    date -u
    echo "commit $COMMIT"
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    [ "$DRY" = stub ] && return 0
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
}

p_model_vs_diffusers() {
    [ "$DRY" = stub ] && { stub_part 02_model_vs_diffusers; return; }
    "$PY" benchmarks/gpu_checks.py --json "$WORK/02_model_vs_diffusers.json" --markdown "$WORK/02_model_vs_diffusers.md"
}

throughput() {  # $1: part name, then the tool's options
    local name=$1
    shift
    "$PY" tools/benchmark_throughput.py "$@" "${THR_EXTRA[@]}" --json "$WORK/$name.json" --markdown "$WORK/$name.md"
}

p_stage1() {
    [ "$DRY" = stub ] && { stub_part 03_stage1; return; }
    throughput 03_stage1 "${THR_SIZE[@]}" "${S1_ITERS[@]}" "${SEL[@]}" --steps stage1
}

p_generation() {
    [ "$DRY" = stub ] && { stub_part 04_generation; return; }
    "$PY" tools/benchmark_generation.py "${GEN_ARGS[@]}" --json "$WORK/04_generation.json" \
        --markdown "$WORK/04_generation.md"
}

p_profile_stage1() {
    [ "$DRY" = stub ] && { stub_part 05_profile_stage1; return; }
    throughput 05_profile_stage1 "${THR_SIZE[@]}" "${PROF_ITERS[@]}" "${SEL[@]}" --steps stage1 --no-reference --profile \
        || return
    "$PY" - "$WORK/05_profile_stage1.json" <<'EOF'
import json, sys
row = json.load(open(sys.argv[1]))["rows"][0]
if "profile" not in row:
    sys.exit(f"no profile in the stage-1 row: {row.get('profile_error') or row.get('error')}")
print("profile:", ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in row["profile"]["categories"].items()))
EOF
}

p_stage2() {
    [ "$DRY" = stub ] && { stub_part 06_stage2; return; }
    throughput 06_stage2 "${THR_SIZE[@]}" "${S2_ITERS[@]}" "${SEL[@]}" --steps stage2 \
        --schedules sequential pipelined overlapped
}

p_attention() {
    [ "$DRY" = stub ] && { stub_part 07_attention; return; }
    "$PY" tools/benchmark_attention.py "${ATTN_ARGS[@]}" --json "$WORK/07_attention.json" --markdown "$WORK/07_attention.md"
}

p_far() {
    [ "$DRY" = stub ] && { stub_part 08_far; return; }
    throughput 08_far --model far "${FAR_SIZE[@]}" "${FAR_ITERS[@]}" "${SEL[@]}" --steps stage1 stage2 --schedules sequential
}

p_kernels() {  # torch.compile rows only when the part's limit leaves COMPILE_S more than its estimate
    local args=("${KERNEL_ARGS[@]}") note="torch.compile rows: off (not enough time left)"
    if [ "$DRY" != 1 ] && [ "$PART_LIMIT" -ge $((PART_EST + COMPILE_S)) ]; then
        args+=(--compile)
        note="torch.compile rows: on (limit ${PART_LIMIT} s >= estimate ${PART_EST} s + ${COMPILE_S} s)"
    fi
    echo "$note"
    [ "$DRY" = stub ] && { stub_part 09_kernels "$note"; return; }
    "$PY" tools/benchmark_kernels.py "${args[@]}" --json "$WORK/09_kernels.json" --markdown "$WORK/09_kernels.md"
}

p_pytest_gpu() {
    [ "$DRY" = stub ] && { "$PY" -c "import time; time.sleep($PART_LIMIT * ${GPU_SUITE_STUB_FRACTION:-0.5}); print('stub: pytest -m gpu')"; return; }
    local files rc=0
    mapfile -t files < <(grep -l "pytest.mark.gpu" tests/*.py)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu "${files[@]}" || rc=$?
    if [ "${#PYTEST_KERNELS[@]}" -gt 0 ]; then
        "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_KERNELS[@]}" || rc=$?
    fi
    return "$rc"
}

p_steps() {
    [ "$DRY" = stub ] && { "$PY" -c "import time; time.sleep($PART_LIMIT * ${GPU_SUITE_STUB_FRACTION:-0.5}); print('stub: one stage1 / stage2 iteration')"; return; }
    local rc=0 stage pids=()
    for stage in stage1 stage2; do  # side by side: tiny models, the start-up dominates
        "$PY" pretrain_anyflow.py --stage "$stage" --mock-data --mock-num-samples 8 --micro-batch-size 1 \
            --train-iters 1 --log-interval 1 --simulation-steps 2 4 "${STEP_ARGS[@]}" > "$WORK/11_steps_$stage.txt" 2>&1 &
        pids+=("$!")
    done
    for i in 0 1; do
        wait "${pids[$i]}" || rc=$?
    done
    for stage in stage1 stage2; do
        echo "== one $stage iteration"
        cat "$WORK/11_steps_$stage.txt"
        rm -f "$WORK/11_steps_$stage.txt"
    done
    return "$rc"
}

p_teacher() {
    [ "$DRY" = stub ] && { stub_part 12_teacher; return; }
    throughput 12_teacher "${THR_SIZE[@]}" "${T_ITERS[@]}" "${SEL[@]}" --steps teacher
}

# name, function, estimate on the H200 (s; gpu_checks.py --budgets), estimate in the CPU dry run (s)
PARTS=(
    "01_env p_env 17 14"
    "02_model_vs_diffusers p_model_vs_diffusers 20 16"
    "03_stage1 p_stage1 82 22"
    "04_generation p_generation 103 14"
    "05_profile_stage1 p_profile_stage1 47 18"
    "06_stage2 p_stage2 294 30"
    "07_attention p_attention 17 12"
    "08_far p_far 57 26"
    "09_kernels p_kernels 14 8"
    "10_pytest_gpu p_pytest_gpu 70 40"
    "11_steps p_steps 40 30"
    "12_teacher p_teacher 58 20"
)
COMPILE_GPU_S=60

# -- scheduling -------------------------------------------------------------------------------------
ORDER=() FNS=() EST=()
DRY_SUM=0
for p in "${PARTS[@]}"; do
    read -r name fn gpu dry <<< "$p"
    DRY_SUM=$((DRY_SUM + dry))
done
DRY_BASE=$((DRY_SUM * 3 / 2))  # the dry estimates sum to 2/3 of the default dry budget
for p in "${PARTS[@]}"; do
    read -r name fn gpu dry <<< "$p"
    if [ -n "${GPU_SUITE_PARTS:-}" ] && [[ " $GPU_SUITE_PARTS " != *" $name "* ]]; then
        continue
    fi
    ORDER+=("$name") FNS+=("$fn")
    if [ "$DRY" = 1 ]; then
        EST+=($(( (dry * BUDGET + DRY_BASE - 1) / DRY_BASE )))
    else
        EST+=($(( (gpu * BUDGET + BASE - 1) / BASE )))
    fi
done
COMPILE_S=$(( (COMPILE_GPU_S * BUDGET + BASE - 1) / BASE ))

COMMIT=${GPU_SUITE_COMMIT:-}
WHEELS=${GPU_SUITE_WHEELS:-$REPO/.whl}
if [ -z "$COMMIT" ] && [ -s "$WHEELS/COMMIT" ]; then COMMIT=$(head -n 1 "$WHEELS/COMMIT"); fi
if [ -z "$COMMIT" ]; then COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2> /dev/null || echo '?'); fi
GPU_NOTE=""
if [ "$DRY" = 0 ]; then
    MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2> /dev/null | head -n 1)
    if [ -n "$MEM_MIB" ] && [ "$MEM_MIB" -lt 120000 ] 2> /dev/null; then
        GPU_NOTE="**Not an H200** ($DEVICE, ${MEM_MIB} MiB): the budgets are sized for an H200; stage-2 rows may run out of memory."
    fi
fi

PART_PID="" CURRENT="" PACKER_PID="" WATCHDOG_PID=""
stop_part() {  # the running part's process group (timeout's), TERM then KILL
    [ -n "$PART_PID" ] || return 0
    kill -TERM -- "-$PART_PID" 2> /dev/null || kill -TERM "$PART_PID" 2> /dev/null
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 "$PART_PID" 2> /dev/null || break
        sleep 0.2
    done
    kill -KILL -- "-$PART_PID" 2> /dev/null
    PART_PID=""
}
end_helper() {  # a background helper and its `sleep`, by their ids
    [ -n "$1" ] || return 0
    pkill -TERM -P "$1" 2> /dev/null
    kill "$1" 2> /dev/null
}
finish() {  # $1: exit code
    end_helper "$PACKER_PID"
    end_helper "$WATCHDOG_PID"
    PACKER_PID="" WATCHDOG_PID=""
    summary
    pack fg
    rm -f "$OUTDIR/.results.tgz.bg"  # a background pack cut by the packer's end
    log "[gpu_suite] done in $(($(date +%s) - START)) s (exit $1): $OUTDIR/summary.md, $OUTDIR/results.tgz"
    exit "$1"
}
on_signal() {
    trap '' TERM INT HUP
    log "[gpu_suite] stopped by a signal after $(($(date +%s) - START)) s${CURRENT:+, during $CURRENT}"
    stop_part
    [ -n "$CURRENT" ] && echo "| $CURRENT | STOPPED (signal; partial results kept) | 143 | $(($(date +%s) - PART_T0)) | | | |" >> "$STATUS"
    CURRENT=""
    finish 143
}
trap on_signal TERM INT HUP

CPU0=0
cpu_now() {  # CPU seconds (user + system) of this shell's finished children (`times` in this shell, not a $(...))
    times > "$RUNDIR/.times"
    awk 'END { s = 0; for (i = 1; i <= NF; i++) { split($i, b, "m"); sub("s", "", b[2]); s += b[1] * 60 + b[2] }
               printf "%.0f", s }' "$RUNDIR/.times"
}

run_part() {  # $1: index in ORDER
    local i=$1 name=${ORDER[$1]} fn=${FNS[$1]} est=${EST[$1]} now left later=0 j limit rc status cpu
    for ((j = i + 1; j < ${#ORDER[@]}; j++)); do later=$((later + EST[j])); done
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 2 ]; then
        echo "skipped: the suite's hard stop (${BUDGET} s) has come" > "$WORK/$name.log"
        echo "| $name | skipped (out of time) | | 0 | 0 | $est | |" >> "$STATUS"
        log "[gpu_suite] $name: skipped (out of time)"
        return 0
    fi
    # what the later parts do not need, but never less than this part's own estimate (value order)
    limit=$((left - later))
    [ "$limit" -lt "$est" ] && limit=$est
    [ "$limit" -lt 5 ] && limit=5  # a process start, on a loaded machine too
    [ "$limit" -gt "$left" ] && limit=$left
    log "[gpu_suite] $name (limit ${limit} s, estimate ${est} s, $((now - START)) s into ${BUDGET} s)"
    export PART_LIMIT=$limit PART_EST=$est
    # shellcheck disable=SC2163  # exports the function that $fn names
    export -f "$fn"
    CURRENT=$name PART_T0=$(date +%s)
    cpu_now > "$RUNDIR/.cpu0"
    CPU0=$(cat "$RUNDIR/.cpu0")
    # timeout leads its own process group: stop_part ends the part's every process
    # shellcheck disable=SC2016  # expanded by the inner shell
    timeout -k 5 "$limit" bash -c 'eval "$ARRAYS"; "$0"' "$fn" > "$WORK/$name.log" 2>&1 < /dev/null &
    PART_PID=$!
    echo "$PART_PID" > "$RUNDIR/.part_pgid"
    wait "$PART_PID"
    rc=$?
    PART_PID=""
    cpu_now > "$RUNDIR/.cpu1"
    cpu=$(( $(cat "$RUNDIR/.cpu1") - CPU0 ))
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (partial results kept)" ;;
        3) [ "$name" = 01_env ] && status="MISSING PACKAGES" || status=FAILED ;;
        *) status=FAILED ;;
    esac
    echo "| $name | $status | $rc | $(($(date +%s) - PART_T0)) | $limit | $est | $cpu |" >> "$STATUS"
    CURRENT=""
    summary
    pack fg
    # reported only once packed: a part named finished in suite_stdout.txt is in results.tgz
    log "[gpu_suite] $name: $status (exit $rc, $(($(date +%s) - PART_T0)) s)"
    return "$rc"
}

# arrays do not cross `bash -c`: the parts read them from these declarations
ARRAYS=$(declare -p THR_SIZE S1_ITERS PROF_ITERS S2_ITERS T_ITERS SEL STEP_ARGS ATTN_ARGS KERNEL_ARGS PYTEST_KERNELS \
         THR_EXTRA FAR_SIZE FAR_ITERS GEN_ARGS)
export ARRAYS WORK PY DRY REPO COMMIT COMPILE_S
export -f stub_part throughput
export PYTHONUNBUFFERED=1

log "[gpu_suite] $DEVICE, budget ${BUDGET} s (hard stop), commit $COMMIT, parts: ${ORDER[*]}"
log "[gpu_suite] out: $OUTDIR (results.tgz, summary.md, suite_stdout.txt); work: $WORK"
summary
pack fg
# the background packer, and a watchdog should anything overrun the hard stop
# (no output of theirs: a reader of the suite's output must not wait for them)
( trap - TERM INT HUP; while sleep "${GPU_SUITE_PACK_S:-20}"; do pack bg; done ) > /dev/null 2>&1 &
PACKER_PID=$!
( trap - TERM INT HUP; sleep "$BUDGET" && kill -TERM $$ ) > /dev/null 2>&1 &
WATCHDOG_PID=$!

# Carried wheels (megatron-core, diffusers, ...): installed into a private folder, first on the path.
SITE=${TMPDIR:-/tmp}/gpu_suite_site
if [ "$DRY" = 0 ] || [ -n "${GPU_SUITE_WHEELS:-}" ]; then
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        log "[gpu_suite] installing $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from $WHEELS"
        if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$WHEELS"/*.whl > "$WORK/00_wheels.log" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        else
            log "[gpu_suite] the wheel install FAILED: $(tail -n 2 "$WORK/00_wheels.log" | tr '\n' ' ')"
            echo "| 00_wheels | FAILED (install) | 3 | | | | |" >> "$STATUS"
            finish 3
        fi
    else
        log "[gpu_suite] no wheels in $WHEELS (bash benchmarks/prepare_gpu_wheels.sh here, then carry .whl)"
    fi
fi
# The project from this checkout; its Triton kernels under their import name without `pip install`.
mkdir -p "$SITE.src" && ln -sfn "$REPO/kernels/megatron_anyflow_kernels" "$SITE.src/megatron_anyflow_kernels"
export PYTHONPATH="$REPO:$SITE.src${PYTHONPATH:+:$PYTHONPATH}"

failed=0
for ((k = 0; k < ${#ORDER[@]}; k++)); do
    run_part "$k"
    rc=$?
    if [ "${ORDER[$k]}" = 01_env ] && [ "$rc" = 3 ]; then
        log "[gpu_suite] the packages are missing: $(grep MISSING "$WORK/01_env.log" | head -n 1)"
        finish 3
    fi
    [ "$rc" = 0 ] || failed=1
done
grep -q "skipped" "$STATUS" && failed=1
finish "$failed"
}
