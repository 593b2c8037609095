"""Parallel layouts: per-rank memory of the model state, and time per training step (docs/parallel.md).

1. Measured, the tiny model (configs/tiny.py, fp32) under 1 process, dp=2 (zero1=1: ZeRO off), dp=2 zero1=2 and
   tp=2 (mtp): each layout is built in gloo processes (tests/dist.py) with ``build_parallel_model`` and reports
   ``memory_estimate`` (the largest rank's), cross-checked by counting: the local elements of the parameters, of
   the gradients after a backward and of AdamW's state after a step, and the compute copy of the weights held
   from forward to backward, counted after a forward (``held_compute_bytes``: under FSDP2 the gathered
   parameters; ``memory_estimate``'s ``compute_weights``). Also reported: whether ``computed_memory`` (below)
   gives the same numbers (``computed_matches``).
2. Computed, no process started: ``computed_memory(model_cfg, world, tp, zero1)`` (evo.parallel.parallelize,
   also what ``scripts/train.py --dry-run`` reports) takes the shapes from a model
   built on the meta device and the split from ``tensor_parallel_plan()``, and gives what ``memory_estimate``
   would report on the largest rank. The 7B configs under 1 process, zero over 8 (dp=8), tp=2, tp=8 and tp=2 x
   zero 4, with ratios against 1 process (optimizer state; layer weights: the decoder layers' fp32 masters).
3. CPU only: time per step of each tiny layout (1 process; dp=2; dp=2 zero1=2; tp=2 mtp; tp=2 msp; steps of
   ``data.micro_num`` packed rows of ``seq_len * micro_bsz`` tokens per data-parallel rank, random tokens) against
   one process: the best of 4 steps (``--quick``; else 15), each step timed on its slowest rank, and their median.
   Every process runs one thread (tests/dist.py), so a 2-process layout uses two cores where the baseline uses
   one; "1 process, 2 threads" is the baseline given both cores. dp=2 processes twice the tokens per step (a
   doubled global batch): compare ``tokens_per_s_per_process``.
4. GPU only: tokens/s of one GPU training an 8-layer, 1024-wide bf16 model with and without FSDP2 wrapping
   (``evo.parallel.parallelize.apply_fsdp`` on a 1-rank mesh: each layer and the root, evo's policy) in a
   1-process group. On a CPU this case is skipped, with the reason in its row.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from evo.parallel.parallelize import computed_memory  # noqa: F401 - bench.parallel.computed_memory

ROOT = Path(__file__).resolve().parents[1]

CONFIGS_7B = ["internlm2_7b", "llama2_7b", "llama3_8b", "mistral_7b", "qwen2_7b", "qwen3_8b"]
# (name, world size, tp, zero1): zero1 as parallel.zero1.size (1 off, -1 the whole data group)
LAYOUTS_7B = [("1 process", 1, 1, 1), ("zero over 8 (dp=8)", 8, 1, -1), ("tp=2", 2, 2, 1), ("tp=8", 8, 8, 1),
              ("tp=2 x zero 4 (8 ranks)", 8, 2, -1)]
# (name, world size, layout) for the tiny model; memory is reported for the first four
TINY_LAYOUTS = [("1 process", 1, dict(tp=1, zero1=1, mode="mtp")),
                ("dp=2", 2, dict(tp=1, zero1=1, mode="mtp")),
                ("dp=2 zero1=2", 2, dict(tp=1, zero1=2, mode="mtp")),
                ("tp=2 mtp", 2, dict(tp=2, zero1=1, mode="mtp")),
                ("tp=2 msp", 2, dict(tp=2, zero1=1, mode="msp"))]
MEMORY_KEYS = ("master_weights", "gradients", "optimizer_state", "compute_weights", "total")
GPU_SHAPE = dict(num_layers=8, hidden_size=1024, num_attention_heads=16, num_kv_attention_heads=8, vocab_size=32000,
                 multiple_of=256)


def model_config(name: str):
    """The model section of configs/<name>.py, validated."""
    from evo.config import config_from_dict, read_config_file

    raw = read_config_file(ROOT / "configs" / f"{name}.py")
    return config_from_dict({k: raw[k] for k in ("model", "model_type") if k in raw}).model


# ---------------------------------------------------------------------------------------------- computed
def computed_rows(configs=CONFIGS_7B, layouts=LAYOUTS_7B) -> list[dict]:
    from evo.model import build_model
    from evo.config import layout_error, zero_size
    from evo.config.layout import check_tensor_parallel

    rows = []
    for name in configs:
        cfg = model_config(name)
        meta = build_model(cfg, "meta")
        base = None
        for case, world, tp, zero1 in layouts:
            row = {"case": f"{name}, {case}", "kind": "computed", "world": world, "tp": tp,
                   "zero": zero_size(zero1, world // tp)}
            problem = (check_tensor_parallel(cfg, tp) if tp > 1 else None) or layout_error(
                world, 1, None, tp, row["zero"])
            if problem:
                rows.append({**row, "skipped": problem})
                continue
            mem = computed_memory(cfg, world, tp, zero1, meta_model=meta)
            base = base or mem
            rows.append({**row, **mem,
                         "optimizer_state_vs_1": mem["optimizer_state"] / base["optimizer_state"],
                         "layer_weights_vs_1": mem["layer_weights"] / base["layer_weights"]})
    return rows


# ---------------------------------------------------------------------------------------------- measured
def tiny_config(dtype: str | None = None, name: str = "tiny"):
    from evo.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.py")
    if dtype:
        cfg.model.dtype = dtype
    return cfg


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _held_compute_bytes(model, ctx) -> int:
    """After a forward: bytes of the compute copy of the weights this rank holds. Under FSDP2, the parameters
    registered on the modules that are not FSDP shards (a DTensor over the zero mesh) are the gathered ones;
    in one process, the model's parameters when they are not the fp32 masters."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if ctx.distributed:  # FSDP2's shards are over "zero" (experts under expert parallelism: "edp")
            sharded = isinstance(p, DTensor) and {"zero", "edp", "edp_tp"} & set(p.device_mesh.mesh_dim_names or ())
        else:
            sharded = p.dtype == torch.float32
        if not sharded:
            total += _local(p).numel() * p.element_size()
    return total


