"""A checkpoint written by an earlier evo resumes in today's: the checkpoint's keys (DCP tensor names and
train_state.pt's entries, evo/checkpoint.py's table) are a file format.

The fixture (tests/fixtures/evo_checkpoint/, made by its make_fixture.py with evo 38230b3, before the
checkpoint manager) holds step 2 of a 4-step fp16 run and that run's records of all 4 steps. Resuming it must
give steps 3 and 4 as the uninterrupted old run gave them: a part that did not load (AdamW's moments, the loss
scaler, the lr schedule, the counters, the data position) changes them."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_script
from tests.resume import assert_resumed, read_records

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "evo_checkpoint"


def test_a_checkpoint_saved_before_the_checkpoint_manager_resumes_and_continues_the_run(tmp_path):
    save = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoint", save / "2")
    # the fixture's threads and MKL mode: the same sums in the same order as the run that made it
    out = run_script("scripts/train.py", "--config", FIXTURE / "config.py", f"monitor.run_folder={tmp_path / 'run'}",
                     f"ckpt.save_ckpt_folder={save}", env={"OMP_NUM_THREADS": "1", "MKL_CBWR": "AVX2,STRICT"})
    assert out.returncode == 0, out.stderr[-3000:]
    after = read_records(tmp_path / "run" / "metrics.jsonl")
    assert_resumed(out.stderr, save / "2", [], after)
    old = {r["step"]: r for r in read_records(FIXTURE / "metrics.jsonl") if "loss" in r}
    new = {r["step"]: r for r in after if "loss" in r}
    assert sorted(new) == [3, 4]
    for step in (3, 4):
        for key in ("lr", "loss_scale", "num_consumed_tokens", "inf_nan_skip_batches", "tokens/dummy"):
            assert new[step][key] == old[step][key], (step, key)
        for key in ("loss", "grad_norm"):  # equal bit for bit on the machine that made the fixture
            assert new[step][key] == pytest.approx(old[step][key], rel=1e-5), (step, key)
