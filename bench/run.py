"""Run evo's benchmarks: ``python bench/run.py [--quick] [--only NAME ...] [--out FILE]``.

Each module in bench/ named in BENCHMARKS has ``run(quick: bool, device: str) -> list[dict]``; every
row names its case and its numbers (the op benchmarks' schema: bench/common.py). Before the first of
kernels, attention and train_step, the device's own peaks are measured (a copy, a large matmul: the
``peaks`` rows), and every row with GB/s or TFLOP/s gets its share of them. Results print as they come and
are written as JSON (default ``bench/results/<device name>-<date>.json``: "cpu", or the GPU's name) with the
machine they ran on (Python, torch and triton versions, the git commit), as a markdown table next to it
(``.md``), and as pictures (``-kernels.png``, ``-attention.png``, ``-moe.png``, ``-end_to_end.png``, ``-layouts.png``;
bench/plots.py, with matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

if __name__ == "__main__":  # Python put bench/ first on the path: the repository root replaces it (bench.*, evo)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

BENCHMARKS = ["train_step", "loader", "generate", "kernels", "attention", "attention_tiles", "moe", "kernel_report",
              "flce_memory", "parallel", "expert", "context", "checkpointing", "pipeline", "overhead"]
# the GPU benchmarks, runnable at tiny shapes anywhere with --smoke
SMOKE = ["kernels", "attention", "attention_tiles", "moe", "train_step"]
USES_PEAKS = {"kernels", "attention", "moe", "train_step"}


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "device": device, "commit": git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_commit() -> str:
    """The source tree's commit, with "+changes" when it has uncommitted ones; "unknown" without git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def device_name(info: dict) -> str:
    """The results file's device part: "cpu", or the GPU's name in lower case ("nvidia-h100-80gb-hbm3")."""
    name = info.get("gpu") or info["device"]
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def markdown(results: dict) -> str:
    """The results as markdown: the machine, then one table per benchmark (its rows' keys as columns)."""
    lines = [f"# bench/run.py, {results['date']}", "",
             ", ".join(f"{k} {v}" for k, v in results["machine"].items()), ""]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results["rows"]))
    for name in benchmarks:
        rows = [r for r in results["rows"] if r["benchmark"] == name]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "benchmark"]
        cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
        lines += [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a few minutes in all)")
    parser.add_argument("--smoke", action="store_true",
                        help="the GPU benchmarks at tiny shapes on any device (CPU: needs TRITON_INTERPRET=1), "
                             "to check that they run; the numbers mean nothing")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args()
    only = args.only or (SMOKE if args.smoke else BENCHMARKS)
    if args.smoke and set(only) - set(SMOKE):
        parser.error(f"--smoke runs only {' and '.join(SMOKE)}; got --only {' '.join(only)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"machine": machine(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "smoke": args.smoke, "rows": []}
    name = device_name(results["machine"])
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def add(name, rows):
        for row in rows:
            row = {"benchmark": name, **row}
            results["rows"].append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            out.write_text(json.dumps(results, indent=2))  # after every row: a run cut short keeps what it measured

    from bench.common import device_peaks, share

    peaks = device_peaks(device, args.quick, args.smoke) if USES_PEAKS & set(only) else []
    add("peaks", peaks)
    for name in only:
        options = {"smoke": True} if args.smoke else {}
        add(name, importlib.import_module(f"bench.{name}").run(args.quick, device, **options))
    if peaks:
        share(results["rows"], peaks)
    out.write_text(json.dumps(results, indent=2))
    from bench.goals import evaluate
    from bench.goals import markdown as goals_table

    goals = evaluate(results["rows"])
    text = markdown(results)
    if any(g["measured"] is not None for g in goals):
        text += "\n## goals\n\n" + goals_table(goals) + "\n"
        print(goals_table(goals))
    out.with_suffix(".md").write_text(text)
    print(f"results written to {out} and {out.with_suffix('.md')}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no pictures: matplotlib is not installed (pip install -e '.[bench]')")
        return
    from bench.plots import draw

    for picture in draw(results, out):
        print(f"picture written to {picture}")


if __name__ == "__main__":
    main()
