"""Pipeline parallelism: the bubble, zero bubble against 1F1B, activation memory (docs/parallel.md).

1. Bubble. An 8-layer, 256-wide fp32 model (512-token packed rows) trained under pp=2 on 2 gloo processes of
   one thread each, with each schedule: 1F1B, interleaved 1F1B (2 chunks a rank), ZBH1 and ZBV, m micro-batches
   a step. ``PipelineSchedule.timeline`` records when each rank ran each forward (F), full backward (B), input
   gradient (I) and weight gradient (W). A rank's bubble is its idle time within the step (first rank's start
   to last rank's end) over its busy time; torch's own schedules are timed (after a first step, which infers
   shapes), the ranks' mean bubble (median over the steps) is set against the theory: (p - 1) / m for 1F1B,
   (p - 1) / (v m) interleaved. Step times of the zero-bubble schedules against 1F1B come from the same run.
2. The cost of the split backward: ZBH1's busy time against 1F1B's (same work, but each fused autograd
   Function, RMSNorm and the fused cross-entropy, runs its backward in both the I and the W pass).
3. Activation memory per rank: the bytes autograd saves for one micro-batch on each stage (counted with
   ``saved_tensors_hooks``, weights left out), times the micro-batches a rank holds at once (from the timeline: forwarded, their
   backward, or W pass, not yet done), with and without ``model.checkpoint``; and one packed row's saved bytes
   under isp s=2 (each rank) against one process.
4. With matplotlib (``pip install -e ".[bench]"``), a picture of the measured timelines:
   docs/images/pipeline-timeline.png (not under ``--quick``, which runs 1F1B and ZBV only).

All of it runs on CPU processes (a pipeline needs one device per stage; the GPU machines lent here have one).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

MODEL = dict(num_layers=8, hidden_size=256, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=2048,
             multiple_of=64, dtype="torch.float32")
TOKENS = 512  # one packed row (a micro-batch)
SCHEDULES = [("1F1B", 1), ("1F1B", 2), ("ZBH1", 1), ("ZBV", 2)]  # (mode, chunks a rank)


def _model_cfg(**changes):
    from evo.config import config_from_dict

    return config_from_dict({"model": {**MODEL, **changes}}).model


def _micro_batches(cfg, m: int, seed: int = 0) -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        ids = torch.randint(0, cfg.vocab_size, (1, TOKENS), generator=g)
        cu = torch.tensor([0, 200, 350, TOKENS], dtype=torch.int32)
        out.append(({"input_ids": ids, "cu_seqlens": cu}, torch.roll(ids, -1, 1)))
    return out


def _activation_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor autograd saves, 0 for a weight (a matmul saves its weight, or a view of it, to compute
    the input gradient: that is the parameter, or FSDP2's gathered copy, not an activation)."""
    base = t._base if t._base is not None else t
    if base.is_leaf and base.requires_grad:
        return 0
    return t.numel() * t.element_size()


def _pipeline_case(rank: int, world: int, mode: str, chunks: int, m: int, checkpoint: bool, steps: int) -> dict:
    from evo.parallel import build_context, build_parallel_model
    from evo.parallel.schedule import build_schedule

    cfg = _model_cfg(num_chunks=chunks, checkpoint=checkpoint)
    ctx = build_context(world, rank, 0, torch.device("cpu"), world, 1, -1, "mtp", 1, mode)
    model = build_parallel_model(cfg, ctx, seed=0)
    schedule = build_schedule(model, ctx, m)
    micros = _micro_batches(cfg, m)
    saved: dict[tuple[int, int], int] = {}
    current = [None]

    def pack(t):
        if current[0] is not None:
            saved[current[0]] = saved.get(current[0], 0) + _activation_bytes(t)
        return t

    for stage in schedule.stages:  # which (stage, micro-batch) a saved tensor belongs to
        forward = stage.forward_one_chunk

        def counted(chunk_id, *args, _forward=forward, _stage=stage.stage_index, **kwargs):
            current[0] = (_stage, chunk_id)
            try:
                return _forward(chunk_id, *args, **kwargs)
            finally:
                current[0] = None

        stage.forward_one_chunk = counted

    def step():
        out = schedule.forward_backward_step(model, micros, 1.0 / (m * TOKENS), 0.0, lambda: None)
        for p in model.parameters():
            p.grad = None
        return out

    step()  # the first step infers the stages' shapes (a forward and backward of its own)
    timelines, spans = [], []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(steps):
            saved.clear()
            schedule.timeline = []
            torch.distributed.barrier()
            start = time.perf_counter()
            step()
            spans.append((start, time.perf_counter()))
            timelines.append(schedule.timeline)
    schedule.timeline = None
    per_stage = {}
    for (stage, _), n in saved.items():
        per_stage[stage] = max(per_stage.get(stage, 0), n)
    return {"timelines": timelines, "spans": spans, "saved_per_micro": per_stage}


def pipeline_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [_pipeline_case(rank, world, **case) for case in cases]


def _in_flight_peak(events: list[tuple], saved: dict[int, int]) -> int:
    """The most activation bytes a rank holds at once: a micro-batch's saved tensors on a stage live from its F
    to its B (full backward) or W (the split's last pass)."""
    changes = []
    split = {(s, mb) for s, mb, kind, *_ in events if kind == "W"}
    for stage, mb, kind, start, end in events:
        if kind == "F":
            changes.append((start, saved.get(stage, 0)))
        elif kind == "W" or (kind == "B" and (stage, mb) not in split):
            changes.append((end, -saved.get(stage, 0)))
    level = peak = 0
    for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):
        level += delta
        peak = max(peak, level)
    return peak


