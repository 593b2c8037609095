"""A bf16 run under dp=2 with ZeRO over both ranks (FSDP2 shards of the fp32 masters and AdamW state) is
killed mid-run (SIGKILL to torchrun and its workers) and resumed by the same command: every step's loss and
gradient norm equal those of the run that was never interrupted, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from test_launch import free_port

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
    return [{k: v for k, v in json.loads(line).items() if k in ("step", "loss", "grad_norm")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


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

    resumed = torchrun(killed_cfg)  # the same command: auto-resume from the newest complete checkpoint
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "loaded model, optimizer, sampler, scheduler from checkpoint" in err
    assert records(tmp_path / "killed") == records(tmp_path / "straight")  # exact


def stop_and_resume(rank, world_size, folder, layout):
    """``layout`` (tests/parallel/layouts.py's keys): 6 steps straight, and 3 steps then (a new invocation) on to
    6 from the step-3 checkpoint."""
    from pathlib import Path

    from layouts import tiny_sections, train

    losses = []
    for name, steps in (("straight", 6), ("stopped", 3), ("stopped", 6)):
        sections = tiny_sections(Path(folder) / name, **layout)
        sections["data"]["total_steps"] = steps
        sections["lr_scheduler"]["total_steps"] = 6
        sections["ckpt"] = dict(checkpoint_every=3)
        losses.append(train(rank, world_size, sections).get("loss"))
    return losses


@pytest.mark.parametrize("world, layout", [
    (4, dict(tp=2, mode="msp")),  # dp=2 x tp=2: FSDP2 shards of tensor-parallel shards
    (2, dict(pp=2, chunks=2, tied=True)),  # interleaved pipeline stages; the tied head's copy saved and loaded
])
def test_parallel_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path, world, layout):
    from dist import run_distributed

    straight, first, resumed = run_distributed(stop_and_resume, world, str(tmp_path), layout)[0]
    assert len(straight) == 6 and first == straight[:3]
    assert resumed == straight  # metrics.jsonl of the resumed run: steps 1-3 kept, 4-6 appended
