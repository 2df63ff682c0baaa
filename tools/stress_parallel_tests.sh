#!/usr/bin/env bash
# Run pytest node ids over and over while CPU-heavy load runs, and count passes, failures and hangs.
#
#     tools/stress_parallel_tests.sh N NODE_ID [NODE_ID ...]
#     tools/stress_parallel_tests.sh 20 tests/test_far_conversion.py::test_far_round_trip_through_tp2_bit_exact
#
# Each repetition runs every node id in its own `python -m pytest` (in the given order), while
# STRESS_LOAD_PROCS busy-loop processes (default 1: on a 2-core machine one test rank then shares a
# core with the load) compete for the CPUs. A run counts as
#   passed  pytest exited 0;
#   hung    a launch ran past its timeout: the tests' harness (tests/conftest.py) reported "timed out", or
#           pytest itself ran past STRESS_RUN_TIMEOUT seconds (default 900; then pytest and every process
#           started under it, found by a tag in their environment, are killed);
#   failed  anything else.
# Prints one line per run, then the summary line "N passed, M failed, K hung" (and the wall time).
# Every run's output is kept in STRESS_LOG_DIR (default: a new /tmp/stress-parallel-XXXXXX); the
# failures' logs are listed. The load processes (and anything left of a killed run) are stopped on exit;
# on SIGINT / SIGTERM the summary of the runs finished so far is printed first (exit 130 / 143).
# Exit status: 0 when every run passed, 1 otherwise, 2 on bad arguments.
set -u

if [ $# -lt 2 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
reps=$1
shift
nodes=("$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python}
load_procs=${STRESS_LOAD_PROCS:-1}
run_timeout=${STRESS_RUN_TIMEOUT:-900}
log_dir=${STRESS_LOG_DIR:-$(mktemp -d /tmp/stress-parallel-XXXXXX)}
mkdir -p "$log_dir"
tag="stress_parallel_tests_$$_$RANDOM"

load_pids=()
passed=0 failed=0 hung=0 rep=0
declare -A node_pass node_fail node_hang
failures=()
t_start=$(date +%s)

tagged_pids() {  # processes started under a run of this script (they inherit STRESS_RUN_TAG)
    grep -ls "STRESS_RUN_TAG=$tag" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true
}
cleanup() {
    for pid in "${load_pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${load_pids[@]}"; do wait "$pid" 2>/dev/null; done
    local left
    left=$(tagged_pids)
    if [ -n "$left" ]; then
        echo "killing processes left by a run: $left" >&2
        kill -9 $left 2>/dev/null
    fi
}
summary() {  # $1: why it stopped early (empty when every repetition ran)
    local wall=$(( $(date +%s) - t_start ))
    echo "--- per node id ---"
    for node in "${nodes[@]}"; do
        echo "$node: ${node_pass[$node]:-0} passed, ${node_fail[$node]:-0} failed, ${node_hang[$node]:-0} hung"
    done
    for log in "${failures[@]}"; do echo "not passed: $log"; done
    echo "$passed passed, $failed failed, $hung hung (wall ${wall}s, $reps repetitions of ${#nodes[@]} node id(s)," \
         "${#load_pids[@]} load process(es))${1:+; $1}"
}
trap cleanup EXIT
trap 'summary "INTERRUPTED by SIGINT in repetition $rep (the run in progress is not counted)"; exit 130' INT
trap 'summary "INTERRUPTED by SIGTERM in repetition $rep (the run in progress is not counted)"; exit 143' TERM

for ((i = 0; i < load_procs; i++)); do
    "$python" -c "while True: pass" &
    load_pids+=($!)
done
echo "load: ${#load_pids[@]} busy-loop process(es) (pids ${load_pids[*]:-none}); logs in $log_dir"
t_start=$(date +%s)

for ((rep = 1; rep <= reps; rep++)); do
    for node in "${nodes[@]}"; do
        log="$log_dir/run$(printf %03d "$rep")_$(echo "$node" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-120).log"
        t0=$(date +%s)
        # in the background and waited for, so that a SIGINT / SIGTERM of this script is handled at once
        STRESS_RUN_TAG=$tag timeout -k 10 "$run_timeout" "$python" -m pytest -q -x -p no:cacheprovider "$node" \
            > "$log" 2>&1 &
        wait $!
        rc=$?
        dt=$(( $(date +%s) - t0 ))
        left=$(tagged_pids)
        if [ -n "$left" ]; then  # a run killed by `timeout` cannot clean up after itself
            kill -9 $left 2>/dev/null
            echo "  (killed processes left by this run: $left)" >> "$log"
        fi
        if [ $rc -eq 0 ]; then
            result=passed; passed=$((passed + 1)); node_pass[$node]=$(( ${node_pass[$node]:-0} + 1 ))
        elif [ $rc -eq 124 ] || [ $rc -eq 137 ] || grep -qE "(torchrun|command) timed out after" "$log"; then
            result=hung; hung=$((hung + 1)); node_hang[$node]=$(( ${node_hang[$node]:-0} + 1 )); failures+=("$log")
        else
            result=failed; failed=$((failed + 1)); node_fail[$node]=$(( ${node_fail[$node]:-0} + 1 )); failures+=("$log")
        fi
        echo "[$rep/$reps] $result (${dt}s, rc $rc) $node"
    done
done

summary ""
[ $((failed + hung)) -eq 0 ]
