#!/usr/bin/env bash
# The CUDA path's check on a lent GPU, end to end in at most 8 minutes (issue 19, item 6).
#
#   scripts/gpu_check.sh              run every step (on the GPU machine)
#   scripts/gpu_check.sh --dry-run    list the steps and their commands; run none (any machine)
#   scripts/gpu_check.sh --only install,bench   run these steps alone (a rerun of a part)
#
# Steps, each with its own timeout, all inside one budget (GPU_CHECK_BUDGET_S, default 470 s):
# install the wheels of .whl/ (scripts/fetch_gpu_wheels.sh fills it; the GPU machine has no
# network) into /tmp/site, build the protos, report torch/CUDA/transformers and what that torch
# offers, import the packages, run tests/gpu, then benchmarks/gpu_check.py's table. A step that
# fails is reported and the next runs; a step that no longer fits the budget is skipped.
# Output under $OUT (the device tool's folder), else ./gpu-check-out: gpu_check.log (every
# step's output), summary.txt (one line a step), junit.xml (tests/gpu), table.md and
# capabilities.json (the benchmark). Exit status: 0 when every step passed.
#
# From a developer machine, through the device tool:
#   scripts/fetch_gpu_wheels.sh                       # once, here
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_SITE (/tmp/site).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

dry_run=0
only=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --only) only=${2:-}; shift ;;
        -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
SITE=${GPU_CHECK_SITE:-/tmp/site}
OUT_DIR=${OUT:-$ROOT/gpu-check-out}
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
failures=0

# name | timeout (s) | needs CUDA (1/0) | command
STEPS=(
    "gpu|15|1|nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv"
    "install|90|0|$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl"
    "protos|60|0|$PYTHON -m protos.build"
    "versions|60|0|$PYTHON benchmarks/gpu_check.py --capabilities"
    "imports|60|0|$PYTHON -c 'import engine.engine, kvtransfer.sender, kvtransfer.receiver, decode_service.servicer, prefill_service.servicer, protos.pdserve.v1.worker_pb2_grpc; print(\"imports ok\")'"
    "pytest|180|1|$PYTHON -m pytest tests/gpu -q -rA -p no:cacheprovider --timeout 150 --junitxml $OUT_DIR/junit.xml"
    "bench|300|1|$PYTHON benchmarks/gpu_check.py --out $OUT_DIR --budget-s \$((GPU_CHECK_STEP_TIMEOUT - 60))"
)

selected() { [[ -z $only || ",$only," == *",$1,"* ]]; }

cuda_present() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

if ((dry_run)); then
    echo "gpu_check.sh --dry-run: budget ${BUDGET_S} s, output under $OUT_DIR, PYTHONPATH=$SITE:$ROOT"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cuda command <<<"$step"
        selected "$name" || continue
        what="would run"
        ((cuda)) && what="CUDA step, skipped in a dry run; would run"
        echo "step $name (timeout ${limit} s): $what: $command"
    done
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "wheels: $(ls .whl/*.whl | wc -l) in .whl/, $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes"
    else
        echo "wheels: none in .whl/ (run scripts/fetch_gpu_wheels.sh before the GPU run)"
    fi
    "${PYTHON}" benchmarks/gpu_check.py --dry-run 2>/dev/null | sed 's/^/bench /' || true
    exit 0
fi

mkdir -p "$OUT_DIR"
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
needs_cuda=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cuda command <<<"$step"
    selected "$name" && ((cuda)) && needs_cuda=1
done
if ((needs_cuda)) && ! cuda_present; then
    echo "gpu_check.sh: no CUDA device here (nvidia-smi finds none); use --dry-run" | tee -a "$SUMMARY"
    exit 3
fi

for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cuda command <<<"$step"
    selected "$name" || continue
    left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped (time: ${left} s left of ${BUDGET_S})" | tee -a "$SUMMARY"
        failures=$((failures + 1))
        continue
    fi
    {
        echo
        echo "===== step $name (timeout ${limit} s) at $(date -u +%H:%M:%S) ====="
        echo "\$ $command"
    } >>"$LOG"
    began=$(date +%s)
    # the step may size its own work to its timeout (the benchmark starts no section after it)
    GPU_CHECK_STEP_TIMEOUT=$limit timeout --kill-after=10 "$limit" bash -c "$command" >>"$LOG" 2>&1
    rc=$?
    took=$(($(date +%s) - began))
    if ((rc == 0)); then
        verdict="ok"
    elif ((rc == 124 || rc == 137)); then
        verdict="TIMEOUT"
    else
        verdict="FAILED (rc $rc)"
    fi
    ((rc == 0)) || failures=$((failures + 1))
    echo "$name: $verdict in ${took} s" | tee -a "$SUMMARY"
    if [[ $name == install && $rc -ne 0 ]]; then
        echo "install failed: the later steps need the wheels; stopping" | tee -a "$SUMMARY"
        break
    fi
done

echo "total: $(($(date +%s) - START)) s, $failures step(s) not ok" | tee -a "$SUMMARY"
[[ -f $OUT_DIR/table.md ]] && cat "$OUT_DIR/table.md"
tail -n 40 "$LOG"
((failures == 0))
