"""The training script end to end, in fresh processes, as a user runs it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, run_script
from tests.resume import assert_resumed, newest_complete, read_records
from evo.model import build_model

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "loss_scale", "tgs", "tflops", "num_consumed_tokens",
             "inf_nan_skip_batches", "loss/python", "tokens/python"}
EVAL_KEYS = {"step", "val/python_loss", "val/python_acc", "val/python_plex"}


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_job_smoke_with_profiling_then_generate(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "--profiling", "data.total_steps=6",
                        "data.valid_every=3", "data.valid_max_batches=1", "model.num_layers=2",
                        "ckpt.checkpoint_every=3", f"monitor.run_folder={run}", f"ckpt.save_ckpt_folder=local:{ckpt}",
                        "monitor.sample_tokens=8")
    assert result.returncode == 0, result.stderr
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val/python_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert [r["step"] for r in evals] == [3, 6] and all(set(r) == EVAL_KEYS for r in evals)
    assert steps[-1]["num_consumed_tokens"] == 6 * 2 * 512
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "6"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["model"]["num_layers"] == 2
    assert "saved checkpoint" in (run / "train.log").read_text()
    assert list((run / "profile").glob("trace_rank0_*.json"))
    sample = result.stdout.split("--- sample (prompt 'def ') ---\n")[1].split("\n---")[0]

    # generate.py loads the final checkpoint: with the same prompt, seed and sampling it writes the trained
    # model's sample again (a model that failed to load writes other text)
    gen = run_script("scripts/generate.py", "--ckpt", ckpt, "--prompt", "def ", "--tokens", "8")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.rstrip("\n") == sample and len(sample) > len("def ")
    assert "tokens/s" in gen.stderr

    # and its loader gives the logits of the checkpoint's tensors read back independently of evo
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from evo.weights import load_model_and_tokenizer

    model, tokenizer_path = load_model_and_tokenizer(str(ckpt), "cpu")
    assert tokenizer_path == "byte"
    dcp_to_torch_save(ckpt / "6", tmp_path / "plain.pt")
    state = torch.load(tmp_path / "plain.pt")["model"]
    twin = build_model(model.cfg, "cpu", seed=123)
    twin.load_state_dict(state)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), twin(ids))
        assert not torch.allclose(model(ids), build_model(model.cfg, "cpu", seed=123)(ids))


def test_generate_rejects_a_folder_without_checkpoints(tmp_path):
    gen = run_script("scripts/generate.py", "--ckpt", tmp_path, "--prompt", "x")
    assert gen.returncode == 2
    assert gen.stderr.strip() == (f"evo: error: '{tmp_path}' is neither an evo checkpoint nor a folder holding "
                                  "one")


def resume_config(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(f"""
JOB_NAME = "{name}"
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=258,
             multiple_of=32, dtype="torch.float32")
