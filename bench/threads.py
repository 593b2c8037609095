"""CPU threads: the default job's step time with torch's default threads and with one thread per process, on an
idle machine and beside a competing job, with scripts/train.py's OMP/MKL settings and without them
(docs/performance.md, "Threads on a CPU").

    python -m bench.threads [--steps N] [--out bench/results/threads-<date>.json]

Each case trains ``configs/tiny.py`` for N steps in a fresh process (no evaluation, checkpoint or sample) and
reports the median seconds per step of steps 3..N (``tgs``, tokens per second, from metrics.jsonl). The
competing job runs for the whole case on torch's default threads: another process multiplying 1500 x 1500 fp32
matrices ("matmul"), or another default job training ("training"). "without" sets MKL_DYNAMIC=TRUE, OMP_DYNAMIC=TRUE and MKL_CBWR=AUTO (MKL's defaults) over the script's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPETITORS = {
    "matmul": [sys.executable, "-c", "import torch\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"],
    "training": [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                 "data.total_steps=100000", "ckpt.enable_save_ckpt=False", "monitor.curves=False"],
}


def step_seconds(steps: int, threads: int | None, settings: bool, competing: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if not settings:
        env.update(MKL_DYNAMIC="TRUE", OMP_DYNAMIC="TRUE", MKL_CBWR="AUTO")
    scratch = tempfile.TemporaryDirectory()
    other = subprocess.Popen(COMPETITORS[competing] + ([f"monitor.run_folder={scratch.name}/run"]
                                                       if competing == "training" else []),
                             cwd=scratch.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
        if competing else None
    try:
        if other is not None:
            time.sleep(8 if competing == "training" else 2)  # the competitor up to speed
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                            str(ROOT / "configs" / "tiny.py"), f"data.total_steps={steps}", "data.valid_every=0",
                            "data.valid_max_batches=1", "ckpt.enable_save_ckpt=False", "monitor.sample_prompt=None",
                            "monitor.curves=False", f"monitor.run_folder={tmp}/run"], env=env, check=True,
                           capture_output=True, cwd=tmp)
            records = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    finally:
        if other is not None:
            other.kill()
            other.wait()
        scratch.cleanup()
    tokens = 1024  # configs/tiny.py: micro_num 2 x seq_len 256 x micro_bsz 2 per step
    return statistics.median(tokens / r["tgs"] for r in records if "tgs" in r and r["step"] >= 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"threads-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    rows = []
    for competing in (None, "matmul", "training"):
        for settings in (True, False):
            for threads in (None, 1):
                seconds = step_seconds(args.steps, threads, settings, competing)
                rows.append({"machine": f"beside a {competing} job" if competing else "idle",
                             "omp_mkl_settings": "scripts/train.py's" if settings else "without",
                             "threads": "torch default" if threads is None else threads, "s_per_step": seconds})
                print(f"{rows[-1]['machine']:>24}  {rows[-1]['omp_mkl_settings']:>18}  threads "
                      f"{rows[-1]['threads']!s:>13}: {seconds:.3f} s/step", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_count": os.cpu_count(), "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
