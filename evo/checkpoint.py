"""Checkpoints: save, find the newest complete one, load what is asked for.

A checkpoint is a folder ``<save_ckpt_folder>/<step>/`` holding
- the model and optimizer tensors, written with ``torch.distributed.checkpoint`` (DCP) under fully
  qualified parameter names (``model/<fqn>``, ``optimizer/{master,exp_avg,exp_avg_sq,step}/<fqn>``), so
  a later run with another parallel layout can load them resharded;
- ``train_state.pt``: step counters, the lr scheduler, the loss scaler, the data position and the
  random number generator states (everything needed to continue bit for bit);
- ``config.json``: the resolved config the run used.
It is written under ``.tmp-<step>-...`` and renamed into place only once complete, so a crash never
leaves a half checkpoint that looks complete: a folder named by an integer is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from evo.errors import CheckpointError

TRAIN_STATE = "train_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / TRAIN_STATE).is_file()]
    return folder / str(max(steps)) if steps else None


def save_checkpoint(folder: str | Path, step: int, tensors: dict, train_state: dict, config: dict, is_main: bool,
                    barrier=lambda: None) -> Path:
    """Write a checkpoint for ``step`` atomically; returns its path.

    tensors: {"model": state_dict, "optimizer": fqn-keyed state} saved with DCP (every rank calls this).
    """
    folder = Path(folder)
    final = folder / str(step)
    tmp = folder / f".tmp-{step}"
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a crash during an earlier save
    barrier()
    with warnings.catch_warnings():  # DCP notes that it runs without a process group: expected in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=str(tmp))
    if is_main:
        torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            old = folder / f".old-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(folder)
    barrier()
    return final


def load_checkpoint(path: str | Path, tensors: dict) -> dict:
    """Load the DCP tensors named by ``tensors``' keys in place; return the train state."""
    path = Path(path)
    if not (path / TRAIN_STATE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"'{path}' is not a complete evo checkpoint (no {TRAIN_STATE} or .metadata)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # a mismatch between checkpoint and model is bad input
        # DCP's CheckpointException (a BaseException) carries each rank's traceback: its last line is the cause
        lines = [line for line in str(exc).splitlines() if line.strip()]
        cause = lines[-1].strip() if lines else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: {cause}") from None
    return torch.load(path / TRAIN_STATE, weights_only=False)


def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"'{path}' has no config.json: not an evo checkpoint folder")
    return json.loads(file.read_text())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
