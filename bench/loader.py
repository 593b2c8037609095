"""Loader throughput: packed tokens per second from InternEvo's tokenized format, one process.

Writes a synthetic dataset (documents of 1 to 8k random tokens, 32k vocabulary) to a temporary
folder, then times the training loader producing packed rows of seq_len 4096 (micro_bsz 1,
micro_num 8), parsing, packing and collating included. Goal: at least 2 million tokens per second.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def run(quick: bool, device: str) -> list[dict]:
    from evo.config import DataConfig
    from evo.data.loader import build_train_loader
    from evo.data.tokenized import write_tokenized
    from evo.parallel.context import ParallelContext

    rng = np.random.default_rng(0)
    num_docs = 1500 if quick else 6000
    with tempfile.TemporaryDirectory() as tmp:
        docs = (rng.integers(0, 32000, size=int(rng.integers(1, 8192))) for _ in range(num_docs))
        write_tokenized(Path(tmp) / "train" / "part0.bin", docs)
        cfg = DataConfig(type="tokenized", train_folder=str(Path(tmp) / "train"), seq_len=4096, micro_bsz=1,
                         micro_num=8)
        loader, _ = build_train_loader(cfg, ParallelContext(), 32000)
        steps = min(len(loader.rows) // 8, 40 if quick else 200)
        next(loader)  # first touch of the memory map
        start = time.perf_counter()
        tokens = 0
        for _ in range(steps):
            inputs, _ = next(loader)
            tokens += inputs["input_ids"].numel()
        seconds = time.perf_counter() - start
    return [{"case": "tokenized, seq_len 4096, micro_num 8", "tokens": tokens, "seconds": seconds,
             "tokens_per_s": tokens / seconds, "goal_tokens_per_s": 2e6}]