def _batches(cfg, ctx, count: int) -> list[list[tuple]]:
    """``count`` steps of ``data.micro_num`` packed rows (2 documents each) of random tokens; a data-parallel
    rank draws its own, tensor-parallel ranks the same."""
    tokens = cfg.data.seq_len * cfg.data.micro_bsz
    gen = torch.Generator().manual_seed(1000 + ctx.dp_rank)
    cu = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32)
    steps = []
    for _ in range(count):
        micros = []
        for _ in range(cfg.data.micro_num):
            ids = torch.randint(0, cfg.model.vocab_size, (tokens,), generator=gen)
            micros.append((ids, cu, tokens // 2, torch.roll(ids, -1)))
        steps.append(micros)
    return steps


def _train_step(model, optimizer, micros, denom: float) -> None:
    for ids, cu, max_len, labels in micros:
        (model(ids, cu, max_len, labels=labels).sum() / denom).backward()
        optimizer.accumulate_grads()
    optimizer.step()


def measure_layout(rank: int, world: int, layout: dict, dtype: str | None = None, steps: int = 0, warmup: int = 0,
                   threads: int | None = None, seed: int = 1024, config: str = "tiny") -> dict:
    """Build the model of configs/<config>.py under ``layout`` on this rank (inside a process group when world >
    1), take one training step counting what it holds (and, with expert groups, the bytes its all-to-alls send to
    other ranks: ``all_to_all_bytes``), then time ``steps`` more after ``warmup`` (each step's seconds, the
    slowest rank's once merged). This rank's numbers."""
    import torch.distributed as dist

    from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer
    from evo.parallel import build_context, build_parallel_model, memory_estimate

    if threads:
        torch.set_num_threads(threads)
    if steps:
        torch.set_flush_denormal(True)  # timed as scripts/train.py trains
    cfg = tiny_config(dtype, config)
    ctx = build_context(world, rank, rank, torch.device("cpu"), 1, layout.get("tp", 1), layout.get("zero1", 1),
                        layout.get("mode", "mtp"), ep=layout.get("expert", 1))
    model = build_parallel_model(cfg.model, ctx, seed)
    out = {"memory_estimate": memory_estimate(model, ctx, cfg.model)}
    params = {id(p): p for p in model.parameters()}.values()
    out["param_bytes"] = sum(_local(p).numel() * p.element_size() for p in params)
    scaler = DynamicLossScaler(cfg.grad_scaler, enabled=False)
    optimizer = MixedPrecisionOptimizer(model, cfg.adam, cfg.hybrid_zero_optimizer.clip_grad_norm, scaler, ctx)
    batches = _batches(cfg, ctx, 1 + warmup + steps)
    denom = float(cfg.data.seq_len * cfg.data.micro_bsz * cfg.data.micro_num * ctx.dp_size)

    ids, cu, max_len, labels = batches[0][0]  # the counted step: one micro-batch
    with counted_all_to_all(ctx.rank if ctx.ep_size > 1 else None) as sent:
        loss = model(ids, cu, max_len, labels=labels)
        out["held_compute_bytes"] = _held_compute_bytes(model, ctx)
        (loss.sum() / denom).backward()
    out["all_to_all_bytes"] = sum(sent)
    optimizer.accumulate_grads()
    grads = [m.grad for m in optimizer.masters.values() if m.grad is not None]
    out["gradient_bytes"] = sum(_local(g).numel() * g.element_size() for g in grads)
    optimizer.step()
    out["optimizer_state_bytes"] = sum(_local(s[k]).numel() * s[k].element_size()
                                       for s in optimizer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))

    for micros in batches[1:1 + warmup]:
        _train_step(model, optimizer, micros, denom)
    if steps:
        out["step_seconds"] = []
        for micros in batches[1 + warmup:]:
            ctx.barrier()
            start = time.perf_counter()
            _train_step(model, optimizer, micros, denom)
            out["step_seconds"].append(time.perf_counter() - start)
        out["tokens_per_step"] = int(denom)  # every row's tokens are labelled: global tokens of a step
    if ctx.distributed:
        dist.barrier()
    return out


@contextlib.contextmanager
def counted_all_to_all(rank: int | None):
    """Within it, the bytes each uneven all-to-all (evo.parallel.expert's token exchanges) sends to other ranks
    are appended to the yielded list (``rank``: this rank's global rank; None counts nothing)."""
    import torch.distributed as dist

    sent: list[int] = []
    real = dist.all_to_all_single

    def counting(out, inp, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        if input_split_sizes is not None:  # token rows: all but the rows this rank keeps
            me = dist.get_group_rank(group, rank) if group is not None else rank
            row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
            sent.append(row * (sum(input_split_sizes) - input_split_sizes[me]))
        return real(out, inp, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes,
                    group=group, **kwargs)

    if rank is not None:
        dist.all_to_all_single = counting
    try:
        yield sent
    finally:
        dist.all_to_all_single = real


def measure_layouts(rank: int, world: int, jobs: list[dict]) -> list[dict]:
    """``measure_layout(rank, world, **job)`` for each job, in one process group (run_distributed's fn)."""
    return [measure_layout(rank, world, **job) for job in jobs]


def merge_ranks(ranks: list[dict]) -> dict:
    """Each number's largest over the ranks (per-rank bytes; per-step seconds step by step)."""
    out = {"memory_estimate": {k: max(r["memory_estimate"][k] for r in ranks) for k in ranks[0]["memory_estimate"]}}
    for key in ranks[0]:
        if key == "step_seconds":  # a step lasts until its slowest rank is done
            out[key] = [max(times) for times in zip(*(r[key] for r in ranks))]
        elif key != "memory_estimate":
            out[key] = max(r[key] for r in ranks)
    return out


def measured(jobs_by_world: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Run each world's jobs in one gloo group of that many processes; each job's merged result."""
    from tests.dist import run_distributed

    out = {}
    for world, jobs in jobs_by_world.items():
        ranks = run_distributed(measure_layouts, world, jobs)
        out[world] = [merge_ranks([r[i] for r in ranks]) for i in range(len(jobs))]
    return out


def measured_rows(quick: bool, timing: bool) -> list[dict]:
    steps, warmup = ((4, 1) if quick else (15, 3)) if timing else (0, 0)
    jobs: dict[int, list[dict]] = {1: [], 2: []}
    index = []
    for name, world, layout in TINY_LAYOUTS:
        jobs[world].append(dict(layout=layout, steps=steps, warmup=warmup, threads=1))
        index.append((name, world, layout, len(jobs[world]) - 1))
    if timing:  # the baseline given both cores
        jobs[1].append(dict(layout=TINY_LAYOUTS[0][2], steps=steps, warmup=warmup, threads=2))
    results = measured(jobs)
    cfg = tiny_config()
    rows = []
    for name, world, layout, i in index[:4]:  # memory: the four layouts (msp holds what mtp does)
        r = results[world][i]
        computed = computed_memory(cfg.model, world, layout["tp"], layout["zero1"])
        mem = r["memory_estimate"]
        rows.append({"case": f"tiny, {name}", "kind": "measured", "world": world, **mem,
                     "counted_param_bytes": r["param_bytes"], "counted_gradient_bytes": r["gradient_bytes"],
                     "counted_optimizer_state_bytes": r["optimizer_state_bytes"],
                     "held_compute_bytes": r["held_compute_bytes"],
                     "computed_matches": all(computed.get(k) == mem.get(k) for k in MEMORY_KEYS)
                     and computed.get("compute_weights", 0) == r["held_compute_bytes"]})
    if timing:
        base = results[1][0]
        entries = [(name, world, results[world][i]) for name, world, _, i in index]
        entries.insert(1, ("1 process, 2 threads", 1, results[1][-1]))
        base_sec = min(base["step_seconds"])
        for name, world, r in entries:
            sec, tokens = min(r["step_seconds"]), r["tokens_per_step"]  # the best step: the least disturbed
            per_process = tokens / sec / world
            rows.append({"case": f"tiny step, {name}", "kind": "time", "world": world, "tokens_per_step": tokens,
                         "ms_per_step": sec * 1e3, "median_ms": statistics.median(r["step_seconds"]) * 1e3,
                         "step_time_vs_1": sec / base_sec, "tokens_per_s": tokens / sec,
                         "tokens_per_s_per_process": per_process,
                         "per_process_vs_1": per_process / (base["tokens_per_step"] / base_sec)})
    return rows


# ---------------------------------------------------------------------------------------------- one GPU, FSDP2
def _fsdp_model(cfg, device: torch.device, seed: int):
    """The model as evo/parallel/parallelize.py wraps it (``apply_fsdp``), on a 1-rank mesh: each layer and the
    root; materialized as ``build_parallel_model`` does."""
    from torch.distributed.device_mesh import init_device_mesh

    from evo.model import DecoderModel
    from evo.parallel.parallelize import apply_fsdp, mark_checkpointed

    with torch.device("meta"):
        model = DecoderModel(cfg)
    mark_checkpointed(list(model.layers), cfg.checkpoint)
    apply_fsdp(model, init_device_mesh(device.type, (1,)), cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model


def fsdp_wrapping(device: str, shape: dict, dtype: str, tokens: int, micro_num: int, steps: int, warmup: int,
                  repeats: int = 2, seed: int = 0) -> list[dict]:
    """Tokens/s of one device training ``shape`` without FSDP2 (evo's 1-process path: the model in ``dtype``,
    fp32 masters in the optimizer) and with it (fp32 parameter shards on a 1-rank mesh, compute in ``dtype``),
    in one process group of one rank (created here unless one exists). The two models stay resident and are
    timed in turn ``repeats`` times; the best time of each counts."""
    import torch.distributed as dist

    from evo.config import AdamConfig, GradScalerConfig, config_from_dict
    from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer
    from evo.parallel import build_context, build_parallel_model

    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    own_group = not dist.is_initialized()
    if own_group:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        cfg = config_from_dict({"model": dict(shape, dtype=dtype)}).model
        ctx = build_context(1, 0, 0, dev, 1, 1, 1, "mtp")
        models = {"no FSDP2": build_parallel_model(cfg, ctx, seed), "FSDP2, 1-rank mesh": _fsdp_model(cfg, dev, seed)}
        scaler = DynamicLossScaler(GradScalerConfig(), enabled=False)
        optimizers = {k: MixedPrecisionOptimizer(m, AdamConfig(), 1.0, scaler, ctx) for k, m in models.items()}
        gen = torch.Generator().manual_seed(seed)
        cu = torch.tensor([0, tokens // 4, tokens // 2, 3 * tokens // 4, tokens], dtype=torch.int32, device=dev)
        micros = []
        for _ in range(micro_num):
            ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen).to(dev)
            micros.append((ids, cu, tokens // 4, torch.roll(ids, -1)))
        denom = float(tokens * micro_num)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        for name in models:
            for _ in range(warmup):
                _train_step(models[name], optimizers[name], micros, denom)
        best = {name: float("inf") for name in models}
        for _ in range(repeats):
            for name in models:
                sync()
                start = time.perf_counter()
                for _ in range(steps):
                    _train_step(models[name], optimizers[name], micros, denom)
                sync()
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
        base = best["no FSDP2"]
        rows = []
        for name, sec in best.items():
            rows.append({"case": f"one {dev.type}, {name}", "kind": "fsdp", "dtype": dtype,
                         "shape": f"{shape['num_layers']}x{shape['hidden_size']}, vocab {shape['vocab_size']}",
                         "tokens_per_step": tokens * micro_num, "ms_per_step": sec * 1e3,
                         "tokens_per_s": tokens * micro_num / sec, "cost_pct": (sec / base - 1) * 100,
                         "under_3pct": (sec / base - 1) * 100 < 3})  # the goal for the wrapping
        return rows
    finally:
        if own_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- entry
def run(quick: bool, device: str) -> list[dict]:
    rows = measured_rows(quick, timing=device == "cpu")
    if device != "cpu":
        rows.append({"case": "tiny step times", "kind": "time", "skipped": "CPU only (run on a machine without a GPU)"})
    rows += computed_rows()
    if device == "cuda":
        rows += fsdp_wrapping("cuda", GPU_SHAPE, "torch.bfloat16", tokens=8192, micro_num=2,
                              steps=10 if quick else 30, warmup=3 if quick else 5, repeats=2 if quick else 3)
    else:
        rows.append({"case": "one GPU, FSDP2 wrapping against none", "kind": "fsdp",
                     "skipped": "no CUDA GPU: tokens/s with and without FSDP2 is measured on a GPU only"})
    return rows
