"""Launch: command line, launchers (local, torch, slurm), seeds, and the one launch state.

The InternEvo-style entry points (``initialize_distributed_env`` and the builders after it) share
exactly one piece of module state, ``_LAUNCH``: the resolved config, the ParallelContext and the run
folder, created by ``initialize_distributed_env``. Everything below the entry points receives what
it needs as arguments.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evo.config import Config, ConfigError, resolve_config
from evo.monitor import logger, setup_logging
from evo.parallel.context import ParallelContext
from evo.run_folder import check_run_folder

LAUNCHERS = ("local", "torch", "slurm")


class ConfigArg(str):
    """The ``--config`` path as parsed by ``parse_args``, carrying the command line's KEY=VALUE overrides,
    so ``initialize_distributed_env(config=args.config, ...)`` keeps InternEvo's signature."""

    overrides: tuple[str, ...] = ()

    def __new__(cls, path: str, overrides=()):
        obj = super().__new__(cls, path)
        obj.overrides = tuple(overrides)
        return obj


@dataclass
class LaunchState:
    config: Config
    ctx: ParallelContext
    run_folder: Path
    seed: int
    sizes: tuple[int, int] | None = None  # the whole model's (parameters, matmul parameters), counted once

    def model_sizes(self) -> tuple[int, int]:
        """``evo.model.flops.whole_model_sizes`` of the config's model, counted on the first call."""
        if self.sizes is None:
            from evo.model.flops import whole_model_sizes

            self.sizes = whole_model_sizes(self.config.model)
        return self.sizes


_LAUNCH: LaunchState | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--config FILE [--launcher local|torch|slurm] [--port N] [--seed N] [--profiling] [--dry-run]
    [KEY=VALUE ...]``. With ``--dry-run`` it prints what the run would be (``evo.dry_run``) and exits 0."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train a language model with evo.")
    parser.add_argument("--config", required=True, help="Python config file (InternEvo format)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="how processes were started; default: detected from the environment")
    parser.add_argument("--port", type=int, default=8888, help="master port when the launcher does not set one")
    parser.add_argument("--seed", type=int, default=1024, help="random seed (model init and everything not data)")
    parser.add_argument("--profiling", action="store_true", help="write a torch.profiler trace of a few steps")
    parser.add_argument("--dry-run", action="store_true", help="check the config and layout, build the model on the "
                        "meta device, say what would be trained on what data; write nothing, exit 0")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides by dotted path, e.g. data.total_steps=20 model.num_layers=2")
    args = parser.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"argument '{item}': overrides are KEY=VALUE, e.g. data.total_steps=20")
    args.config = ConfigArg(args.config, args.overrides)
    if args.dry_run:  # like --help: the answer, then exit
        from evo.dry_run import dry_run

        print(dry_run(args.config), flush=True)
        raise SystemExit(0)
    return args


def detect_launcher(env=os.environ) -> str:
    """torchrun's variables mean 'torch' (also inside a slurm job), srun's alone 'slurm', neither 'local'."""
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return "torch"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "local"


def _slurm_master(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[01-04,07]" -> "node01" without scontrol
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def _ranks(launcher: str, master_port: int) -> tuple[int, int, int]:
    env = os.environ
    if launcher == "torch":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(master_port))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _slurm_master(env.get("SLURM_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(master_port))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initialize_distributed_env(config, launcher: str | None = None, master_port: int = 8888, seed: int = 1024,
                               overrides=None) -> LaunchState:
    """Resolve the config, start the process group, seed, and create the launch state.

    config: a config file path (with ``parse_args``' overrides attached), a dict of sections, or a
    ``Config``. launcher: local, torch or slurm; None detects it from the environment.
    """
    global _LAUNCH
    launcher = launcher or detect_launcher()
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    rank, world_size, local_rank = _ranks(launcher, master_port)
    cfg = resolve_config(config, overrides, world_size)  # the layout against this world first
    ctx = ParallelContext.from_config(cfg.parallel, world_size, rank, local_rank)  # checks, device, groups
    device = ctx.device
    if cfg.model.dtype == "torch.tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_folder = Path(cfg.monitor.run_folder)  # resolved by validation: runs/<JOB_NAME> unless set
    check_run_folder(cfg, run_folder)  # every rank: each must fail alike, before anything is written
    setup_logging(run_folder, ctx.is_main)
    set_seed(seed)
    logger.info("launcher=%s world_size=%d device=%s config=%s run_folder=%s", launcher, world_size, device,
                cfg.source, run_folder)
    logger.info("layout: %s", ctx.describe())
    if ctx.ep_size > 1 and not cfg.parallel.expert.no_tp:
        logger.info("parallel.expert.no_tp=False (InternEvo's default) is read as True: evo never splits an expert "
                    "over the tensor group")
    _LAUNCH = LaunchState(cfg, ctx, run_folder, seed)
    return _LAUNCH


def launch_state() -> LaunchState:
    if _LAUNCH is None:
        raise RuntimeError("call initialize_distributed_env(...) first")
    return _LAUNCH


def initialize_model_and_parallel_communicator() -> torch.nn.Module:
    """Build the model from the launch config, on the launch device, initialized from the launch seed. In one
    process a 16-bit model also keeps its fp32 initial values for the optimizer's masters (``TrainerBuilder``
    takes them over); a model that is not trained holds them until it is dropped."""
    from evo.parallel import MemoryOptions, build_parallel_model, format_bytes, memory_estimate

    state = launch_state()
    cfg = state.config.model
    memory = MemoryOptions.from_config(state.config)
    model = build_parallel_model(cfg, state.ctx, seed=state.seed, for_training=True, memory=memory)
    total, _ = state.model_sizes()  # the whole model's, whatever part of it this rank holds
    logger.info("model: %.2fM parameters, dtype %s", total / 1e6, cfg.dtype)
    mem = memory_estimate(model, state.ctx, cfg, memory, state.config.data.packed_length)
    logger.info("memory per rank (estimate): %s%s", ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}"
                                                              for k, v in mem.items()), memory.note())
    return model


def build_train_loader_with_data_type():
    """(train loader, dataset type names) for the launch config."""
    from evo.data import build_train_loader

    state = launch_state()
    return build_train_loader(state.config.data, state.ctx, state.config.model.vocab_size)


def build_valid_loader_with_data_type() -> dict:
    """{name: validation loader} for the launch config."""
    from evo.data import build_valid_loaders

    state = launch_state()
    loaders = build_valid_loaders(state.config.data, state.ctx, state.config.model.vocab_size)
    if not loaders:
        logger.info("no validation data (data.valid_folder, or data.valid_split of the training data): no "
                    "evaluation will run")
    return loaders
