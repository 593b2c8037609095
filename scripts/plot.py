"""Draw runs' curves (training and validation loss, lr, gradient norm, tokens/s) on one picture.

    python scripts/plot.py RUN_FOLDER [RUN_FOLDER ...] [--out curves.png]

Each RUN_FOLDER is a run folder holding metrics.jsonl (runs/<JOB_NAME>); several are drawn on the same axes,
one colour each, for comparison. Needs matplotlib (pip install matplotlib).
"""

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not scripts/

from pathlib import Path  # noqa: E402

from evo.cli import run  # noqa: E402
from evo.errors import ConfigError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(prog="plot.py", description="Draw runs' curves from their metrics.jsonl.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the picture to write (PNG)")
    args = parser.parse_args()
    from evo.curves import draw_curves

    for folder in args.runs:
        if not (folder / "metrics.jsonl").is_file():
            raise ConfigError(f"'{folder}' holds no metrics.jsonl: give run folders (runs/<JOB_NAME>)")
    if draw_curves(args.runs, args.out) is None:
        raise ConfigError("scripts/plot.py needs matplotlib: pip install matplotlib")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
