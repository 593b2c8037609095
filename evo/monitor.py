"""Metrics out of a run: a console progress bar or step lines, ``metrics.jsonl``, TensorBoard, a log file, a
profiler trace (``step_profiler``); and the GPU peak table that MFU divides by.

Only the main rank writes. ``metrics.jsonl`` holds one JSON object per logged training step and per
evaluation, with InternEvo's key names (``loss``, ``lr``, ``grad_norm``, ``tgs``, ``val/<name>_loss``,
...). It is strict JSON: a number that is not finite (the gradient norm of a skipped step) is written
as ``null``. A run that starts from step 0 starts the file anew; a run resumed at step N keeps the
records up to step N and appends, and tells TensorBoard to purge its events past N, so no step
appears twice.

Progress: on a terminal, a progress bar on stderr, and a step line in ``train.log`` for each logged
step; elsewhere (slurm, nohup, a pipe) no bar, and the step lines go to stderr too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger("evo")

# Dense peak TFLOP/s per GPU as published (NVIDIA's data sheets, without sparsity): 16-bit tensor cores, and TF32
# for torch.tf32. The first key found in torch.cuda.get_device_name() wins, so the PCIe and NVL parts come before
# the plain "H100" (the SXM part). MFU = the step's model TFLOP/s per device (evo.model.flops) / this; no entry, no
# MFU (CPUs, other GPUs: set monitor.peak_tflops).
PEAK_TFLOPS = {"H200": {"16-bit": 989.4, "tf32": 494.7}, "H100 PCIe": {"16-bit": 756.0, "tf32": 378.0},
               "H100 NVL": {"16-bit": 835.5, "tf32": 417.5}, "H100": {"16-bit": 989.4, "tf32": 494.7},
               "A100": {"16-bit": 312.0, "tf32": 156.0}}


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The peak of ``device`` for compute in ``dtype`` (a ``model.dtype`` string) from ``PEAK_TFLOPS``, or None."""
    kind = {"torch.bfloat16": "16-bit", "torch.float16": "16-bit", "torch.half": "16-bit", "torch.tf32": "tf32"}.get(dtype)
    if device.type != "cuda" or kind is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[kind] for gpu, peaks in PEAK_TFLOPS.items() if gpu in name), None)

_STEP_LINE = "evo_step_line"  # LogRecord attribute marking a step line


def setup_logging(run_folder: Path | None, is_main: bool) -> None:
    """Log to stderr (main rank: INFO, others: WARNING) and, on the main rank, to run_folder/train.log."""
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s evo %(levelname)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if run_folder is not None and is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_folder / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        logger.addHandler(file)
        log_to_file(invocation_header())  # where this invocation begins (evo.cli.run writes where it ends)


def invocation_header() -> str:
    """The first line an invocation writes to train.log: when, the command line, and evo's commit."""
    import subprocess
    import time

    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    command = " ".join([Path(sys.executable).name, *sys.argv])
    return f"=== start {time.strftime('%Y-%m-%d %H:%M:%S')}: {command} (evo {commit or 'not a git checkout'})"


def log_to_file(message: str) -> None:
    """``message`` into train.log only (the console has said it already, or need not), when there is one."""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan
    return value


