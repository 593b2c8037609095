"""Activation checkpointing and the memory savers of issue 28 (docs/performance.md, evo/model/selective.py): step
time and peak memory of one training step (forward, backward, AdamW) on one long packed row, each mode in a fresh
process:

- ``none``: no checkpointing; ``full``: every layer checkpointed (its forward, attention included, runs again in
  backward); ``selective``: full + ``selective_checkpoint`` (attention's output and log-sum-exp kept, not
  recomputed); ``selective+offload``: those kept on the CPU; ``cpu_offloading``: no checkpointing, every layer's
  saved activations on the CPU; ``full+cpu_offload``: full, with the optimizer state on the CPU.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` during the measured steps above what the built model and
optimizer hold after a warm-up step; on a CPU the process's peak resident set (``ru_maxrss``) above its size once
the model and optimizer were built (the first step's optimizer state included: the same in every mode).
Recomputed attention FLOPs: every attention forward call is counted (4 x heads x head_dim x the query-key
pairs it computes, causal); what ``selective`` saves against ``full`` is checked against the formula:
checkpointed layers x 4 x heads x head_dim x sum over documents of n (n + 1) / 2.

Shapes: on a GPU the 1B model of bench/train_step.py (bf16) on one 16k-token row (one document: the goal's
attention-heavy case); on a CPU configs/tiny.py's model (fp32) on an 8192-token row (``--quick``: 2048) of
mixed documents, through the reference ops.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.train_step import LLAMA_1B, ROOT, TINY

MODES = {"none": dict(), "full": dict(checkpoint=True), "selective": dict(checkpoint=True, selective=True),
         "selective+offload": dict(checkpoint=True, selective=True, offload=True),
         "cpu_offloading": dict(offload_layers=True), "full+cpu_offload": dict(checkpoint=True, cpu_offload=True)}
GPU_MODES = ["none", "full", "selective"]  # the goal's three
DOCS = [2048, 1024, 512, 256, 256]


def lengths_of(device: str, quick: bool, tokens: int | None = None) -> list[int]:
    if device == "cuda" and tokens is None:
        return [16384]
    total, out = tokens or (2048 if quick else 8192), []
    while sum(out) < total:
        out.append(min(DOCS[len(out) % len(DOCS)], total - sum(out)))
    return out


def attention_flops(cu: torch.Tensor, cfg) -> float:
    n = (cu[1:] - cu[:-1]).double()
    return 4.0 * cfg.num_attention_heads * cfg.head_dim * float((n * (n + 1) / 2).sum())


def child(mode: str, device: str, quick: bool, steps: int, tokens: int | None = None) -> dict:
    """One mode's steps in this process (``tokens``: a row of that many instead of the benchmark's)."""
    from evo import kernels
    from evo.config import AdamConfig, GradScalerConfig, config_from_dict
    from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer
    from evo.parallel import MemoryOptions, ParallelContext, build_parallel_model

    options = MODES[mode]
    shape = LLAMA_1B if device == "cuda" else TINY
    cfg = config_from_dict({"model": dict(shape, checkpoint=bool(options.get("checkpoint")))}).model
    memory = MemoryOptions(options.get("selective", False), options.get("offload", False),
                           cfg.num_layers if options.get("offload_layers") else 0, options.get("cpu_offload", False))
    ctx = ParallelContext(device=torch.device(device))
    model = build_parallel_model(cfg, ctx, seed=0, for_training=True, memory=memory)
    optimizer = MixedPrecisionOptimizer(model, AdamConfig(lr=1e-5), 1.0, DynamicLossScaler(GradScalerConfig(), False),
                                        ctx, memory.cpu_offload)
    lengths = lengths_of(device, quick, tokens)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    gen = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (int(cu[-1]),), device=device, generator=gen)
    flops, real = [0.0], kernels.flash_attn_varlen_func

    def counting(q, k, v, cu_q, *args, **kwargs):
        flops[0] += attention_flops(cu_q, cfg) * q.shape[1] / cfg.num_attention_heads
        return real(q, k, v, cu_q, *args, **kwargs)

    def step():
        loss = model(ids, cu, max(lengths), labels=torch.roll(ids, -1)).float().mean()
        loss.backward()
        optimizer.step()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a CPU's high-water mark before any step
    step()  # warm-up: kernels compiled, optimizer state made
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = []
    kernels.flash_attn_varlen_func = counting
    for i in range(steps):
        if i == 1:
            kernels.flash_attn_varlen_func = real  # one step's calls counted
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    kernels.flash_attn_varlen_func = real
    peak = (torch.cuda.max_memory_allocated() - base if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    size = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    kept = cfg.num_layers * int(cu[-1]) * cfg.num_attention_heads * (cfg.head_dim * size + 4)  # out and lse
    return {"ms_per_step": statistics.median(seconds) * 1e3, "peak_extra_bytes": peak,
            "kept_attention_bytes": kept if memory.selective_checkpoint else 0,
            "attention_forward_flops": flops[0], "tokens": int(cu[-1]),
            "formula_recompute_flops": cfg.num_layers * attention_flops(cu, cfg)}


def run(quick: bool, device: str) -> list[dict]:
    steps = 2 if quick else 4
    rows = []
    for mode in GPU_MODES if device == "cuda" else MODES:
        out = subprocess.run([sys.executable, "-m", "bench.checkpointing", mode, device, str(int(quick)), str(steps)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            rows.append({"case": mode, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]})
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"case": f"{'llama-1b bf16' if device == 'cuda' else 'tiny fp32'}, {result['tokens']}-token row",
                     "op": "checkpointing", "mode": mode, "provider": "evo", **result})
    by = {r["mode"]: r for r in rows if "mode" in r}
    if "full" in by and "selective" in by:  # what selective checkpointing saves, against the formula
        saved = by["full"]["attention_forward_flops"] - by["selective"]["attention_forward_flops"]
        by["selective"]["recompute_flops_saved"] = saved
        by["selective"]["saved_vs_formula"] = saved / by["selective"]["formula_recompute_flops"]
    if "none" in by:
        for r in by.values():
            r["time_vs_none"] = r["ms_per_step"] / by["none"]["ms_per_step"]
    return rows


if __name__ == "__main__":
    mode, device, quick, steps = sys.argv[1], sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4])
    print(json.dumps(child(mode, device, quick, steps)))
