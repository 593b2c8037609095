"""Expert parallelism (docs/parallel.md, evo/parallel/expert.py).

1. Measured on this CPU, configs/tiny_moe.py (fp32, 8 experts, top 2) in gloo processes (bench/parallel.py's
   ``measure_layout``): data parallelism over 2 and 4 ranks with ZeRO over the data ranks, every expert on every
   rank (expert size 1) and spread over expert groups of 2 and 4. Per rank: ``memory_estimate`` (the largest
   rank's) against ``computed_memory`` (``computed_matches``) and the counted compute copy; tokens/s (the best of
   the timed steps, each timed on its slowest rank); and the bytes the token all-to-alls send to other ranks in one
   micro-batch's forward and backward (the largest rank's), against the formula for evenly spread routing: each of
   the L MoE layers exchanges its rows four times (dispatch and combine, forward and backward), and a rank's
   T * k rows go to other ranks with probability (ep - 1) / ep: 4 * L * T * k * (ep - 1) / ep * hidden * 4 bytes.
   A fresh router spreads tokens nearly evenly, so the ratio is near 1.
2. Computed, no process started: per-GPU memory of the model state of configs/qwen3_30b_a3b.py under ZeRO over 8,
   16 and 64 data ranks, with every expert on every rank and with expert groups of all the data ranks
   (``computed_memory(..., ep=)``: the fp32 state is sharded the same either way; what expert parallelism removes
   is the compute copy of the other ranks' experts).
"""

from __future__ import annotations

from bench.parallel import MEMORY_KEYS, computed_memory, measure_layouts, merge_ranks, model_config, tiny_config

# (name, world, layout): zero1 -1 shards over all the data ranks (required with expert groups)
LAYOUTS = [("dp=2, every expert", 2, dict(zero1=-1)), ("dp=2, ep=2", 2, dict(zero1=-1, expert=2)),
           ("dp=4, every expert", 4, dict(zero1=-1)), ("dp=4, ep=2", 4, dict(zero1=-1, expert=2)),
           ("dp=4, ep=4", 4, dict(zero1=-1, expert=4))]
BIG = [(8, 1), (8, 8), (16, 16), (64, 64)]  # (GPUs, expert size) for configs/qwen3_30b_a3b.py


def formula_bytes(cfg, ep: int) -> float:
    """All-to-all bytes one rank sends in a micro-batch's forward and backward, routing spread evenly."""
    from evo.model.moe import moe_layer_count

    tokens = cfg.data.seq_len * cfg.data.micro_bsz
    m = cfg.model
    return 4 * moe_layer_count(m) * tokens * m.top_k * (ep - 1) / ep * m.hidden_size * 4


def measured_rows(quick: bool) -> list[dict]:
    from tests.dist import run_distributed

    steps, warmup = (3, 1) if quick else (10, 2)
    cfg = tiny_config(None, "tiny_moe")
    rows = []
    for world in (2, 4):
        layouts = [(name, layout) for name, w, layout in LAYOUTS if w == world]
        jobs = [dict(layout=layout, steps=steps, warmup=warmup, threads=1, config="tiny_moe") for _, layout in layouts]
        ranks = run_distributed(measure_layouts, world, jobs)
        for i, (name, layout) in enumerate(layouts):
            r = merge_ranks([rank[i] for rank in ranks])
            ep = layout.get("expert", 1)
            mem = r["memory_estimate"]
            computed = computed_memory(cfg.model, world, 1, -1, ep=ep)
            sec, tokens = min(r["step_seconds"]), r["tokens_per_step"]
            formula = formula_bytes(cfg, ep)
            rows.append({"case": f"tiny_moe, {name}", "kind": "measured", "world": world, "ep": ep, **mem,
                         "held_compute_bytes": r["held_compute_bytes"],
                         "computed_matches": all(computed.get(k) == mem.get(k) for k in MEMORY_KEYS)
                         and computed.get("compute_weights", 0) == r["held_compute_bytes"],
                         "tokens_per_s": tokens / sec, "ms_per_step": sec * 1e3,
                         "all_to_all_bytes": r["all_to_all_bytes"], "formula_bytes": formula,
                         "all_to_all_vs_formula": r["all_to_all_bytes"] / formula if formula else None})
    return rows


def computed_rows() -> list[dict]:
    from evo.model import build_model

    cfg = model_config("qwen3_30b_a3b")
    meta = build_model(cfg, "meta")
    rows = []
    for world, ep in BIG:
        mem = computed_memory(cfg, world, 1, -1, meta_model=meta, ep=ep)
        rows.append({"case": f"qwen3_30b_a3b, {world} GPUs, ZeRO over {world}, expert size {ep}", "kind": "computed",
                     "world": world, "ep": ep, **{k: mem[k] for k in MEMORY_KEYS}, "total_GiB": mem["total"] / 2**30})
    return rows


def run(quick: bool, device: str) -> list[dict]:
    rows = computed_rows()
    if device == "cpu":
        rows += measured_rows(quick)
    else:
        rows.append({"case": "tiny_moe layouts", "kind": "measured", "skipped": "gloo processes on a CPU only"})
    return rows
