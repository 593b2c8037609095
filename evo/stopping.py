"""Stopping a run early, at a step boundary, with a checkpoint: signals and InternEvo's stop file.

- **Signals.** SIGTERM, SIGINT and SIGUSR1 (what slurm sends with ``--signal`` before its kill, what torchrun
  forwards when it is stopped, Ctrl-C) do not stop a step half way: the trainer finishes the step, saves a
  checkpoint and raises ``TrainingStopped``; ``scripts/train.py`` then prints one line and exits with status
  ``EXIT_STOPPED`` (3), so a job script can tell "stopped, run me again" from done (0), bad input (2) and a
  crash (1). A second Ctrl-C interrupts at once.
- **The stop file** (``ckpt.stop_file_path``, as InternEvo's checkpoint manager reads it): rank 0 writes "0"
  into it at start; while training runs the user writes a step number: ``-N`` saves a checkpoint after step N,
  ``N`` saves and stops cleanly after step N (exit 0).

Every rank must stop at the same step: a signal may reach the ranks of a job during different steps. So at
every step boundary the ranks agree (``StopRequests.poll``, one small all-reduce): the signal any rank got,
and rank 0's reading of the stop file.
"""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_STOPPED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint (``checkpoint``: its path, or None when saving is
    off); running the same command continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        saved = f"checkpoint '{checkpoint}' saved" if checkpoint else "nothing saved (ckpt.enable_save_ckpt is False)"
        super().__init__(f"stopped by {signal_name} after step {step}: {saved}; run the same command to continue")


class StopRequests:
    """The stop requests of a training loop: signal handlers while it runs (a context manager, main thread only)
    and the stop file."""

    def __init__(self, ctx, stop_file: str | None = None):
        self.ctx = ctx
        self.stop_file = Path(stop_file) if stop_file else None
        self.received = 0  # the signal number this process got, 0 for none
        self._previous: dict[int, object] = {}
        self._bad_content: str | None = None
        if self.stop_file is not None and ctx.is_main:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.write_text("0")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _read_stop_file(self) -> int:
        if self.stop_file is None or not self.ctx.is_main:
            return 0
        try:
            text = self.stop_file.read_text().strip()
        except OSError:
            return 0
        try:
            return int(text or 0)
        except ValueError:
            if text != self._bad_content:  # once per content
                self._bad_content = text
                warnings.warn(f"'ckpt.stop_file_path' '{self.stop_file}' holds {text!r}: write a step number (-N: "
                              "save after step N; N: save and stop after step N), or 0")
            return 0

    def poll(self, step: int) -> tuple[bool, str | None]:
        """After ``step``: (save a checkpoint now, stop now: "stop file" or the signal's name, else None); the same
        on every rank (a collective when there are several)."""
        action = self._read_stop_file()
        # [signal, step to save and stop at, step to save at]: rank 0's file, any rank's signal (max)
        request = torch.tensor([self.received, max(action, 0), max(-action, 0)], dtype=torch.int64)
        if self.ctx.distributed:
            request = request.to(self.ctx.device)
            dist.all_reduce(request, op=dist.ReduceOp.MAX)
        received, stop_at, save_at = request.tolist()
        if received:
            return True, signal.Signals(received).name
        if stop_at == step:
            return True, "stop file"
        return save_at == step, None
