"""Metrics out of a run: a console progress bar, ``metrics.jsonl``, TensorBoard, a log file.

Only the main rank writes. ``metrics.jsonl`` holds one JSON object per training step and per
evaluation, with InternEvo's key names (``loss``, ``lr``, ``grad_norm``, ``tgs``, ``val/<name>_loss``,
...). A resumed run appends to it; a run that starts from step 0 replaces it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("evo")


def setup_logging(run_folder: Path | None, is_main: bool) -> None:
    """Log to stderr (main rank: INFO, others: WARNING) and, on the main rank, to run_folder/train.log."""
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


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the information as a string
    return value


class Monitor:
    def __init__(self, run_folder: Path, is_main: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.is_main = is_main
        self._metrics = self._tb = self._bar = None
        if not is_main:
            return
        run_folder.mkdir(parents=True, exist_ok=True)
        # a resumed run continues the file; a run from step 0 starts it anew
        self._metrics = open(run_folder / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_folder / "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def _write(self, record: dict, step: int) -> None:
        self._metrics.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def log_step(self, record: dict) -> None:
        if not self.is_main:
            return
        self._write(record, record["step"])
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tgs=f"{record['tgs']:.0f}",
                                  refresh=False)

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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._metrics is not None:
            self._metrics.close()
