"""Stopping early at a step boundary with a checkpoint (evo/stopping.py): SIGTERM, SIGINT and SIGUSR1 save and
exit 3, and the same command continues as if never stopped; under two processes a signal to one rank stops both
after the same step; InternEvo's stop file asks for a save (-N) or a save and a clean stop (N)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, small_sections, write_config
from tests.resume import assert_resumed, read_records
from tests.test_launch import free_port

TRAIN = ["scripts/train.py"]
NO_SEARCH = ["-m", "tests.no_resume_search"]  # train.py with auto-resume's checkpoint search disabled


def config(tmp_path, name, steps=40, **ckpt):
    sections = small_sections(data=dict(total_steps=steps), ckpt=dict(checkpoint_every=0, **ckpt),
                              monitor=dict(run_folder=str(tmp_path / name)))
    return write_config(tmp_path / f"{name}.py", sections)


def start(cfg, world=1, script=TRAIN):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world == 1:
        cmd = [sys.executable, *script, "--config", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), *script, "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(folder):
    return read_records(folder / "metrics.jsonl")


def wait_for_step(folder, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= step and "loss" in r for r in records(folder)):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


def losses(folder):
    """Every step's (step, loss, gradient norm), in the order recorded."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records(folder) if "loss" in r]


def stop_by_signal_and_continue(tmp_path, sig, resume_script=TRAIN):
    """Train 12 steps straight; train again, stopped by ``sig`` after step 2 or so, then continued by the same
    command run with ``resume_script``: the continued run resumed from the stop's checkpoint, and every step's
    loss and gradient norm equal the straight run's."""
    straight = start(config(tmp_path, "straight", steps=12))
    assert straight.wait(timeout=300) == 0
    cfg = config(tmp_path, "stopped", steps=12)
    run = start(cfg)
    wait_for_step(tmp_path / "stopped", 2, run)
    run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 3, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("evo: stopped")]
    step = losses(tmp_path / "stopped")[-1][0]
    checkpoint = tmp_path / "stopped" / "checkpoints" / str(step)
    assert line == (f"evo: stopped by {sig.name} after step {step}: checkpoint '{checkpoint}' saved; run the same "
                    "command to continue")
    assert 2 <= step < 12 and (checkpoint / "train_state.pt").is_file()
    before = records(tmp_path / "stopped")
    again = start(cfg, script=resume_script)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert_resumed(err, checkpoint, before, records(tmp_path / "stopped"))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # exact


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_saves_at_the_step_boundary_exits_3_and_the_same_command_continues(tmp_path, sig):
    stop_by_signal_and_continue(tmp_path, sig)


def test_a_continuation_that_starts_afresh_fails_the_resume_check(tmp_path):
    """The break the resume tests exist for: auto-resume finds no checkpoint, the run starts at step 1 and, being
    deterministic, rewrites the same records, so comparing them with the straight run's passes; the resume check
    is what fails."""
    with pytest.raises(AssertionError, match="did not resume"):
        stop_by_signal_and_continue(tmp_path, signal.SIGTERM, resume_script=NO_SEARCH)


@pytest.mark.slow  # torchrun with two processes: about 10 s
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    cfg = config(tmp_path, "two", steps=200)
    run = start(cfg, world=2)
    wait_for_step(tmp_path / "two", 2, run)
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(run.pid), "scripts/train.py"],
                                              capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGUSR1)  # rank 1 (started second) only
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "exitcode  : 3" in err and "exitcode  : 1" not in err, err[-3000:]
    step = losses(tmp_path / "two")[-1][0]
    assert (tmp_path / "two" / "checkpoints" / str(step) / "train_state.pt").is_file() and step < 200
    assert f"evo: stopped by SIGUSR1 after step {step}" in err


def test_the_stop_file_asks_for_a_save_then_a_clean_stop(tmp_path):
    stop_file = tmp_path / "stop" / "ctl"
    run = start(config(tmp_path, "file", steps=400, stop_file_path=str(stop_file)))
    wait_for_step(tmp_path / "file", 1, run)
    assert stop_file.read_text() == "0"  # written at start, as InternEvo does
    now = losses(tmp_path / "file")[-1][0]
    stop_file.write_text(f"-{now + 3}")  # save after that step
    wait_for_step(tmp_path / "file", now + 5, run)
    stop_file.write_text(str(now + 8))  # save and stop after that step
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]
    saved = sorted(int(p.name) for p in (tmp_path / "file" / "checkpoints").iterdir())
    assert saved == [now + 3, now + 8] and [s for s, _, _ in losses(tmp_path / "file")] == list(range(1, now + 9))


def test_a_save_on_a_signal_counts_among_the_checkpoints_kept(tmp_path):
    """ckpt.keep_latest=2 with a checkpoint every 2 steps: after SIGTERM the save folder holds the signal's save
    and the one before it, nothing older."""
    sections = small_sections(data=dict(total_steps=200), ckpt=dict(checkpoint_every=2, keep_latest=2),
                              monitor=dict(run_folder=str(tmp_path / "kept")))
    proc = start(write_config(tmp_path / "kept.py", sections))
    wait_for_step(tmp_path / "kept", 7, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 3, proc.stderr.read()[-2000:]
    last = max(r["step"] for r in records(tmp_path / "kept") if "loss" in r)
    saved = sorted(int(p.name) for p in (tmp_path / "kept" / "checkpoints").iterdir())
    assert saved[-1] == last and len(saved) == 2, (saved, last)
    assert saved[0] == (last - 1) // 2 * 2  # the save every 2 steps before the signal's (the signal's own when even)
    end = (tmp_path / "kept" / "train.log").read_text().splitlines()[-1]
    assert "=== end: exit 3: " in end and "SIGTERM" in end, end  # train.log says how the invocation ended
