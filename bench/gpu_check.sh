#!/usr/bin/env bash
# The one prepared GPU run, about 6 minutes at most, the goals first; every step has its own timeout and each
# benchmark writes its JSON after every row, so a step cut short keeps what it measured. Results under $OUT
# (default bench/results/gpu). Before it, where there is network (the GPU machines have none):
#   bash bench/fetch_liger.sh          # Liger-Kernel into bench/vendor/, for the baseline rows
# then on the GPU machine, from the repository root (the device tool: carry ["bench/vendor"]):
#   PYTHONPATH=. bash bench/gpu_check.sh
# 1. the benchmarks that decide the goals (bench/goals.py): attention, kernels, MoE experts, the 1B training step, the
#    context ring's per-block attention (bench/context.py), selective checkpointing (bench/checkpointing.py); then
#    every forward tile of attention timed (bench/attention_tiles.py, non-causal), beside the compiler's ranking of
#    them in the committed bench/results/kernel-report/report.json;
# 2. the kernel tests on the GPU, untuned (EVO_AUTOTUNE=0: tuning every shape of the sweep costs minutes),
#    two processes at once; the attention backward's bit-for-bit determinism test (skipped everywhere else) among
#    them, its outcome in steps.txt;
# 3. the goals, met or missed, from the results of 1 (goals.md).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
PYTHONPATH=$PYTHONPATH:bench/vendor python -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', \
m.version('liger-kernel'))" >> "$OUT/device.txt" 2>&1 || echo "liger-kernel: not importable" >> "$OUT/device.txt"
# Liger's fused MoE (a baseline row of moe) autotunes for minutes unpinned: pinned, as its docstring offers
export LIGER_FUSED_MOE_AUTOTUNE=0
for step in "attention 65" "kernels 60" "moe 45" "train_step 65" "context 25" "checkpointing 45" "attention_tiles 15"; do
    set -- $step
    timeout "$2" python bench/run.py --quick --only "$1" --out "$OUT/$1.json" > "$OUT/$1.txt" 2>&1
    echo "$1: exit $?" >> "$OUT/steps.txt"
done
EVO_AUTOTUNE=0 timeout 40 python -m pytest -q -rA -p no:cacheprovider tests/kernels/test_attention.py \
    > "$OUT/gpu_tests_attention.txt" 2>&1 &
EVO_AUTOTUNE=0 timeout 40 python -m pytest -q -p no:cacheprovider tests/kernels \
    --ignore=tests/kernels/test_attention.py > "$OUT/gpu_tests_other.txt" 2>&1 &
wait
# the determinism test skips itself without a GPU: say whether it ran here, and how it ended
DETERMINISM=tests/kernels/test_attention.py::test_gpu_backward_is_bit_identical_across_runs
echo "determinism: $(grep -E "^(PASSED|FAILED|SKIPPED|ERROR).*${DETERMINISM#*::}" "$OUT/gpu_tests_attention.txt" \
    | cut -d' ' -f1 || echo 'NOT RUN')" >> "$OUT/steps.txt"
python bench/goals.py "$OUT"/attention.json "$OUT"/kernels.json "$OUT"/moe.json "$OUT"/train_step.json \
    "$OUT"/context.json "$OUT"/checkpointing.json \
    > "$OUT/goals.md" 2>&1
for f in device.txt steps.txt goals.md gpu_tests_attention.txt gpu_tests_other.txt attention.txt kernels.txt moe.txt \
         train_step.txt context.txt checkpointing.txt attention_tiles.txt; do
    echo "=== $f"; tail -25 "$OUT/$f"
done
