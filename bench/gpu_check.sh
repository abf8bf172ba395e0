#!/usr/bin/env bash
# The GPU check: `sft` in bf16, `predict --backend hf` and GRPO (TRL) on a Qwen2-0.5B-shaped model,
# one script well inside 8 minutes on one H200. See docs/benchmarks.md ("GPU check").
#
#   bench/gpu_check.sh --prepare   here, with the package index: download the wheels the GPU
#                                  image lacks (trl, datasets, dill, multiprocess, orjson; pure
#                                  Python or small, ~2 MB) into bench/out/wheels
#   bench/gpu_check.sh             there: install those wheels offline, run bench/gpu_check.py,
#                                  write $OUT/gpu_check.json (or bench/out/gpu/ without $OUT)
#   bench/gpu_check.sh --smoke     anywhere: the same steps with tiny shapes (a CPU check)
#
# With the device tool: run(command="bench/gpu_check.sh", carry=["bench/out/wheels"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/out/wheels
NEEDED=(trl==0.29.1 datasets==5.2.0 dill multiprocess orjson)
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$WHEELS" "${NEEDED[@]}"
    du -sh "$WHEELS"
    exit 0
fi

missing=()
for module in trl datasets dill multiprocess orjson; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "missing Python packages: ${missing[*]}; run bench/gpu_check.sh --prepare first" >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "${missing[@]}"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true
timeout -k 10 480 "$PY" bench/gpu_check.py --out "${OUT:-bench/out/gpu}" "$@"
