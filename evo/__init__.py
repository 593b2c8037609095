"""evo: a Triton-kernel-first framework for training large language models.

The documented flow (InternEvo's):

    args = parse_args()
    initialize_distributed_env(config=args.config, launcher=args.launcher, master_port=args.port, seed=args.seed)
    model = initialize_model_and_parallel_communicator()
    train_dl, dataset_types = build_train_loader_with_data_type()
    val_dls = build_valid_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, val_dls, dataset_types=dataset_types, **vars(args))
    trainer.fit()
"""

from evo.initialize import (build_train_loader_with_data_type, build_valid_loader_with_data_type,
                            initialize_distributed_env, initialize_model_and_parallel_communicator, parse_args)
from evo.weights import load_model
from evo.trainer import Trainer, TrainerBuilder

__version__ = "0.1.0"
__all__ = ["parse_args", "initialize_distributed_env", "initialize_model_and_parallel_communicator",
           "build_train_loader_with_data_type", "build_valid_loader_with_data_type", "Trainer", "TrainerBuilder",
           "load_model"]
