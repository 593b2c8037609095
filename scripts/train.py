"""Train a model: ``python scripts/train.py --config configs/tiny.py [--launcher ...] [KEY=VALUE ...]``."""

import os
import sys

# the repo root replaces the scripts folder on the path: evo imports from a source tree, and
# scripts/tokenize.py does not shadow the standard library's tokenize module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evo.environment import prepare_process  # noqa: E402

prepare_process()  # before torch loads: CPU math that repeats bit for bit (evo/environment.py)

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
