"""evo: a Triton-kernel-first framework for training large language models.

The documented flow (InternEvo's):

    args = parse_args()
    initialize_distributed_env(config=args.config, launcher=args.launcher, master_port=args.port, seed=args.seed)
    model = initialize_model_and_parallel_communicator()
    train_dl, dataset_types = build_train_loader_with_data_type()
    val_dls = build_valid_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, val_dls, dataset_types=dataset_types, **vars(args))
    trainer.fit()

The public names are imported on first use (``from evo import TrainerBuilder`` works as usual), so that importing
evo loads no torch: ``scripts/train.py`` first calls ``evo.environment.prepare_process()``, which must set MKL's and
OpenMP's variables before torch loads them.
"""

__version__ = "0.1.0"
__all__ = ["parse_args", "initialize_distributed_env", "initialize_model_and_parallel_communicator",
           "build_train_loader_with_data_type", "build_valid_loader_with_data_type", "Trainer", "TrainerBuilder",
           "load_model"]


def __getattr__(name: str):
    if name in __all__[:5]:
        from evo import initialize
        return getattr(initialize, name)
    if name in ("Trainer", "TrainerBuilder"):
        from evo import trainer
        return getattr(trainer, name)
    if name == "load_model":
        from evo.weights import load_model
        return load_model
    raise AttributeError(f"module 'evo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
