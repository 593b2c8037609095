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

import copy
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
    pending = PendingSave(Path(folder), step, train_state, config, is_main, keep_latest)
    try:
        pending.prepare(barrier)
        with warnings.catch_warnings():  # DCP notes that it runs without a process group: expected in one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, checkpoint_id=str(pending.tmp))
    except (OSError, CheckpointException) as exc:
        pending.error = _cause(exc)
    return pending.finish(barrier, all_ok)


class PendingSave:
    """A checkpoint being written under ``<folder>/.tmp-<step>``: ``finish`` completes it (train state, config,
    the rename into place) once every rank has written its tensors, or removes it when one failed."""

    def __init__(self, folder: Path, step: int, train_state: dict, config: dict, is_main: bool, keep_latest: int = 0):
        self.folder, self.step, self.is_main, self.keep_latest = folder, step, is_main, keep_latest
        self.train_state, self.config = copy.deepcopy(train_state), config  # as they are now, not when finished
        self.tmp, self.final = folder / f".tmp-{step}", folder / str(step)
        self.future = None  # an asynchronous save's (dcp.async_save)
        self.error: str | None = None

    def prepare(self, barrier) -> None:
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)  # the remains of a crash during an earlier save
        barrier()

    def finish(self, barrier, all_ok) -> Path:
        if self.future is not None:
            try:
                self.future.result()
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported below, on every rank
                self.error = self.error or _cause(exc)
        try:
            if self.is_main and self.error is None:
                torch.save(self.train_state, self.tmp / TRAIN_STATE)
                (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, default=str))
                _fsync_tree(self.tmp)
        except OSError as exc:
            self.error = _cause(exc)
        if not all_ok(self.error is None):
            if self.is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint '{self.final}': "
                                  f"{self.error or 'another rank failed to write'}; the complete checkpoints in "
                                  f"'{self.folder}' are untouched")
        if self.is_main:
            replace_folder(self.tmp, self.final)  # the same step saved again (a resumed run): replaced whole
            _fsync_dir(self.folder)
            for older in complete_checkpoints(self.folder)[self.keep_latest:] if self.keep_latest > 0 else ():
                shutil.rmtree(older, ignore_errors=True)
        barrier()
        return self.final


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``; one already there is moved aside first and removed only once
    the new one is in place."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def start_async_save(folder: str | Path, step: int, tensors: dict, train_state: dict, config: dict, is_main: bool,
                     group=None, barrier=lambda: None, keep_latest: int = 0) -> PendingSave:
    """Begin writing a checkpoint in the background (``dcp.async_save`` over ``group``, a process group of its own:
    its collectives then never interleave with training's). The tensors are copied to CPU memory before this
    returns, so training may go on changing them; ``PendingSave.finish`` waits for the writes and puts the folder
    in place. A crash before that leaves only the temporary folder: the complete checkpoints stay."""
    import torch.distributed as dist

    pending = PendingSave(Path(folder), step, train_state, config, is_main, keep_latest)
    try:
        pending.prepare(barrier)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            pending.future = dcp.async_save(tensors, checkpoint_id=str(pending.tmp), process_group=group,
                                            no_dist=not (dist.is_available() and dist.is_initialized()))
    except (OSError, CheckpointException) as exc:
        pending.error = _cause(exc)
    return pending


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
