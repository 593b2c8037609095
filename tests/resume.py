"""What every test that resumes a run asserts, and the break it must catch.

A resume that silently starts afresh rewrites the same records (a fresh run opens metrics.jsonl with "w" and a
deterministic run computes the same steps), so comparing a resumed run's final records with an uninterrupted
run's proves nothing about the resume. ``assert_resumed`` checks what only a resume does: the log line naming
the checkpoint it loaded, the newest complete one, and a first record for the step after it.
``no_resume_search`` and ``python -m tests.no_resume_search`` disable auto-resume's search for a checkpoint,
so that a test can show these assertions fail without it (tests/test_stopping.py keeps one that does)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

LOADED = "loaded model, optimizer, sampler, scheduler from checkpoint {path} (step {step})"


def newest_complete(save_folder: Path) -> Path | None:
    """The checkpoint auto-resume must pick, found without evo: the highest step-named folder that holds its
    train_state.pt (written last, after every shard)."""
    save_folder = Path(save_folder)
    if not save_folder.is_dir():
        return None
    steps = [int(p.name) for p in save_folder.iterdir() if p.name.isdigit() and (p / "train_state.pt").is_file()]
    return save_folder / str(max(steps)) if steps else None


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records in order, without a last line cut short by a kill (or being written); any other
    line that is not JSON is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            assert number == len(lines), f"{path}:{number} is not JSON: {line[:200]!r}"
    return out


def assert_resumed(log: str, checkpoint: Path, before: list[dict], after: list[dict]) -> None:
    """The run whose log is ``log`` resumed from ``checkpoint``: it says so, it kept the records up to that step
    of ``before`` (metrics.jsonl before it started), and its first record of its own is the next step."""
    assert checkpoint is not None, "there was no complete checkpoint to resume from: nothing to check"
    step = int(Path(checkpoint).name)
    line = LOADED.format(path=checkpoint, step=step)
    assert line in log, (f"the run did not resume from '{checkpoint}': its log has no line '{line}'; its log "
                         f"ends:\n{log[-1500:]}")
    kept = [r for r in before if r["step"] <= step]
    assert after[:len(kept)] == kept, f"the resumed run changed the records up to step {step}"
    assert len(after) > len(kept), f"the resumed run recorded no step after {step}"
    assert after[len(kept)]["step"] == step + 1, (
        f"the run did not resume from '{checkpoint}': its first record is step {after[len(kept)]['step']}, "
        f"not {step + 1}")


@contextlib.contextmanager
def no_resume_search():
    """In this process, auto-resume finds no checkpoint in the save folder (the search is what is disabled)."""
    import evo.checkpoint
    import evo.trainer

    # what the trainer sees at start, and only that (the old scope): no checkpoint to resume from, none to be behind
    saved = evo.checkpoint.CheckpointManager.resume_newest, evo.trainer.check_not_behind
    evo.checkpoint.CheckpointManager.resume_newest = lambda self: None
    evo.trainer.check_not_behind = lambda save_folder, step: None
    try:
        yield
    finally:
        evo.checkpoint.CheckpointManager.resume_newest, evo.trainer.check_not_behind = saved


@contextlib.contextmanager
def captured_log(name: str = "evo"):
    """The messages logged to logger ``name`` (and below it) at INFO or above while inside, as a list."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Keep(logging.INFO)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
