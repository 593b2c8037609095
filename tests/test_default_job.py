"""The default job exactly as `make train` runs it (about 2 minutes on a 2-core CPU): marked slow."""

import json
import time

import pytest

from tests.helpers import run_script


@pytest.mark.slow
def test_default_job_learns_and_samples(tmp_path):
    start = time.perf_counter()
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", f"monitor.run_folder={tmp_path}",
                        f"ckpt.save_ckpt_folder={tmp_path}/ckpt", timeout=900)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_loss = records[0]["loss"]
    final_val = [r for r in records if "val/python_loss" in r][-1]
    assert final_val["step"] == 500
    assert final_val["val/python_loss"] <= 0.6 * first_loss, (final_val, first_loss)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["400", "500"]  # ckpt.keep_latest=2
    assert "--- sample (prompt 'def ') ---" in result.stdout
    print(f"default job: {seconds:.0f} s, first loss {first_loss:.3f}, final val loss {final_val['val/python_loss']:.3f}")
