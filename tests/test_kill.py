"""The kill test: training is SIGKILLed at 20 seeded random moments (at least 5 of them inside a checkpoint write,
a temporary checkpoint folder present, and at least 2 inside a background save, ``ckpt.async_upload``), the same
command resumes it each time from the newest complete checkpoint (each start after the first proves it did:
tests/resume.py), and the finished run's per-step losses, gradient norms and final weights equal those of a run
never interrupted, bit for bit (fp32, CPU)."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, small_sections, write_config
from tests.resume import assert_resumed, newest_complete, read_records

KILLS, STEPS = 20, 400


def config(tmp_path, name, async_upload=False):
    sections = small_sections(model=dict(num_layers=4, hidden_size=128),
                              data=dict(seq_len=128, micro_num=2, total_steps=STEPS),
                              ckpt=dict(checkpoint_every=3, async_upload=async_upload, keep_latest=3),
                              monitor=dict(run_folder=str(tmp_path / name)))
    return write_config(tmp_path / f"{name}-{int(async_upload)}.py", sections)


def start(cfg):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "scripts/train.py", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def steps_done(folder):
    return max((r["step"] for r in read_records(folder / "metrics.jsonl")), default=0)


def saving(folder):
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())


def catch_a_save(run, folder, rng, deadline, tries=4):
    """Wait for a checkpoint folder being written, pause (not at all, or up to 20 ms) and say whether the write is
    still going on, the moment to kill. A save that ends within its pause is passed over for the next one, up to
    ``tries`` saves: a small background save can take less than 20 ms."""
    for _ in range(tries):
        while not saving(folder) and run.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.02)]))
        if saving(folder):
            return True
    return False


def final_state(folder):
    """Every record's (step, loss, grad_norm) from metrics.jsonl, in order, and the final checkpoint's tensors."""
    import torch.distributed.checkpoint as dcp

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r.get("loss"), r.get("grad_norm")) for r in records]
    path = folder / "checkpoints" / str(STEPS)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(tensors, checkpoint_id=str(path))
    return steps, tensors


@pytest.mark.slow  # about 3 minutes
def test_twenty_kills_at_random_moments_change_nothing(tmp_path):
    straight = start(config(tmp_path, "straight"))
    _, err = straight.communicate(timeout=900)
    assert straight.returncode == 0, err[-3000:]
    rng = random.Random(20261201)
    # the kinds of moment, shuffled: 6 in a blocking checkpoint write, 3 in a background one, 11 anywhere
    kinds = ["save"] * 6 + ["async"] * 3 + ["anywhere"] * 11
    rng.shuffle(kinds)
    folder = tmp_path / "killed"
    survived = {"save": 0, "async": 0, "anywhere": 0}
    for kind in kinds:
        checkpoint, before = newest_complete(folder / "checkpoints"), read_records(folder / "metrics.jsonl")
        run = start(config(tmp_path, "killed", async_upload=kind == "async"))
        begun = steps_done(folder)
        deadline = time.time() + 300
        while steps_done(folder) <= begun and run.poll() is None and time.time() < deadline:
            time.sleep(0.005)  # training has started (resumed) and made a step
        if kind == "anywhere":
            time.sleep(rng.uniform(0.0, 1.0))
            caught = True
        else:
            caught = catch_a_save(run, folder, rng, deadline)
        assert run.poll() is None, f"the run ended before its kill ({kind}): {run.stderr.read()[-2000:]}"
        run.kill()
        _, err = run.communicate()
        assert steps_done(folder) < STEPS, "the run finished before the kills did"
        if checkpoint is not None:  # (the first start has none: it starts afresh)
            assert_resumed(err, checkpoint, before, read_records(folder / "metrics.jsonl"))
        survived[kind] += caught or kind == "anywhere"
    assert survived["save"] >= 5 and survived["async"] >= 2, survived
    checkpoint, before = newest_complete(folder / "checkpoints"), read_records(folder / "metrics.jsonl")
    last = start(config(tmp_path, "killed"))
    _, err = last.communicate(timeout=900)
    assert last.returncode == 0, err[-3000:]
    assert_resumed(err, checkpoint, before, read_records(folder / "metrics.jsonl"))
    a_steps, a_tensors = final_state(tmp_path / "straight")
    b_steps, b_tensors = final_state(folder)
    assert len(a_steps) >= STEPS and b_steps == a_steps  # every record, in order, bit for bit
    assert a_tensors.keys() == b_tensors.keys()
    assert all(torch.equal(a_tensors[k], b_tensors[k]) for k in a_tensors), "final weights differ"
    print(f"survived {len(kinds)} kills: {survived['save']} inside a checkpoint write, {survived['async']} inside a "
          f"background save, {survived['anywhere']} anywhere")
