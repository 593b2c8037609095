"""What one run is: its folder, the config it trains with, and what may change between its invocations.

A run is the sequence of invocations (start, stop, resume, ...) that train in one run folder
(``monitor.run_folder``, by default ``runs/<JOB_NAME>``) and save to one checkpoint folder. This module keeps
three rules about it, each where it acts:
- at launch, ``check_run_folder``: a folder that holds another run (a config that computes something else,
  ``run_differences``; ``SAME_RUN_MAY_CHANGE`` lists what may differ) is refused before anything is written;
- when training starts, ``write_run_config``: the run folder's config.json is the config that trained in it;
- after resuming, ``check_not_behind``: a run never starts behind checkpoints already in its save folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from evo.checkpoint import latest_checkpoint
from evo.config import Config, ConfigError, strip_folder_prefix
from evo.errors import CheckpointError


# What may change between the invocations of one run (a resume), everything else in the saved config
# being what the run computes: names and folders, how long it trains (data.total_steps, and the
# lr_scheduler.total_steps that follows it), evaluation, data.skip_batches (InternEvo's way past a bad
# batch on a resume), data.max_bad_lines, the parallel layout (checkpoints reshard), activation
# checkpointing (the same math), checkpointing and monitoring, keys that change nothing in evo, and adam.lr
# (a resume continues the schedule with the new lr, as InternEvo's load_scheduler does; evo.optim.LrSchedule).
SAME_RUN_MAY_CHANGE = ("JOB_NAME", "source", "model_type", "model.checkpoint", "model.compile", "model.num_chunks",
                       "data.total_steps", "adam.lr",
                       "lr_scheduler.total_steps", "data.valid_every",
                       "data.valid_max_batches", "data.valid_micro_num", "data.valid_folder", "data.skip_batches",
                       "data.max_bad_lines", "parallel", "ckpt", "monitor", "extra")


def run_differences(saved: dict, current: dict) -> list[str]:
    """The training-relevant differences between a run's saved config (config.json) and ``current``
    (``Config.to_dict()``), as 'key: A there, B here' strings; keys only one side has are not compared (a
    newer evo may add fields)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if any(key == p or key.startswith(p + ".") for p in SAME_RUN_MAY_CHANGE):
                continue
            if isinstance(v, dict) and v and k != "rope_scaling":
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    old, new = flat(saved), flat(json.loads(json.dumps(current, default=str)))
    return [f"{k}: {old[k]!r} there, {new[k]!r} here" for k in old if k in new and old[k] != new[k]]


def check_run_folder(cfg: Config, run_folder: Path) -> None:
    """Refuse a run folder (or checkpoint folder) that holds another run: one trained with a config whose
    training-relevant content differs (``run_differences``). The reference is the config of the newest
    checkpoint, else the run folder's config.json when its metrics.jsonl has records; a folder with neither
    holds nothing to lose."""
    save = Path(strip_folder_prefix(cfg.ckpt.save_ckpt_folder))
    latest = latest_checkpoint(save)
    saved_file = latest / "config.json" if latest is not None else run_folder / "config.json"
    if latest is None and not _has_records(run_folder / "metrics.jsonl"):
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return  # no readable config to compare with (a foreign folder): the checkpoint loader speaks for it
    diffs = run_differences(saved, cfg.to_dict())
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ConfigError(f"run folder '{run_folder}' holds another run ('{saved_file}' differs from this config: "
                          f"{'; '.join(diffs[:3])}{more}): use another JOB_NAME (or monitor.run_folder) for this "
                          f"config, or remove '{run_folder}' to start afresh")


def _has_records(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.strip() for line in f)
    except OSError:
        return False


def write_run_config(run_folder: Path, cfg: Config, is_main: bool) -> None:
    """Write the run folder's config.json (main rank), when training starts: a run folder's config is the one
    that trained in it."""
    if is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def check_not_behind(save_folder: Path, step: int) -> None:
    """Refuse to train from ``step`` when ``save_folder`` holds later checkpoints (``ckpt.auto_resume`` off):
    they would be overwritten one by one, and a later auto-resume would pick the old run's newest."""
    latest = latest_checkpoint(save_folder)
    if latest is not None and int(latest.name) > step:
        raise CheckpointError(
            f"'{save_folder}' holds checkpoints up to step {latest.name} and ckpt.auto_resume is False: this "
            f"run would start at step {step + 1} and overwrite them. To continue that run, set "
            "ckpt.auto_resume=True (the default); to start afresh, use another JOB_NAME (or monitor.run_folder) "
            f"or remove '{save_folder}'")
