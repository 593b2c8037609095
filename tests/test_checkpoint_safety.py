"""Crash safety of checkpoints: a damaged newest checkpoint is named on one line and the previous complete one is
resumed; load errors say what happened (a tensor that does not fit, with both shapes; a file that cannot be
read); a failed save leaves the complete checkpoints intact and stops the run with one line;
``ckpt.keep_latest`` removes older checkpoints only after a newer one is complete."""

import errno
import json
import re
import shutil

import pytest
import torch

from tests.helpers import run_script, small_sections, write_config
from tests.resume import assert_resumed
from tests.test_trainer import make_trainer, metrics, trained
from evo import checkpoint
from evo.checkpoint import CorruptCheckpointError, complete_checkpoints, load_checkpoint
from evo.errors import CheckpointError


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def shard(ckpt):
    return max((p for p in ckpt.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / "train_state.pt"), "train_state.pt' cannot be read (truncated or corrupt?)"),
    (lambda c: truncate(shard(c)), "could not be read (a shard file missing, truncated or corrupt?)"),
    (lambda c: shard(c).unlink(), "could not be read (a shard file missing, truncated or corrupt?)"),
    (lambda c: (c / ".metadata").unlink(), "is incomplete: it has no .metadata"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, damage, named):
    trained(tmp_path, "run")  # checkpoints at steps 2 and 4
    ckpts = tmp_path / "run" / "checkpoints"
    ref = [(r["step"], r["loss"]) for r in metrics(tmp_path / "run") if "loss" in r]
    shutil.copytree(ckpts / "4", tmp_path / "good-4")
    damage(ckpts / "4")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    result = run_script("scripts/train.py", "--config", str(run_config(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if "resuming from the previous complete checkpoint" in line]
    assert len(warning) == 1 and named in warning[0] and str(ckpts / "4") in warning[0]
    assert_resumed(result.stderr, ckpts / "2", [], metrics(tmp_path / "run"))
    again = [(r["step"], r["loss"]) for r in metrics(tmp_path / "run") if "loss" in r]
    assert again == ref[2:4]  # steps 3 and 4 trained again from the step-2 checkpoint, exactly
    # the damaged one was replaced by a good save: every tensor of it reads, equal to the original's
    written, original = every_tensor(ckpts / "4"), every_tensor(tmp_path / "good-4")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


def every_tensor(path):
    """Every tensor of the checkpoint at ``path`` (model and optimizer), read from its shards."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
               if hasattr(m, "size")}
    dcp.load(tensors, checkpoint_id=str(path))
    return tensors


def run_config(tmp_path):
    """The config of ``trained(tmp_path, "run")`` as a file, for scripts/train.py."""
    sections = small_sections(ckpt=dict(checkpoint_every=2), monitor=dict(run_folder=str(tmp_path / "run")))
    return write_config(tmp_path / "cfg.py", sections)


def test_the_only_checkpoint_damaged_is_one_line_and_exit_2(tmp_path):
    trained(tmp_path, "run", ckpt=dict(checkpoint_every=0))  # one checkpoint, at the end (step 4)
    truncate(tmp_path / "run" / "checkpoints" / "4" / "train_state.pt")
    sections = small_sections(data=dict(total_steps=6), monitor=dict(run_folder=str(tmp_path / "run")))
    result = run_script("scripts/train.py", "--config", str(write_config(tmp_path / "cfg.py", sections)))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("evo: error: '") and "train_state.pt' cannot be read (truncated or corrupt?)" in line
    assert "Traceback" not in result.stderr


def test_a_checkpoint_of_another_shape_names_the_first_tensor_and_both_shapes(tmp_path):
    trained(tmp_path, "run")
    with pytest.raises(CheckpointError) as err:
        make_trainer(tmp_path, folder="wider", model=dict(hidden_size=128),
                     ckpt=dict(load_ckpt_info=dict(path=str(tmp_path / "run" / "checkpoints" / "4"))))
    assert not isinstance(err.value, CorruptCheckpointError)
    assert str(err.value) == (f"checkpoint '{tmp_path / 'run' / 'checkpoints' / '4'}' does not fit this "
                              "model/optimizer: 'model.tok_embeddings.weight' is (300, 64) there and (300, 128) here")


def test_a_missing_checkpoint_path_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"^'ckpt.load_ckpt_info.path' '.*nowhere' is not a folder$"):
        make_trainer(tmp_path, ckpt=dict(load_ckpt_info=dict(path=str(tmp_path / "nowhere"))))
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*nowhere' does not exist$"):
        load_checkpoint(tmp_path / "nowhere", {})


@pytest.mark.parametrize("failing", ["train_state", "shards"])
def test_a_save_that_fails_leaves_the_complete_checkpoints_and_stops_with_one_line(tmp_path, monkeypatch, failing):
    trainer = trained(tmp_path, "run", data=dict(total_steps=2))  # a complete checkpoint at step 2
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in complete_checkpoints(trainer.save_folder)}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch if failing == "train_state" else checkpoint.dcp, "save", disk_full)
    trainer.step_count = 3
    with pytest.raises(CheckpointError) as err:
        trainer.try_save_checkpoint(force=True)
    assert re.fullmatch(re.escape(f"could not write checkpoint '{trainer.save_folder / '3'}': ") + "(OSError: )?"
                        + re.escape(f"[Errno 28] No space left on device; the complete checkpoints in "
                                    f"'{trainer.save_folder}' are untouched"), str(err.value))
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in complete_checkpoints(trainer.save_folder)} == before
    assert sorted(p.name for p in trainer.save_folder.iterdir()) == ["2"]  # no partial folder left behind


def test_keep_latest_removes_older_checkpoints_only_after_a_newer_one_is_complete(tmp_path, monkeypatch):
    trainer = trained(tmp_path, "run", data=dict(total_steps=6), ckpt=dict(checkpoint_every=1, keep_latest=2))
    assert [p.name for p in complete_checkpoints(trainer.save_folder)] == ["6", "5"]
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    trainer.step_count = 7
    with pytest.raises(CheckpointError):
        trainer.try_save_checkpoint(force=True)
    assert [p.name for p in complete_checkpoints(trainer.save_folder)] == ["6", "5"]  # a failed save removes nothing
    json.loads((trainer.save_folder / "6" / "config.json").read_text())
    shutil.rmtree(trainer.save_folder)


def checkpoint_contents(path):
    """Every tensor of a checkpoint (read back with DCP) and its train state."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype) for key, m in meta.items()}
    dcp.load(tensors, checkpoint_id=str(path))
    state = torch.load(path / "train_state.pt", weights_only=False)
    return tensors, {k: v for k, v in state.items() if k != "rng"}


def test_background_saves_write_the_checkpoints_a_blocking_save_writes(tmp_path, monkeypatch):
    import evo.checkpoint

    started = []
    start = evo.checkpoint.start_async_save
    monkeypatch.setattr(evo.checkpoint, "start_async_save", lambda *a, **k: started.append(a[1]) or start(*a, **k))
    blocking = trained(tmp_path, "blocking", data=dict(total_steps=6))
    background = trained(tmp_path, "background", data=dict(total_steps=6), ckpt=dict(checkpoint_every=2,
                                                                                          async_upload=True))
    assert [p.name for p in complete_checkpoints(background.save_folder)] == ["6", "4", "2"]
    assert started == [2, 4, 6]  # step 6 too: fit() waits for it before it returns
    assert not [p for p in background.save_folder.iterdir() if p.name.startswith(".tmp")]
    for step in ("2", "4", "6"):
        a_tensors, a_state = checkpoint_contents(blocking.save_folder / step)
        b_tensors, b_state = checkpoint_contents(background.save_folder / step)
        assert a_tensors.keys() == b_tensors.keys() and all(torch.equal(a_tensors[k], b_tensors[k]) for k in a_tensors)
        assert a_state == b_state


@pytest.mark.parametrize("info, line", [
    (dict(path="x", ckpt_type="internevo"), "'ckpt.load_ckpt_info.ckpt_type' 'internevo': evo reads the model from "
                                            "an InternEvo folder, not its optimizer or data state; set "
                                            "content=('model',), got ('all',)"),
    (dict(path="x", ckpt_type="hf", content=("all",)), "'ckpt.load_ckpt_info.ckpt_type' 'hf': a Hugging Face folder "
                                                       "holds the model only; set content=('model',)"),
    (dict(path="x", ckpt_type="megatron"), "'ckpt.load_ckpt_info.ckpt_type' must be one of"),
])
def test_checkpoint_kinds_evo_cannot_read_are_one_line(info, line):
    from evo.config import config_from_dict
    from evo.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(ckpt=dict(load_ckpt_info=info)))
    assert str(err.value).startswith(line)
