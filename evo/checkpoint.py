"""Checkpoints: save, find the newest complete one, load what is asked for; ``CheckpointManager`` decides when.

A checkpoint is a folder ``<save_ckpt_folder>/<step>/`` holding
- the model and optimizer tensors, written with ``torch.distributed.checkpoint`` (DCP) under fully
  qualified parameter names (``model/<fqn>``, ``optimizer/{master,exp_avg,exp_avg_sq,step}/<fqn>``), so
  a later run with another parallel layout can load them resharded;
- ``train_state.pt``: step counters, the lr scheduler, the loss scaler, the data position and the
  random number generator states (everything needed to continue bit for bit);
- ``config.json``: the resolved config the run used.
It is written under ``.tmp-<step>-...`` and renamed into place only once complete, so a crash never
leaves a half checkpoint that looks complete: a folder named by an integer is complete.

The parts of a run that a checkpoint holds are Stateful (``state_dict`` / ``load_state_dict``), each under the key
it has always had, so a checkpoint written by any earlier evo still loads:

    part                      where                        key(s)
    model                     DCP, loaded in place         model/<fqn>
    optimizer (fp32 masters,  DCP, loaded in place, then   optimizer/{master,exp_avg,exp_avg_sq,step}/<fqn>
      AdamW's moments)        ``load_state_dict``
    loss scaler               train_state.pt               scaler
    lr schedule               train_state.pt               scheduler
    loader (per dp rank)      train_state.pt               sampler (a list, one per data-parallel rank)
    trainer counters          train_state.pt               step, num_consumed_tokens, inf_nan_skip_batches
    random generators         train_state.pt               rng
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from evo.config import model_config
from evo.errors import CheckpointError
from evo.monitor import logger

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


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose reading would run code (a pickle naming a function or class that a checkpoint does not
    hold): refused before anything from it runs, and never passed over for an older one."""


