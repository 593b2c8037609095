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


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be read (a missing, truncated or corrupt file), as opposed to one that does not fit
    the model: auto-resume then falls back to the previous complete checkpoint."""


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / TRAIN_STATE).is_file()]
    return [folder / str(step) for step in sorted(steps, reverse=True)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder``, or None."""
    found = complete_checkpoints(folder)
    return found[0] if found else None


def save_checkpoint(folder: str | Path, step: int, tensors: dict, train_state: dict, config: dict, is_main: bool,
                    barrier=lambda: None, all_ok=lambda ok: ok, keep_latest: int = 0) -> Path:
    """Write a checkpoint for ``step`` atomically; returns its path.

    tensors: {"model": state_dict, "optimizer": fqn-keyed state} saved with DCP (every rank calls this).
    ``all_ok(ok)``: whether every rank's ``ok`` is True (a collective), so that a failed write (disk full, no
    permission) stops every rank alike: it raises ``CheckpointError`` on all of them, the partial folder is
    removed and the complete checkpoints are left as they were. ``keep_latest`` > 0: afterwards, only that
    many complete checkpoints are kept (the older ones removed once the new one is in place).
    """
    folder = Path(folder)
    final = folder / str(step)
    tmp = folder / f".tmp-{step}"
    error = None
    try:
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
    except (OSError, CheckpointException) as exc:
        error = _cause(exc)
    if not all_ok(error is None):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint '{final}': {error or 'another rank failed to write'}; "
                              f"the complete checkpoints in '{folder}' are untouched")
    if is_main:
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            old = folder / f".old-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(folder)
        for older in complete_checkpoints(folder)[keep_latest:] if keep_latest > 0 else ():
            shutil.rmtree(older, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, tensors: dict) -> dict:
    """Load the DCP tensors named by ``tensors``' keys in place; return the train state.

    Raises ``CheckpointError`` naming the first tensor the checkpoint lacks or holds in another shape (it does not
    fit this model), and ``CorruptCheckpointError`` when a file is missing or cannot be read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    for name in (TRAIN_STATE, ".metadata"):
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"checkpoint '{path}' is incomplete: it has no {name}")
    try:
        state = torch.load(path / TRAIN_STATE, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a damaged file
        raise CorruptCheckpointError(f"'{path / TRAIN_STATE}' cannot be read (truncated or corrupt?): "
                                     f"{_cause(exc)}") from None
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001
        raise CorruptCheckpointError(f"'{path / '.metadata'}' cannot be read (truncated or corrupt?): "
                                     f"{_cause(exc)}") from None
    _check_fits(path, tensors, stored)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # names and shapes fit: a shard is missing or damaged
        raise CorruptCheckpointError(f"checkpoint '{path}' could not be read (a shard file missing, truncated or "
                                     f"corrupt?): {_cause(exc)}") from None
    return state


def _check_fits(path: Path, tensors: dict, stored: dict) -> None:
    """Every tensor asked for is in the checkpoint, in the same (global) shape; else one line naming the first."""
    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            yield prefix, value

    for key, tensor in walk("", tensors):
        meta = stored.get(key)
        if meta is None:
            raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: it has no '{key}'")
        size = getattr(meta, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: '{key}' is "
                                  f"{tuple(size)} there and {tuple(tensor.shape)} here")


def _cause(exc: BaseException) -> str:
    """The last line of an error: DCP's CheckpointException (a BaseException) carries each rank's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


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
