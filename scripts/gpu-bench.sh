#!/usr/bin/env bash
# One-shot GPU check of the compiled fast path (docs/model.md, "Compiled fast path"), for the day
# a GPU is lent. Runs `s3diff bench` at 512x512 output (128x128 input) on full-size random
# weights (sd-turbo preset) at batch 1, 4 and 8: fp16 and bf16, eager and compiled (CUDA graphs),
# against the fp32 reference-like path; and the parity tests (tests/model/test_compile.py, tiny
# model) on the GPU, including the fp16/bf16 bound. Writes ONE JSON:
#
#   bash scripts/gpu-bench.sh [OUT_DIR]     # -> OUT_DIR/gpu-bench.json (default: $OUT, else bench-results)
#
# Steps run most important first (batch 1, parity, batch 4, batch 8), each under a time limit
# (GPU_BENCH_STEP_LIMIT_S, default 420 s), and the JSON is written whatever finished, so a short
# device lease still yields batch 1 and the parity result.
set -uo pipefail

cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-bench-results}}"
step_limit="${GPU_BENCH_STEP_LIMIT_S:-420}"
python="${PYTHON:-python3}"
mkdir -p "$out_dir"
work="$(mktemp -d)"

finish() {
    "$python" scripts/gpu_bench_report.py "$work" "$out_dir/gpu-bench.json"
    rm -rf "$work"
}
trap finish EXIT

# run_step NAME COMMAND...: run under the time limit; record exit code and seconds in NAME.status
run_step() {
    local name=$1 start rc
    shift
    start=$(date +%s)
    timeout "$step_limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    printf '{"rc": %d, "seconds": %d}\n' "$rc" "$(($(date +%s) - start))" >"$work/$name.status"
    echo "$name: exit $rc after $(($(date +%s) - start)) s" >&2
}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: nothing to measure" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$work/nvidia-smi.txt" 2>&1 || true

bench() {
    run_step "bench-b$1" "$python" -m s3diff_serve.cli.main bench --preset sd-turbo --device cuda --size 128 \
        --batch "$1" --dtypes fp32,fp16,bf16 --compiled-dtypes fp16,bf16 --compile on --repeats 5 \
        --out "$work/bench-b$1.json"
}

bench 1
run_step parity env S3DIFF_TEST_DEVICE=cuda "$python" -m pytest -q -s -p no:cacheprovider \
    tests/model/test_compile.py --junitxml "$work/parity.xml"
bench 4
bench 8
