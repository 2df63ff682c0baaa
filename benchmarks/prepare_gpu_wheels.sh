#!/usr/bin/env bash
# Build the wheels folder that benchmarks/gpu_suite.sh installs on a lent GPU machine.
#
# That machine (x86-64, Python 3.12, CUDA torch, triton and peft installed) reaches no package registry,
# and lacks megatron-core and diffusers (and diffusers' importlib-metadata with its lazy-importer). Run
# this here, where pip works; the folder (default .whl/ in the repo root, git-ignored through
# .git/info/exclude) then travels with the device tool's `carry`:
#
#   bash benchmarks/prepare_gpu_wheels.sh            # -> .whl/ (about 9 MB) and .whl/COMMIT
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600, kind="nvidia-h200")
#                                                     # results under $OUT; README.md, section Benchmarks
#
# Run it right before each GPU call: the wheels already there are kept (nothing is downloaded again), and
# .whl/COMMIT is rewritten with the commit and the number of uncommitted files of this checkout (no .git
# travels to the GPU machine; the suite prints this line as the commit it measured).
#
# Versions: the ones installed here (so both machines run the same code), else the pins below;
# override with MCORE_VERSION / DIFFUSERS_VERSION. No dependencies are fetched (--no-deps): the ones the
# GPU machine lacks are named here.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.whl}
PY=${PYTHON:-python3}

installed() {  # the version installed here, or the fallback
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$2"
}
MCORE=${MCORE_VERSION:-$(installed megatron-core 0.16.1)}
DIFFUSERS=${DIFFUSERS_VERSION:-$(installed diffusers 0.42.1)}
IMD=$(installed importlib-metadata 10.2.0)
LAZY=$(installed lazy-importer 0.1.0)

mkdir -p "$DEST"
have() {  # $1: the wheel's file-name prefix, $2: the version
    compgen -G "$DEST/$1-$2-*.whl" > /dev/null
}
if have megatron_core "$MCORE" && have diffusers "$DIFFUSERS" && have importlib_metadata "$IMD" \
        && have lazy_importer "$LAZY"; then
    echo "wheels already in $DEST: megatron-core $MCORE, diffusers $DIFFUSERS, importlib-metadata $IMD, lazy-importer $LAZY"
else
    rm -f "$DEST"/megatron_core-*.whl "$DEST"/diffusers-*.whl "$DEST"/importlib_metadata-*.whl "$DEST"/lazy_importer-*.whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "megatron-core==$MCORE" "diffusers==$DIFFUSERS" "importlib-metadata==$IMD" "lazy-importer==$LAZY"
fi

# the commit measured: the suite reads the first line (GPU_SUITE_COMMIT overrides it there)
if COMMIT=$(git -C "$REPO" rev-parse HEAD 2> /dev/null); then
    DIRTY=$(git -C "$REPO" status --porcelain --untracked-files=no 2> /dev/null | wc -l | tr -d ' ')
    [ "$DIRTY" = 0 ] || COMMIT="$COMMIT (+$DIRTY uncommitted files)"
else
    COMMIT="? (no git)"
fi
printf '%s\nwritten %s by benchmarks/prepare_gpu_wheels.sh\n' "$COMMIT" "$(date -u +%Y-%m-%dT%H:%MZ)" > "$DEST/COMMIT"
echo "commit: $COMMIT"

# keep the folder out of git (the device tool sends untracked files that git does not ignore)
if [ "$DEST" = "$REPO/.whl" ]; then
    EXCLUDE=$(git -C "$REPO" rev-parse --git-path info/exclude)
    case $EXCLUDE in /*) ;; *) EXCLUDE="$REPO/$EXCLUDE" ;; esac
    mkdir -p "$(dirname "$EXCLUDE")"
    grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
fi
ls -la "$DEST"
du -sh "$DEST"
