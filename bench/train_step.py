"""Training-step throughput of the module layer: tokens/s and model TFLOP/s for forward + backward."""

from __future__ import annotations

import time

import torch

from evo.config import config_from_dict
from evo.model import build_model, matmul_parameters
from evo.trainer import attention_pair_sum, step_flops

# (name, model shape, tokens per packed row, documents per row)
CASES = [
    ("tiny-cpu", dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=258,
                      multiple_of=64), 512, 2),
    ("1b-gpu", dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_kv_attention_heads=8,
                    vocab_size=32000), 4096, 4),
]


def run(quick: bool, device: str) -> list[dict]:
    rows = []
    for name, shape, tokens, docs in CASES:
        if name.endswith("gpu") != (device == "cuda"):
            continue
        dtype = "torch.float32" if device == "cpu" else "torch.bfloat16"
        cfg = config_from_dict({"model": dict(shape, dtype=dtype)}).model
        model = build_model(cfg, device, seed=0)
        ids = torch.randint(0, cfg.vocab_size, (tokens,), device=device)
        cu = torch.linspace(0, tokens, docs + 1, dtype=torch.int32, device=device)
        max_len = int((cu[1:] - cu[:-1]).max())
        labels = torch.roll(ids, -1)

        def step():
            model(ids, cu, max_len, labels=labels).sum().backward()

        for _ in range(2):
            step()
        iters = 3 if quick else 10
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        flops = step_flops(cfg, matmul_parameters(model), tokens, attention_pair_sum(cu, cfg.sliding_window))
        rows.append({"case": name, "tokens": tokens, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
                     "tflops": flops / seconds / 1e12})
    return rows
