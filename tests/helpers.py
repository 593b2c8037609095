"""Helpers shared by the tests (``tests.helpers``; conftest.py keeps the fixtures)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_sections(**sections) -> dict:
    """A config namespace for a 2-layer, 64-wide model on the dummy data; update sections with keyword dicts."""
    cfg = {
        "JOB_NAME": "test",
        "model": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=300,
                      multiple_of=32, dtype="torch.float32"),
        "data": dict(type="dummy", seq_len=32, micro_bsz=2, micro_num=2, total_steps=4, num_dummy_samples=200),
        "adam": dict(lr=1e-3),
        "lr_scheduler": dict(warmup_ratio=0.0, eta_min=1e-4),
        "monitor": dict(curves=False),  # a picture per evaluation costs a second: the tests that want one ask
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    if cfg["data"].get("type") != "dummy" and "num_dummy_samples" not in sections.get("data", {}):
        del cfg["data"]["num_dummy_samples"]  # another data type does not read it (a config error)
    return cfg


def write_config(path, sections: dict):
    """``sections`` (e.g. ``small_sections(...)``) as a config file at ``path``, for scripts/train.py; returns it."""
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in sections.items()))
    return path


def run_script(*args, cwd=None, env=None, timeout=300):
    """Run a script of the repo in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
