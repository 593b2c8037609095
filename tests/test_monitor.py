"""The monitor: strict JSON metrics, resume without repeated steps, step lines and the progress bar."""

import io
import json
import sys
import time

import pytest

from evo.monitor import Monitor, logger, setup_logging


def strict_records(path):
    """Every line of a metrics file parsed as strict JSON (NaN, Infinity and -Infinity rejected)."""

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def record(step, loss=2.0, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "loss_scale": 1.0, "tgs": 100.0,
            "tflops": 0.1, **extra}


def test_non_finite_numbers_are_written_as_null(tmp_path):
    monitor = Monitor(tmp_path, True, 2, tensorboard=False, progress=False)
    monitor.log_step(record(1, grad_norm=float("inf")))
    monitor.log_step(record(2, grad_norm=float("nan"), loss=float("inf")))
    monitor.log_eval({"step": 2, "val/x_loss": float("nan"), "val/x_plex": float("-inf")})
    monitor.close()
    got = strict_records(tmp_path / "metrics.jsonl")
    assert [r["grad_norm"] for r in got[:2]] == [None, None] and got[1]["loss"] is None
    assert got[2] == {"step": 2, "val/x_loss": None, "val/x_plex": None}


def tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def test_resume_keeps_each_step_once_in_metrics_and_tensorboard(tmp_path):
    first = Monitor(tmp_path, True, 6, progress=False)
    for step in range(1, 6):
        first.log_step(record(step, loss=float(step)))
    first.log_eval({"step": 4, "val/x_loss": 1.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    # TensorBoard reads event files in name order: "<seconds>.<host>.<pid>.<writer count>". A resume is a new
    # process started later; in this one process, within the same second, the count (9 then 10) can sort wrong
    time.sleep(1.1)
    resumed = Monitor(tmp_path, True, 6, start_step=3, progress=False)  # resumed from the step-3 checkpoint
    assert [r["step"] for r in strict_records(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    for step in range(4, 7):
        resumed.log_step(record(step, loss=10.0 + step))
    resumed.close()
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
    assert tensorboard_steps(tmp_path / "tensorboard", "loss") == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(tmp_path / "tensorboard", "val/x_loss") == []  # step 4's eval was purged


def test_a_run_from_step_zero_starts_the_metrics_anew(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(1)) + "\n")
    monitor = Monitor(tmp_path, True, 1, tensorboard=False, progress=False)
    monitor.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_progress_bar_shows_the_step_it_just_finished(tmp_path):
    out = io.StringIO()
    monitor = Monitor(tmp_path, True, 3, tensorboard=False, progress=True, progress_file=out)
    monitor._bar.mininterval = 0  # draw on every update
    monitor.log_step(record(1, loss=1.2345))
    assert "loss=1.2345" in out.getvalue()
    monitor.log_step(record(2, loss=0.5432))
    assert "loss=0.5432" in out.getvalue().rsplit("\r", 1)[-1]
    monitor.close()


@pytest.mark.parametrize("bar", [False, True])
def test_step_lines_go_to_train_log_and_to_stderr_unless_a_bar_shows_progress(tmp_path, capsys, bar):
    setup_logging(tmp_path, True)
    monitor = Monitor(tmp_path, True, 2, tensorboard=False, progress=bar, progress_file=io.StringIO())
    monitor.log_step(record(1, loss=1.5, **{"loss/code": 1.25}))
    monitor.close()
    setup_logging(None, True)  # closes train.log
    line = "step 1/2 loss=1.5000 lr=1.000e-03 grad_norm=0.5 loss_scale=1 tgs=100 tflops=0.1 loss/code=1.2500"
    assert line in (tmp_path / "train.log").read_text()
    assert (line in capsys.readouterr().err) == (not bar)


def test_without_a_terminal_there_is_no_bar(tmp_path):
    monitor = Monitor(tmp_path, True, 2, tensorboard=False, progress_file=io.StringIO())
    assert monitor._bar is None
    monitor.close()


def test_plain_step_lines_carry_the_elapsed_time_and_an_eta(tmp_path):
    """Issue 24: without a bar (nohup, slurm) the step lines say how long the invocation has run and how long the
    rest takes at its pace; a resumed run counts from where it started."""
    setup_logging(tmp_path, True)
    now = [100.0]
    monitor = Monitor(tmp_path, True, 1000, start_step=400, tensorboard=False, progress=False, clock=lambda: now[0])
    now[0] += 12.0
    monitor.log_step(record(401))
    now[0] += 3588.0  # 200 steps in an hour: 400 more take two
    monitor.log_step(record(600))
    monitor.close()
    setup_logging(None, True)
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if " step " in line]
    assert lines[0].endswith("elapsed=12s eta=1h59m48s") and lines[1].endswith("elapsed=1h00m00s eta=2h00m00s")


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_curves_are_drawn_at_each_evaluation_and_at_the_end_and_several_runs_compare(tmp_path):
    """Issue 24: curves.png in the run folder (matplotlib), and scripts/plot.py for several runs."""
    from tests.helpers import run_script

    for name, shift in (("a", 0.0), ("b", 0.5)):
        monitor = Monitor(tmp_path / name, True, 4, tensorboard=False, progress=False, curves=True)
        monitor.log_step(record(1, loss=3.0 + shift, **{"loss/code": 2.5}))
        monitor.log_step(record(2, loss=2.0 + shift))
        monitor.log_eval({"step": 2, "val/code_loss": 2.2 + shift})
        assert (tmp_path / name / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the evaluation
        first = (tmp_path / name / "curves.png").stat().st_mtime_ns
        monitor.log_step(record(3, loss=1.5 + shift))
        monitor.close()
        assert (tmp_path / name / "curves.png").stat().st_mtime_ns >= first  # and again at the end
    result = run_script("scripts/plot.py", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "both.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_script("scripts/plot.py", tmp_path / "nothing")
    assert bad.returncode == 2 and "holds no metrics.jsonl" in bad.stderr.strip().splitlines()[-1]


def test_without_matplotlib_one_line_says_so_once(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = []
    monkeypatch.setattr("evo.monitor.logger.info", lambda message, *args, **kw: lines.append(message % args))
    monitor = Monitor(tmp_path, True, 4, tensorboard=False, progress=False, curves=True)
    monitor.log_step(record(1))
    monitor.log_eval({"step": 1, "val/x_loss": 1.0})
    monitor.log_eval({"step": 1, "val/x_loss": 1.0})
    monitor.close()
    assert [line for line in lines if "curves.png" in line] == [
        "curves.png is not drawn: it needs matplotlib (pip install matplotlib; monitor.curves=False turns this off)"]
    assert not (tmp_path / "curves.png").exists()


def test_a_log_line_during_the_bar_starts_on_a_line_of_its_own(tmp_path, monkeypatch):
    """Issue 24: a log line printed while the bar shows went on behind the bar's text; it goes through the bar's
    writer now (the bar cleared, the line written, the bar drawn again)."""
    import re

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging(None, True)  # the console handler writes to this stderr, as the bar does
    monitor = Monitor(tmp_path, True, 4, tensorboard=False, progress=True, progress_file=out)
    monitor.log_step(record(1))
    logger.warning("checkpoint disk is nearly full")
    monitor.log_step(record(2))
    monitor.close()
    setup_logging(None, True)
    (line,) = [line for line in out.getvalue().split("\n") if "nearly full" in line]
    assert re.fullmatch(r"\d\d:\d\d:\d\d evo WARNING: checkpoint disk is nearly full", line.rsplit("\r", 1)[-1]), line
