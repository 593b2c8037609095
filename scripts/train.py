"""Train a model: ``python scripts/train.py --config configs/tiny.py [--launcher ...] [KEY=VALUE ...]``."""

import os
import sys

# the repo root replaces the scripts folder on the path: evo imports from a source tree, and
# scripts/tokenize.py does not shadow the standard library's tokenize module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _mkl_branch() -> str:
    """MKL's strict code path for this CPU: a precaution, as MKL documents that without a pinned, strict
    branch its results may depend on how inputs happen to be aligned in memory (see docs/training.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "AUTO,STRICT"
    if "avx512f" in flags:
        return "AVX512,STRICT"
    return "AVX2,STRICT" if "avx2" in flags else "COMPATIBLE"


# Bit-reproducible CPU math, set before torch loads MKL: a pinned strict branch, and no dynamic thread
# counts (MKL may otherwise use fewer threads when the machine is busy: another reduction order).
for _name, _value in (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", _mkl_branch())):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

# Flush denormal floats to zero (they slow CPU math many-fold late in training). The flag is per
# thread and new threads copy it from their creator: set it before any worker thread exists, so every
# thread computes alike (a thread pool started earlier would keep the old flag, and results would
# depend on which thread ran which chunk).
torch.set_flush_denormal(True)

from evo import (TrainerBuilder, build_train_loader_with_data_type, build_valid_loader_with_data_type,  # noqa: E402
                 initialize_distributed_env, initialize_model_and_parallel_communicator, parse_args)
from evo.cli import run  # noqa: E402


def main():
    args = parse_args()
    initialize_distributed_env(config=args.config, launcher=args.launcher, master_port=args.port, seed=args.seed)
    model = initialize_model_and_parallel_communicator()
    train_dl, dataset_types = build_train_loader_with_data_type()
    val_dls = build_valid_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, val_dls, dataset_types=dataset_types, **vars(args))
    trainer.fit()


if __name__ == "__main__":
    run(main)