class _BarWriter:
    """A console stream that writes each log line above the progress bars (``tqdm.write``: the bar is cleared,
    the line written, the bar drawn again), so a line never starts behind the bar's text."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


def _not_step_line(record: logging.LogRecord) -> bool:
    return not getattr(record, _STEP_LINE, False)


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by a kill mid-write
    return record.get("step") if isinstance(record, dict) else None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (a resumed run logs the later ones again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if (s := _step_of(line)) is not None and s <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


class Monitor:
    def __init__(self, run_folder: Path, is_main: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool | None = None, progress_file=None, clock=None,
                 curves: bool = False):
        """progress: None shows a bar when ``progress_file`` (default stderr) is a terminal. clock: seconds now
        (``time.monotonic``), for the step lines' elapsed time and ETA. curves: draw ``curves.png``
        (``evo.curves``) after every evaluation and at the end."""
        import time

        self.is_main, self.total_steps = is_main, total_steps
        self._clock = clock or time.monotonic
        self._started, self._start_step = self._clock(), start_step
        self._curves = Path(run_folder) if curves and is_main else None
        self._metrics = self._tb = self._bar = None
        self._quiet_consoles: list[logging.Handler] = []
        if not is_main:
            return
        run_folder = Path(run_folder)
        run_folder.mkdir(parents=True, exist_ok=True)
        metrics = run_folder / "metrics.jsonl"
        if start_step:
            truncate_metrics(metrics, start_step)
        self._metrics = open(metrics, "a" if start_step else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or past it, left by the run before the resume, are dropped
            self._tb = SummaryWriter(log_dir=str(run_folder / "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        progress_file = progress_file or sys.stderr
        if progress is None:
            progress = hasattr(progress_file, "isatty") and progress_file.isatty()
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=progress_file, mininterval=1.0)
            # the bar carries the progress on the console; the step lines go to train.log only
            self._quiet_consoles = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
            self._console_streams = []
            for handler in self._quiet_consoles:
                handler.addFilter(_not_step_line)
                if isinstance(handler, logging.StreamHandler):  # other lines go through the bar's writer
                    self._console_streams.append((handler, handler.setStream(_BarWriter(handler.stream))))

    def _write(self, record: dict, step: int) -> None:
        self._metrics.write(json.dumps({k: _jsonable(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def log_step(self, record: dict) -> None:
        if not self.is_main:
            return
        self._write(record, record["step"])
        if self._bar is not None:  # the postfix first: update() draws the bar with it
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tgs=f"{record['tgs']:.0f}",
                                  refresh=False)
            self._bar.update(record["step"] - self._bar.n)
        logger.info("step %d/%d %s %s", record["step"], self.total_steps, _step_text(record), self._timing(record["step"]),
                    extra={_STEP_LINE: True})

    def _timing(self, step: int) -> str:
        """``elapsed=... eta=...``: this invocation's time so far, and the rest at its pace."""
        elapsed = self._clock() - self._started
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        return f"elapsed={_duration(elapsed)} eta={_duration(eta)}"

    def log_eval(self, record: dict) -> None:
        if not self.is_main:
            return
        self._write(record, record["step"])
        text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        if self._bar is not None:
            self._bar.clear()
        logger.info("eval %s", text)
        if self._bar is not None:
            self._bar.refresh()
        self._draw()

    def _draw(self) -> None:
        """curves.png from metrics.jsonl as it is now; without matplotlib, one line, once."""
        if self._curves is None:
            return
        from evo.curves import draw_curves

        self._metrics.flush()
        if draw_curves([self._curves], self._curves / "curves.png") is None:
            logger.info("curves.png is not drawn: it needs matplotlib (pip install matplotlib; "
                        "monitor.curves=False turns this off)")
            self._curves = None

    def close(self) -> None:
        if self._metrics is not None and not self._metrics.closed:
            try:
                self._draw()  # the end of the run
            except Exception as exc:  # noqa: BLE001 - a picture never fails a finished run
                logger.warning("curves.png could not be drawn: %s", exc)
            self._curves = None
        for handler in self._quiet_consoles:
            handler.removeFilter(_not_step_line)
        for handler, stream in getattr(self, "_console_streams", ()):
            handler.setStream(stream)
        self._quiet_consoles, self._console_streams = [], []
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._metrics is not None:
            self._metrics.close()


def step_profiler(folder: Path, rank: int, device: torch.device, step):
    """A ``torch.profiler`` over steps 2 to 4 of those it sees (``profiler.step()`` after each), CUDA activity
    included on a GPU, writing ``folder/trace_rank<rank>_step<step()>.json`` (Chrome's trace format)."""
    folder.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def export(prof):
        path = folder / f"trace_rank{rank}_step{step()}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace written to %s", path)

    return torch.profiler.profile(activities=activities, on_trace_ready=export, record_shapes=True,
                                  schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1))


def _duration(seconds: float) -> str:
    """1h02m03s, 2m03s or 3s; ? when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def _step_text(record: dict) -> str:
    """The step line's fields: loss (and a MoE model's moe_loss), lr, gradient norm, loss scale, tokens per second,
    TFLOP/s, per-type losses."""
    formats = {"loss": "{:.4f}", "moe_loss": "{:.4g}", "lr": "{:.3e}", "grad_norm": "{:.4g}", "loss_scale": "{:g}",
               "tgs": "{:.0f}", "tflops": "{:.3g}"}
    parts = [f"{key}={fmt.format(record[key])}" for key, fmt in formats.items() if key in record]
    parts += [f"{key}={value:.4f}" for key, value in record.items() if key.startswith("loss/")]
    if record.get("inf_nan_skip_batches"):
        parts.append(f"skipped={record['inf_nan_skip_batches']}")
    return " ".join(parts)
