"""Generation speed: new tokens per second with the KV cache and without it (the whole sequence re-run for
every token, what scripts/generate.py did before the cache), greedy, one sequence.

CPU: the default job's model (configs/tiny.py's shapes, fp32). GPU: a 1B-parameter Llama shape in bf16.
Random weights and no EOS, so every run generates the same number of tokens.
"""

from __future__ import annotations

import time

import torch

from evo.config import config_from_dict
from evo.generate import generate_ids
from evo.model import build_model

CASES = [  # (name, model shape, dtype, device type)
    ("tiny", dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=258,
                  multiple_of=64), "torch.float32", "cpu"),
    ("1b", dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_kv_attention_heads=8, vocab_size=32000),
     "torch.bfloat16", "cuda"),
]


def run(quick: bool, device: str) -> list[dict]:
    rows = []
    new_tokens = 64 if quick else 128
    for name, shape, dtype, kind in CASES:
        if kind != device:
            continue
        cfg = config_from_dict({"model": dict(shape, dtype=dtype)}).model
        model = build_model(cfg, device, seed=0).eval()
        for prompt_len in (4, 256):
            prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
            for use_cache in (True, False):
                generate_ids(model, prompt, 4, temperature=0.0, use_cache=use_cache)  # warm up
                best = float("inf")
                for _ in range(1 if quick else 3):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = generate_ids(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
                rows.append({"case": f"{name}, prompt {prompt_len}", "kv_cache": use_cache, "new_tokens": len(out),
                             "seconds": best, "tokens_per_s": len(out) / best})
    return rows