data = dict(type="builtin", seq_len=64, micro_bsz=2, micro_num=2, total_steps=60, valid_every=0, valid_max_batches=2)
adam = dict(lr=2e-3)
lr_scheduler = dict(warmup_ratio=0.1, eta_min=1e-4)
ckpt = dict(checkpoint_every=7, auto_resume=True, save_ckpt_folder="{tmp_path / name / 'ckpt'}")
monitor = dict(run_folder="{tmp_path / name}")
""")
    return path


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    ref = run_script("scripts/train.py", "--config", resume_config(tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr
    expected = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "ref") if "loss" in r}
    assert len(expected) == 60

    cfg = resume_config(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "scripts/train.py", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 15:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = read_records(metrics)
    assert len(before) < 60, "the run finished before it could be killed"

    checkpoint = newest_complete(tmp_path / "killed" / "ckpt")
    resumed = run_script("scripts/train.py", "--config", cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed(resumed.stderr, checkpoint, before, read_records(metrics))
    records = [r for r in read_metrics(tmp_path / "killed") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 61))  # cut back to the checkpoint, then continued
    assert {r["step"]: (r["loss"], r["grad_norm"]) for r in records} == expected  # exact float equality, every step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 61))  # the killed run's later steps purged


def small_job(tmp_path, name, *extra):
    return ["scripts/train.py", "--config", "configs/tiny.py", "model.num_layers=1", "model.hidden_size=64",
            "model.num_kv_attention_heads=4", "data.total_steps=2", "data.valid_max_batches=1",
            f"monitor.run_folder={tmp_path / name}", f"ckpt.save_ckpt_folder={tmp_path / name / 'ckpt'}", *extra]


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_load_ckpt_info_loads_only_the_model(tmp_path):
    first = run_script(*small_job(tmp_path, "a"))
    assert first.returncode == 0, first.stderr
    info = [f"ckpt.load_ckpt_info.path=local:{tmp_path / 'a' / 'ckpt' / '2'}", "ckpt.load_ckpt_info.content=('model',)"]
    second = run_script(*small_job(tmp_path, "b", "data.total_steps=3", *info))
    assert second.returncode == 0, second.stderr
    assert "loaded model from checkpoint" in second.stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert steps == [1, 2, 3]  # the weights came over; the step counter and data position did not
    loss_a = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    loss_b = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert loss_b[0] < loss_a[0]  # it starts from trained weights on the same first batch


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_checkpoint_of_another_shape_is_refused_with_one_line(tmp_path):
    first = run_script(*small_job(tmp_path, "a"))
    assert first.returncode == 0, first.stderr
    info = f"ckpt.load_ckpt_info={{'path': '{tmp_path / 'a' / 'ckpt' / '2'}', 'content': 'all'}}"
    other = run_script(*small_job(tmp_path, "b", "model.hidden_size=128", info))
    assert other.returncode == 2
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"evo: error: checkpoint '{tmp_path / 'a' / 'ckpt' / '2'}' does not fit this model")
    assert "Traceback" not in other.stderr


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_a_newcomer_reruns_the_same_command_and_then_changes_the_config(tmp_path):
    """From a fresh folder, as the README says: runs go to runs/<JOB_NAME>/; the same command again says the run is
    complete and changes nothing; another config in the same run folder is refused with one line."""
    job = [ROOT / "scripts" / "train.py", "--config", ROOT / "configs" / "tiny.py", "JOB_NAME=first",
           "model.num_layers=1", "model.hidden_size=64", "model.num_kv_attention_heads=4", "data.total_steps=2",
           "data.valid_max_batches=1", "monitor.sample_prompt=None"]
    first = run_script(*job, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "first"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    # no terminal: no progress bar, the step lines carry the progress, in train.log too
    step_lines = [line for line in first.stderr.splitlines() if " step " in line]
    assert len(step_lines) == 2 and "step 2/2 loss=" in step_lines[1] and "%|" not in first.stderr
    assert "INFO: step 2/2 loss=" in (run / "train.log").read_text()
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss/python"] == r["loss"] for r in steps)  # one type: its loss is the step's (same sum and count)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}

    again = run_script(*job, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"run '{Path('runs/first')}' is complete: it trained 2 steps (data.total_steps=2); nothing was changed" \
        in again.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"} == before

    other = run_script(*job, "model.num_layers=2", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        "evo: error: run folder 'runs/first' holds another run ('runs/first/checkpoints/2/config.json' differs from "
        "this config: model.num_layers: 1 there, 2 here): use another JOB_NAME (or monitor.run_folder) for this "
        "config, or remove 'runs/first' to start afresh"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"} == before


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_train_log_says_where_each_invocation_begins_and_how_it_ended(tmp_path):
    """Issue 24: a header (time, command, commit) and an end line (finished, the evo: error: line, a signal's
    stop, or an exception's last line) for every invocation that got as far as its run folder."""
    run = tmp_path / "run"
    args = ["scripts/train.py", "--config", "configs/tiny.py", "data.total_steps=2", "model.num_layers=1",
            "data.valid_max_batches=1", "monitor.sample_prompt=None", f"monitor.run_folder={run}"]
    for _ in range(2):  # trains, then finds the run complete
        assert run_script(*args).returncode == 0
    lines = [line.split(" INFO: ", 1)[-1] for line in (run / "train.log").read_text().splitlines()]
    starts = [line for line in lines if line.startswith("=== start ")]
    ends = [line for line in lines if line.startswith("=== end: ")]
    assert len(starts) == 2 and all("scripts/train.py --config configs/tiny.py data.total_steps=2" in s and "(evo "
                                    in s for s in starts), starts
    assert ends == ["=== end: exit 0 (finished)"] * 2 and lines[-1] == ends[-1]
    assert lines.index(starts[1]) > lines.index(ends[0])  # one invocation after the other
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"  # configs/tiny.py draws the run's curves

    bad = tmp_path / "bad"
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "data.type=tokenized",
                        f"data.train_folder={tmp_path / 'missing'}", f"monitor.run_folder={bad}")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert (bad / "train.log").read_text().splitlines()[-1].endswith(f"=== end: exit 2: {error}")