# What a checkpoint's pickles may name. train_state.pt: torch's own safe types (weights_only=True) and numpy's RNG
# state (an array of uint32); .metadata: DCP's metadata classes and the torch and pathlib types they hold.
def _numpy_state_types() -> list:
    import numpy as np

    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_METADATA_TYPES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "strided", "contiguous_format", "channels_last", "preserve_format"},  # and every dtype
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "pathlib._local":  # Python 3.13 names its paths so; read on any Python as pathlib's
            module = "pathlib"
            if name in _METADATA_TYPES["pathlib"]:
                import pathlib

                return getattr(pathlib, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # any dtype a tensor can have
        if name not in _METADATA_TYPES.get(module, ()):
            raise UnsafeCheckpointError(f"{module}.{name}")
        return super().find_class(module, name)


def read_train_state(path: Path) -> dict:
    """A checkpoint's train_state.pt, read with ``weights_only=True`` (plus numpy's RNG state types): a file that
    names anything else is refused (``UnsafeCheckpointError``) before it runs; one that cannot be read is
    ``CorruptCheckpointError``."""
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is a damaged file
        raise CorruptCheckpointError(f"'{path}' cannot be read (truncated or corrupt?): {_cause(exc)}") from None
    allowed = _numpy_state_types()
    names = {f"{t.__module__}.{t.__qualname__}" for t in allowed if not isinstance(t, tuple)}
    names |= {t[1] for t in allowed if isinstance(t, tuple)}
    if named - names:
        raise UnsafeCheckpointError(f"'{path}' would run code when read (it names {', '.join(sorted(named - names))}"
                                    ", which a train state does not hold): refused; nothing from it has run")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CorruptCheckpointError(f"'{path}' cannot be read (truncated or corrupt?): {_cause(exc)}") from None


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by an unpickler that admits only DCP's metadata classes and the
    torch, pathlib and builtin types they hold (torch's own reader unpickles it with plain ``pickle.load``)."""

    def read_metadata(self, *args, **kwargs):
        file = Path(self.path) / ".metadata"
        try:
            with open(file, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(f"'{file}' would run code when read (it names {exc}, which DCP's metadata "
                                        "does not hold): refused; nothing from it has run") from None
        except Exception as exc:  # noqa: BLE001
            raise CorruptCheckpointError(f"'{file}' cannot be read (truncated or corrupt?): {_cause(exc)}") from None
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"'{file}' holds a {type(metadata).__name__}, not DCP's metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


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
    state = read_train_state(path / TRAIN_STATE)
    reader = SafeReader(path)
    stored = reader.read_metadata().state_dict_metadata
    _check_fits(path, tensors, stored)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=reader)
    except (Exception, CheckpointException) as exc:  # names and shapes fit: a shard is missing or damaged
        raise CorruptCheckpointError(f"checkpoint '{path}' could not be read (a shard file missing, truncated or "
                                     f"corrupt?): {_cause(exc)}") from None
    return state


def require_tensor(path: Path, key: str, meta) -> None:
    """Refuse entry ``key`` of checkpoint ``path`` unless DCP stored it as a tensor: bytes are unpickled by DCP with
    ``weights_only=False``, which would run what they say."""
    if not isinstance(meta, TensorStorageMetadata):
        raise UnsafeCheckpointError(f"checkpoint '{path}' holds '{key}' as bytes, not a tensor: refused (reading "
                                    "it could run code); nothing from it has run")


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
        require_tensor(path, key, meta)
        size = getattr(meta, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer: '{key}' is "
                                  f"{tuple(size)} there and {tuple(tensor.shape)} here")


def _cause(exc: BaseException) -> str:
    """The last line of an error: DCP's CheckpointException (a BaseException) carries each rank's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def read_config(path: str | Path) -> dict:
    """The config.json of checkpoint ``path`` (the run's resolved config), as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"'{path}' has no config.json: not an evo checkpoint folder")
    return json.loads(file.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint in a folder of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if (path / "config.json").is_file() and (path / ".metadata").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"'{path}' is neither an evo checkpoint nor a folder holding one")
    return latest


def checkpoint_model_config(path: Path):
    """(evo ModelConfig, the run's tokenizer_path) from a checkpoint's config.json."""
    raw = read_config(path)
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"'{path}/config.json' has no model section")
    return model_config(raw["model"], raw.get("model_type")), (raw.get("data") or {}).get("tokenizer_path")


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


COUNTERS = ("step", "num_consumed_tokens", "inf_nan_skip_batches")  # the trainer's, at the top of train_state.pt


class CheckpointManager:
    """What to save and when, resuming, damaged checkpoints and background saves: the trainer's one door to
    checkpoints. ``parts``: the run's Stateful parts by role, ``model``, ``optimizer`` (whose ``scaler`` is saved
    with it), ``scheduler``, ``loader`` and ``counters`` (the table in this module's docstring).

    cfg: the run's ``Config`` (its ``ckpt`` section says what and when; the whole is saved as config.json);
    ctx: the ``ParallelContext`` (collectives that keep every rank's decision the same)."""

    def __init__(self, cfg, ctx, save_folder: Path, **parts):
        self.cfg, self.ctx, self.save_folder = cfg, ctx, Path(save_folder)
        self.model, self.optimizer, self.scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
        self.loader, self.counters = parts["loader"], parts["counters"]
        self.last_save_step: int | None = None
        self.last_path: Path | None = None  # the newest checkpoint this run completed
        self._pending: PendingSave | None = None  # a checkpoint being written in the background (ckpt.async_upload)
        # the background writes' own process group: their collectives never interleave with training's
        self._group = torch.distributed.new_group(backend="gloo") if cfg.ckpt.async_upload and \
            ctx.distributed else None

    # ------------------------------------------------------------------ saving
    def save_if_due(self, step: int, force: bool = False, background: bool = True) -> Path | None:
        """Save every ``ckpt.checkpoint_every`` steps, or now with ``force`` (once per step). With
        ``ckpt.async_upload`` (and ``background``) the tensors are written in the background and the checkpoint
        appears when ``finish_pending`` completes it; returns its path, or None when nothing was due."""
        c = self.cfg.ckpt
        due = force or (c.checkpoint_every > 0 and step % c.checkpoint_every == 0)
        if not c.enable_save_ckpt or not due or self.last_save_step == step:
            return None
        self.finish_pending(wait=True)  # one save at a time
        train_state = {**self.counters.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "scaler": self.optimizer.scaler.state_dict(), "sampler": self._loader_states(),
                       "rng": rng_state()}
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        self.last_save_step = step
        if c.async_upload and background:
            self._pending = start_async_save(self.save_folder, step, tensors, train_state, self.cfg.to_dict(),
                                             self.ctx.is_main, self._group, self.ctx.barrier, c.keep_latest)
            return self._pending.final
        self.last_path = save_checkpoint(self.save_folder, step, tensors, train_state, self.cfg.to_dict(),
                                         self.ctx.is_main, self.ctx.barrier, self.ctx.all_true, c.keep_latest)
        logger.info("saved checkpoint %s", self.last_path)
        return self.last_path

    def finish_pending(self, wait: bool = False) -> None:
        """Complete the background save in progress: when every rank's writes are done (a collective), or with
        ``wait``, after waiting for them."""
        pending = self._pending
        if pending is None or not self.ctx.all_true(wait or pending.future is None or pending.future.done()):
            return
        self._pending = None
        self.last_path = pending.finish(self.ctx.barrier, self.ctx.all_true)
        logger.info("saved checkpoint %s (written in the background)", self.last_path)

    def _loader_states(self) -> list:
        """Every data-parallel rank's loader state, in rank order."""
        state = self.loader.state_dict()
        if self.ctx.dp_size == 1:
            return [state]
        states = [None] * self.ctx.dp_size
        torch.distributed.all_gather_object(states, state, group=self.ctx.dp_group)
        return states

    # ------------------------------------------------------------------ loading
    def load(self, path: str | Path, content=("all",)) -> dict:
        """Load from checkpoint ``path`` what ``content`` names (InternEvo's ``load_ckpt_info`` contents); returns
        the checkpoint's train state.

        - ``model``: the weights (the fp32 masters are taken from them);
        - ``optimizer``: the fp32 masters (the model is taken from them), AdamW's moments, the fp16 loss scaler;
        - ``scheduler``: the run's position: the trainer's counters and the lr schedule at that step, so the run
          continues to ``data.total_steps`` (InternEvo positions its scheduler from the step count it loads
          with it);
        - ``sampler``: the data position and the random number generator states;
        - ``all``: everything (what auto-resume loads).
        """
        content = set(content)
        if "all" in content:
            content = {"model", "optimizer", "scheduler", "sampler"}
        tensors = {part: getattr(self, part).state_dict() for part in ("model", "optimizer") if part in content}
        state = load_checkpoint(path, tensors)
        if "optimizer" in content:
            self.optimizer.load_state_dict(tensors["optimizer"])  # loaded in place: the model follows the masters
            self.optimizer.scaler.load_state_dict(state["scaler"])
        elif "model" in content:
            self.optimizer.sync_masters_from_model()
        if "scheduler" in content:
            self.counters.load_state_dict({key: state[key] for key in COUNTERS})
            self.last_save_step = state["step"]
            self._continue_schedule(state)
        if "sampler" in content:
            states = state["sampler"]  # one per data-parallel rank (a streaming loader's differ)
            self.loader.load_state_dict(states[self.ctx.dp_rank] if len(states) == self.ctx.dp_size else states[0])
            set_rng_state(state["rng"])
        logger.info("loaded %s from checkpoint %s (step %d)", ", ".join(sorted(content)), path, state["step"])
        return state

    def _continue_schedule(self, state: dict) -> None:
        """The lr schedule at the checkpoint's step, in this config's shape (``LrSchedule.load_state_dict``); a
        warning when that lr differs from the one the checkpoint's schedule had."""
        saved_lr = self.scheduler.load_state_dict(state["scheduler"])
        now = self.optimizer.param_groups[0]["lr"]
        if saved_lr is None:  # a plain LambdaLR: positioned as saved, nothing to compare
            return
        if self.ctx.is_main and not math.isclose(now, saved_lr, rel_tol=1e-6):
            cfg = self.cfg
            logger.warning("step %d runs at lr %.4g where the checkpoint's schedule had %.4g: this config's "
                           "schedule differs (adam.lr %g, lr_scheduler.total_steps %d, warmup_ratio %g)",
                           state["step"] + 1, now, saved_lr, cfg.adam.lr, cfg.lr_scheduler.total_steps,
                           cfg.lr_scheduler.warmup_ratio)

    def resume_newest(self) -> Path | None:
        """Load everything from the newest complete checkpoint in the save folder that can be read; a damaged one
        is named and passed over. Returns the checkpoint loaded, or None when the folder holds none."""
        found = complete_checkpoints(self.save_folder)
        for i, path in enumerate(found):
            try:
                self.load(path)
                return path
            except CorruptCheckpointError as exc:
                if i + 1 == len(found):
                    raise
                logger.warning("%s; resuming from the previous complete checkpoint, '%s'", exc, found[i + 1])
        return None
