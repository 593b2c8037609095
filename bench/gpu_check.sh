#!/usr/bin/env bash
# The one prepared GPU run: GPU tests (including attention's determinism) and a quick benchmark pass,
# results under $OUT (default bench/results/gpu). Run from the repository root on a GPU machine:
#   PYTHONPATH=. bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
# kernel tests on the GPU (no interpreter: TRITON_INTERPRET stays unset when CUDA is present)
timeout 240 python -m pytest -q -x tests/kernels -p no:cacheprovider 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
timeout 300 python bench/run.py --quick --only kernels attention train_step --out "$OUT/bench_quick.json" 2>&1 \
    | tail -80 > "$OUT/bench_quick.txt"
cat "$OUT/device.txt" "$OUT/gpu_tests.txt" "$OUT/bench_quick.txt"
