#!/usr/bin/env bash
# The one prepared GPU run (about 6 minutes at most): the kernel tests on the GPU (the attention
# determinism check included) and a quick benchmark pass, results under $OUT (default
# bench/results/gpu). Run from the repository root on a GPU machine:
#   PYTHONPATH=. bash bench/gpu_check.sh
# The tests run untuned (EVO_AUTOTUNE=0: tuning every shape of the sweep would cost minutes of
# compiling), in two processes at once; the benchmarks autotune, one module at a time, each writing
# its JSON after every row, so a timeout keeps what was measured.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
# kernel tests on the GPU (no interpreter: TRITON_INTERPRET stays unset when CUDA is present)
EVO_AUTOTUNE=0 timeout 170 python -m pytest -q -p no:cacheprovider tests/kernels/test_attention.py \
    > "$OUT/gpu_tests_attention.txt" 2>&1 &
EVO_AUTOTUNE=0 timeout 170 python -m pytest -q -p no:cacheprovider tests/kernels \
    --ignore=tests/kernels/test_attention.py > "$OUT/gpu_tests_other.txt" 2>&1 &
wait
timeout 90 python bench/run.py --quick --only kernels --out "$OUT/bench_kernels.json" > "$OUT/bench_kernels.txt" 2>&1
timeout 100 python bench/run.py --quick --only attention --out "$OUT/bench_attention.json" \
    > "$OUT/bench_attention.txt" 2>&1
for f in device.txt gpu_tests_attention.txt gpu_tests_other.txt bench_kernels.txt bench_attention.txt; do
    echo "=== $f"; tail -40 "$OUT/$f"
done
