"""Run evo's benchmarks: ``python bench/run.py [--quick] [--only NAME ...] [--out FILE]``.

Each module in bench/ named in BENCHMARKS has ``run(quick: bool, device: str) -> list[dict]``; every
row names its case and its numbers. Results print as a table and are written as JSON (default
``bench/results/<device>-<date>.json``) with the machine they ran on.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ["train_step", "loader", "generate", "kernels", "attention", "flce_memory", "parallel", "pipeline",
              "overhead"]
SMOKE = ["kernels", "attention"]  # the GPU benchmarks, runnable at tiny shapes anywhere with --smoke


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


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
    out = Path(args.out or Path(__file__).parent / "results" / f"{device}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in only:
        options = {"smoke": True} if args.smoke else {}
        for row in importlib.import_module(name).run(args.quick, device, **options):
            row = {"benchmark": name, **row}
            results["rows"].append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            out.write_text(json.dumps(results, indent=2))  # after every row: a run cut short keeps what it measured
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
