"""A bf16 run under dp=2 with ZeRO over both ranks (FSDP2 shards of the fp32 masters and AdamW state) is
killed mid-run (SIGKILL to torchrun and its workers) and resumed by the same command: every step's loss and
gradient norm equal those of the run that was never interrupted, bit for bit."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.resume import LOADED, assert_resumed, newest_complete, read_records
from tests.test_launch import free_port

STEPS, EVERY = 40, 4


def config(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(f"""
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=300,
             multiple_of=32, dtype="torch.bfloat16")
data = dict(type="dummy", seq_len=64, micro_bsz=2, micro_num=2, total_steps={STEPS}, num_dummy_samples=400)
adam = dict(lr=1e-3)
parallel = dict(zero1=dict(size=2), timeout_s=60)
ckpt = dict(checkpoint_every={EVERY})
monitor = dict(run_folder="{tmp_path / name}")
""")
    return path


def torchrun(cfg):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "scripts/train.py", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def records(folder):
    return [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm")}
            for r in read_records(folder / "metrics.jsonl")]


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_bf16_zero_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    straight = torchrun(config(tmp_path, "straight"))
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    killed_cfg = config(tmp_path, "killed")
    run = torchrun(killed_cfg)
    first = tmp_path / "killed" / "checkpoints" / str(EVERY) / "train_state.pt"
    deadline = time.time() + 300
    while not first.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in [*descendants(run.pid), run.pid]:  # the workers (torchrun starts them in their own sessions), then
        os.kill(pid, signal.SIGKILL)  # torchrun: no process gets a chance to clean up
    run.communicate()
    assert first.exists()
    done = [int(p.name) for p in first.parent.parent.iterdir() if p.name.isdigit()]
    assert max(done) < STEPS, "the run ended before it was killed: nothing was tested"

    checkpoint = newest_complete(first.parent.parent)
    before = read_records(tmp_path / "killed" / "metrics.jsonl")
    resumed = torchrun(killed_cfg)  # the same command: auto-resume from the newest complete checkpoint
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_resumed(err, checkpoint, before, read_records(tmp_path / "killed" / "metrics.jsonl"))
    assert len(records(tmp_path / "straight")) == STEPS
    assert records(tmp_path / "killed") == records(tmp_path / "straight")  # exact


def stop_and_resume(rank, world_size, folder, layout, search=True):
    """``layout`` (tests/parallel/layouts.py's keys): 6 steps straight, and 3 steps then (a new invocation) on to
    6 from the step-3 checkpoint (with ``search=False``, auto-resume's search for it disabled). Returns what
    each of the three runs reported (tests/parallel/layouts.py's ``train``)."""
    from tests.parallel.layouts import tiny_sections, train
    from tests.resume import no_resume_search

    runs = []
    for name, steps in (("straight", 6), ("stopped", 3), ("stopped", 6)):
        sections = tiny_sections(Path(folder) / name, **layout)
        sections["data"]["total_steps"] = steps
        sections["lr_scheduler"]["total_steps"] = 6
        sections["ckpt"] = dict(checkpoint_every=3)
        with no_resume_search() if not search and len(runs) == 2 else contextlib.nullcontext():
            runs.append(train(rank, world_size, sections))
    return runs


def assert_stopped_and_resumed(runs: list[dict], folder) -> None:
    """``stop_and_resume``'s runs: the third resumed from the second's checkpoint, and the training records of
    the second and third together are the straight run's, in order and exact (the stopped run's evaluation at
    its last step, step 3, is its own)."""
    straight, first, resumed = runs
    assert len(straight["loss"]) == 6 and first["loss"] == straight["loss"][:3]
    assert_resumed(resumed["log"], folder / "stopped" / "checkpoints" / "3", resumed["records_before"],
                   resumed["records"])

    def steps(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in run["records"] if "loss" in r]

    assert steps(resumed) == steps(straight)


@pytest.mark.slow  # over 25 s each on the 2-core machine; .ci/run runs it after `make test`
@pytest.mark.parametrize("world, layout", [
    (4, dict(tp=2, mode="msp")),  # dp=2 x tp=2: FSDP2 shards of tensor-parallel shards
    (2, dict(pp=2, chunks=2, tied=True)),  # interleaved pipeline stages; the tied head's copy saved and loaded
])
def test_parallel_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path, world, layout):
    from tests.dist import run_distributed

    assert_stopped_and_resumed(run_distributed(stop_and_resume, world, str(tmp_path), layout)[0], tmp_path)


@pytest.mark.slow  # about 30 s; tests/test_stopping.py keeps a fast one of these in `make test`
def test_a_resume_that_finds_no_checkpoint_fails_the_resume_check(tmp_path):
    """The break: with auto-resume's search disabled, the third run of ``stop_and_resume`` (one process) starts
    afresh and rewrites the same records; the check above must say it did not resume."""
    runs = stop_and_resume(0, 1, str(tmp_path), {}, search=False)
    with pytest.raises(AssertionError, match="did not resume"):
        assert_stopped_and_resumed(runs, tmp_path)
    assert_stopped_and_resumed(stop_and_resume(0, 1, str(tmp_path / "real"), {}), tmp_path / "real")


def train_part(rank, world_size, folder, layout, steps, total, load=None):
    """``layout`` (tests/parallel/layouts.py's keys) trained to step ``steps`` of a ``total``-step schedule: from
    the start, saving a checkpoint at ``steps`` (in the background); or from checkpoint ``load`` (all content).
    Returns what rank 0 logged (the records of this part's run folder)."""
    from tests.parallel.layouts import tiny_sections, train

    sections = tiny_sections(Path(folder), **layout)
    sections["data"].update(total_steps=steps, valid_every=total // 2)
    sections["lr_scheduler"]["total_steps"] = total
    # the saving part writes in the background (dcp.async_save on its own gloo group)
    sections["ckpt"] = dict(checkpoint_every=steps, async_upload=True) if load is None else dict(
        enable_save_ckpt=False, load_ckpt_info=dict(path=str(load), content=("all",)))
    return train(rank, world_size, sections)


def part(world: int, folder, layout, steps, total, load=None):
    """``train_part`` on ``world`` processes; a part that loads a checkpoint proves it loaded it."""
    from tests.dist import run_distributed

    args = (folder, layout, steps, total, load)
    out = run_distributed(train_part, world, *args)[0] if world > 1 else train_part(0, 1, *args)
    if load is not None:
        line = LOADED.format(path=load, step=int(Path(load).name))
        assert line in out["log"], f"no '{line}' in the log of the part that loads it"
    return out


def assert_continues(first: dict, second: dict, straight: dict, what: str) -> None:
    half = len(first["loss"])
    assert len(second["loss"]) == len(straight["loss"]) - half  # the second run's folder records its own steps
    assert first["loss"] == pytest.approx(straight["loss"][:half], rel=1e-5), what
    for key in ("loss", "grad_norm"):
        for i, (a, b) in enumerate(zip(second[key], straight[key][half:])):
            assert math.isclose(a, b, rel_tol=1e-5), f"{what}: {key} at step {half + i + 1}: {a} against {b}"


def validation_of(rank, world_size, checkpoint, folder):
    """One process: the validation loss of the checkpoint's weights (``ckpt.load_ckpt_info``, model only)."""
    from tests.parallel.layouts import tiny_sections, train

    sections = tiny_sections(Path(folder), micro_num=4)
    sections["data"].update(total_steps=1, valid_every=1)  # one step at lr 0 (changes nothing), then evaluation
    sections["adam"] = dict(lr=0.0)
    sections["ckpt"] = dict(enable_save_ckpt=False, load_ckpt_info=dict(path=str(checkpoint), content=("model",)))
    return train(rank, world_size, sections)


@pytest.mark.slow  # about 35 s: four processes, twice
def test_a_checkpoint_of_one_layout_continues_in_another_and_loads_into_one_process(tmp_path):
    """10 steps under dp=2 x tp=2, then from its checkpoint dp=2 x pp=2 to step 20: steps 11-20 are those of an
    uninterrupted dp=2 run (1e-5 relative), and the checkpoint's weights give one process the validation loss
    the tp run measured at step 10."""
    first = part(4, tmp_path / "tp", dict(tp=2, mode="msp"), 10, 20)
    second = part(4, tmp_path / "pp", dict(pp=2), 20, 20, tmp_path / "tp" / "checkpoints" / "10")
    straight = part(2, tmp_path / "straight", dict(zero1=1), 20, 20)
    assert_continues(first, second, straight, "dp2 x tp2 -> dp2 x pp2")
    one = validation_of(0, 1, tmp_path / "tp" / "checkpoints" / "10", tmp_path / "one")
    assert math.isclose(one["val_loss"][0], first["val_loss"][-1], rel_tol=1e-5)


@pytest.mark.slow  # about 12 s each
@pytest.mark.parametrize("before, after", [
    ((2, dict(pp=2, schedule="ZBV", chunks=2, tied=True)), (1, dict(tied=True))),  # both copies on one rank
    ((1, dict(tied=True)), (2, dict(pp=2, tied=True))),  # one tensor, then copies on two ranks
    ((1, dict(tied=True)), (2, dict(pp=2, schedule="ZBV", chunks=2, tied=True))),  # one entry loaded into both copies
])
def test_tied_embeddings_cross_between_one_tensor_and_pipeline_copies(tmp_path, before, after):
    (world_before, layout_before), (world_after, layout_after) = before, after
    first = part(world_before, tmp_path / "first", layout_before, 4, 8)
    second = part(world_after, tmp_path / "second", layout_after, 8, 8, tmp_path / "first" / "checkpoints" / "4")
    straight = part(1, tmp_path / "straight", dict(tied=True), 8, 8)
    assert_continues(first, second, straight, f"{before} -> {after}")


@pytest.mark.slow  # about 12 s each
@pytest.mark.parametrize("before, after, reference", [
    ((2, dict(tp=2, mode="isp", weight=2)), (2, dict(pp=2, chunks=2)), dict()),  # isp's weight shards -> stages
    ((2, dict(zero1=2)), (1, dict(micro_num=4)), dict(micro_num=4)),  # ZeRO shards over dp=2 -> one process
    ((1, dict()), (2, dict(tp=2, mode="fsp")), dict()),  # one process -> tensor-parallel shards
    # 2D sequence parallelism (context 2) -> one process, and one process -> it
    ((2, dict(tp=2, mode="isp", sequence_2D=dict(head_size=1, context_size=2, window_size=1))), (1, dict()), dict()),
    ((1, dict()), (2, dict(tp=2, mode="isp", sequence_2D=dict(head_size=1, context_size=2, window_size=1))), dict()),
])
def test_checkpoints_cross_between_more_layouts(tmp_path, before, after, reference):
    (world_before, layout_before), (world_after, layout_after) = before, after
    first = part(world_before, tmp_path / "first", layout_before, 4, 8)
    second = part(world_after, tmp_path / "second", layout_after, 8, 8, tmp_path / "first" / "checkpoints" / "4")
    straight = part(1, tmp_path / "straight", reference, 8, 8)
    assert_continues(first, second, straight, f"{before} -> {after}")