def _bubble(events: list[tuple], span: tuple[float, float]) -> tuple[float, float]:
    busy = sum(end - start for *_, start, end in events)
    return busy, (span[1] - span[0] - busy) / busy


def activation_bytes(rank: int, world: int, checkpoint: bool) -> int:
    """Bytes autograd saves in one packed row's forward on this rank: one process, or isp s=2 (world 2)."""
    from evo.parallel import ParallelContext, build_context, build_parallel_model

    cfg = _model_cfg(checkpoint=checkpoint)
    ctx = ParallelContext() if world == 1 else build_context(world, rank, 0, torch.device("cpu"), 1, world, -1, "isp")
    model = build_parallel_model(cfg, ctx, seed=0)
    (micro, labels), = _micro_batches(cfg, 1)
    total = [0]

    def pack(t):
        total[0] += _activation_bytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(micro["input_ids"].reshape(-1), micro["cu_seqlens"], TOKENS, labels=labels.reshape(-1))
    loss.sum().backward()
    return total[0]


def activation_cases(rank: int, world: int) -> list[int]:
    return [activation_bytes(rank, world, checkpoint) for checkpoint in (False, True)]


def plot(cases: list[dict], results: list[list[dict]], path: Path) -> bool:
    """The measured timeline of each case, one row per rank; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"F": "#4c78a8", "B": "#e45756", "I": "#f58518", "W": "#54a24b"}
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 1.3 * len(cases) + 0.6), squeeze=False)
    for ax, case, ranks in zip(axes[:, 0], cases, results):
        t0 = min(r["spans"][-1][0] for r in ranks)
        for rank, r in enumerate(ranks):
            for stage, mb, kind, start, end in r["timelines"][-1]:
                ax.broken_barh([(start - t0, end - start)], (rank - 0.4, 0.8), color=colors[kind], edgecolor="white",
                               linewidth=0.5)
                ax.text((start + end) / 2 - t0, rank, f"{mb}" if len(ranks) * case["m"] < 40 else "", ha="center",
                        va="center", fontsize=6, color="white")
        name = case["mode"] + (f", {case['chunks']} chunks" if case["chunks"] > 1 else "")
        ax.set_title(f"pp=2, {name}, m={case['m']}", fontsize=9, loc="left")
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("seconds (CPU, one thread a rank); F forward, B backward, I input gradient, W weight gradient")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(quick: bool, device: str) -> list[dict]:
    from tests.dist import run_distributed

    pp = 2
    counts = (4,) if quick else (4, 8)
    steps = 2 if quick else 5
    schedules = [s for s in SCHEDULES if s in (("1F1B", 1), ("ZBV", 2))] if quick else SCHEDULES
    cases = [dict(mode=mode, chunks=chunks, m=m, checkpoint=False, steps=steps)
             for m in counts for mode, chunks in schedules]
    cases.append(dict(mode="1F1B", chunks=1, m=counts[-1], checkpoint=True, steps=steps))
    # each case in fresh processes: measured one after another in the same ones, later cases ran up to 1.8x slower
    results = [[r[0] for r in run_distributed(pipeline_cases, pp, [case])] for case in cases]
    rows, baseline = [], {}
    for case, per_rank in zip(cases, results):
        m, v = case["m"], case["chunks"]
        steps_s, bubbles, busies = [], [], []
        for i in range(case["steps"]):  # a step: from the first rank's start to the last rank's end
            span = (min(r["spans"][i][0] for r in per_rank), max(r["spans"][i][1] for r in per_rank))
            measured = [_bubble(r["timelines"][i], span) for r in per_rank]
            steps_s.append(span[1] - span[0])
            busies.append(max(busy for busy, _ in measured))
            bubbles.append(statistics.mean(bubble for _, bubble in measured))
        peak = max(_in_flight_peak(r["timelines"][-1], r["saved_per_micro"]) for r in per_rank)
        name = f"pp=2 {case['mode']}" + (f" v={v}" if v > 1 else "") + f" m={m}" + \
            (" checkpoint" if case["checkpoint"] else "")
        row = {"case": name, "kind": "pipeline", "step_s": statistics.median(steps_s),
               "busy_s_per_rank": statistics.median(busies), "bubble_measured": statistics.median(bubbles),
               "activation_peak_mib": peak / 2**20}
        if case["mode"] == "1F1B":
            row["bubble_theory"] = (pp - 1) / (v * m)
        if not case["checkpoint"]:
            if case["mode"] == "1F1B" and v == 1:
                baseline[m] = row
            elif m in baseline:
                row["step_vs_1f1b"] = row["step_s"] / baseline[m]["step_s"]
                row["busy_vs_1f1b"] = row["busy_s_per_rank"] / baseline[m]["busy_s_per_rank"]
        rows.append(row)
    one = run_distributed(activation_cases, 1)[0]
    isp = run_distributed(activation_cases, 2)
    for i, label in enumerate(("", ", checkpoint")):
        rows.append({"case": f"activations, one row, 1 process{label}", "kind": "activations",
                     "saved_mib": one[i] / 2**20})
        rows.append({"case": f"activations, one row, isp s=2{label}", "kind": "activations",
                     "saved_mib": max(r[i] for r in isp) / 2**20, "vs_1_process": max(r[i] for r in isp) / one[i]})
    if quick:  # the docs' picture comes from a full run (all four schedules)
        return rows
    picture = ROOT / "docs" / "images" / "pipeline-timeline.png"
    shown = [i for i, c in enumerate(cases) if c["m"] == counts[0] and not c["checkpoint"]]
    if plot([cases[i] for i in shown], [results[i] for i in shown], picture):
        rows.append({"case": "timeline picture", "kind": "picture", "path": str(picture.relative_to(ROOT))})
    return rows
