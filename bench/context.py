"""Long packed rows across ranks (docs/parallel.md, evo/parallel/sequence_2d.py).

Measured on this CPU in gloo processes: configs/tiny.py's model (fp32, 4 heads, 2 key/value heads) on one packed
row of ``TOKENS`` tokens (documents of 2048, 1024, 512, 256 and 256 tokens repeated), forward and backward of the
whole model (no optimizer), in one process, under isp (Ulysses) and under 2D sequence parallelism (a ring over
the context group, the double ring, the all-gather variant, head x context). Per layout: tokens/s (the best of
the timed steps, each timed on its slowest rank), the activation bytes autograd keeps for backward on the largest
rank (every tensor a forward saves, counted by a saved-tensor hook: the model's activation memory), and the
bytes one rank sends to others for attention in one forward and backward, counted at the collectives (isp's
all-to-alls, the ring's isend, the all-gather and reduce-scatter; the logical payload: what leaves the rank for
other ranks) against the formula of each (``formula_bytes``). isp over 4 ranks is not run: the model's 2
key/value heads do not split over 4, the limit 2D lifts.
"""

from __future__ import annotations

import contextlib
import time

import torch

TOKENS = 8192
DOCS = [2048, 1024, 512, 256, 256]  # repeated to fill the row
# (name, world, tp mode, sequence_2D fields or None)
LAYOUTS = [("one process", 1, None, None),
           ("isp s=2", 2, "isp", None),
           ("ring, context 2", 2, "isp", dict(head_size=1, context_size=2, window_size=1)),
           ("all-gather, context 2", 2, "isp", dict(head_size=1, context_size=2, window_size=1,
                                                    kv_exchange="all_gather")),
           ("ring, context 4", 4, "isp", dict(head_size=1, context_size=4, window_size=4)),
           ("double ring, context 4, windows of 2", 4, "isp", dict(head_size=1, context_size=4, window_size=2)),
           ("head 2 x context 2", 4, "isp", dict(head_size=2, context_size=2, window_size=1))]


def row_lengths(tokens: int = TOKENS) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(DOCS[len(lengths) % len(DOCS)], tokens - sum(lengths)))
    return lengths


def formula_bytes(layout: dict | None, world: int, tokens: int, layers: int, heads: int, kv_heads: int, d: int,
                  nbytes: int = 4) -> float:
    """Attention's bytes one rank sends to others in a forward and backward (fp32 activations, fp32 gradients):

    - isp over s ranks: q, k, v to heads and the output back, forward and backward (each the other's backward):
      2 x (s - 1) / s x tokens / s x (2 heads + 2 kv heads) x d;
    - the context ring over C ranks (windows of w, C / w rounds): forward C - 1 key/value passes of a block of
      tokens / C rows; backward the same passes again, the travelling fp32 gradients (w - 1 per round) and each
      round's gradients home (C / w, none where a block ends its round at home);
    - all-gather: the block to C - 1 ranks in forward and again in backward, then the gradients reduce-scattered
      (C - 1 blocks of fp32);
    - head h x context C: isp's term with s = h on the context shard (tokens / C), and the ring's with kv heads / h.
    Times the layers."""
    if layout is None or world == 1:
        return 0.0
    if not layout:  # isp
        s = world
        return layers * 2 * (s - 1) / s * tokens / s * (2 * heads + 2 * kv_heads) * d * nbytes
    h, c, w = layout["head_size"], layout["context_size"], layout["window_size"]
    kv_heads, heads, part = kv_heads // h, heads // h, 0.0
    if h > 1:
        part += 2 * (h - 1) / h * tokens / c / h * (2 * heads * h + 2 * kv_heads * h) * d * nbytes
    block = 2 * tokens / c * kv_heads * d  # keys and values of one context rank
    if layout.get("kv_exchange") == "all_gather":
        part += (c - 1) * block * (2 * nbytes + 4)
    else:
        home = sum(1 for steps in _rounds(c, w) if steps[-1][0] != 0)  # rounds whose last block is not rank 0's own
        part += 2 * (c - 1) * block * nbytes + ((w - 1) * (c // w) + home) * block * 4
    return layers * part


def _rounds(c: int, w: int):
    from evo.parallel.context_attention import ring_schedule
    from evo.parallel.sequence_2d import sequence_2d_groups

    return ring_schedule(sequence_2d_groups(list(range(c)), 1, c, w)["intra_window"])


@contextlib.contextmanager
def counted_sends(rank: int):
    """The bytes attention's collectives send to other ranks, appended to the yielded list while inside."""
    import torch.distributed as dist

    from evo.parallel import context_attention, sequence

    sent: list[int] = []
    real = (sequence._all_to_all_single, dist.batch_isend_irecv, context_attention._all_gather_single,
            context_attention._reduce_scatter_single)

    def all_to_all(out, inp, group=None, **kwargs):
        sent.append(inp.numel() * inp.element_size() * (dist.get_world_size(group) - 1) // dist.get_world_size(group))
        return real[0](out, inp, group=group, **kwargs)

    def p2p(ops):
        sent.extend(op.tensor.numel() * op.tensor.element_size() for op in ops
                    if op.op is dist.isend and op.peer != rank)
        return real[1](ops)

    def gather(out, inp, group=None, **kwargs):
        sent.append(inp.numel() * inp.element_size() * (dist.get_world_size(group) - 1))
        return real[2](out, inp, group=group, **kwargs)

    def scatter(out, inp, group=None, **kwargs):
        sent.append(out.numel() * out.element_size() * (dist.get_world_size(group) - 1))
        return real[3](out, inp, group=group, **kwargs)

    sequence._all_to_all_single, dist.batch_isend_irecv = all_to_all, p2p
    context_attention._all_gather_single, context_attention._reduce_scatter_single = gather, scatter
    try:
        yield sent
    finally:
        (sequence._all_to_all_single, dist.batch_isend_irecv, context_attention._all_gather_single,
         context_attention._reduce_scatter_single) = real


def measure(rank: int, world: int, mode: str | None, fields: dict | None, steps: int, tokens: int) -> dict:
    """One layout on this rank: step seconds, saved activation bytes, bytes sent by attention's collectives."""
    from bench.parallel import tiny_config
    from evo.config import Placement, Sequence2DConfig
    from evo.parallel import ParallelContext, build_context, build_parallel_model

    torch.set_num_threads(1)
    cfg = tiny_config().model
    two_d = None
    if fields is not None:
        two_d = Sequence2DConfig(enable=True, **fields, device_placement_strategy=Placement())
    ctx = ParallelContext() if world == 1 else build_context(world, rank, 0, torch.device("cpu"), 1, world, -1,
                                                             mode, sequence_2d=two_d)
    model = build_parallel_model(cfg, ctx, seed=0)
    lengths = row_lengths(tokens)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    seconds, saved, sent = [], [], []
    for step in range(steps + 1):
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        if ctx.distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        with counted_sends(rank) as counted, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, cu, max(lengths), labels=torch.roll(ids, -1)).sum()
            loss.backward()
        seconds.append(time.perf_counter() - start)
        saved.append(sum(kept))
        sent.append(sum(counted))
        model.zero_grad(set_to_none=True)
    return {"seconds": min(seconds[1:]), "saved_bytes": saved[-1], "sent_bytes": sent[-1]}


def step_flops(step) -> float:
    """Query-key pairs a ``Step`` computes (bottom-right causal: a segment of lq queries and lk keys leaves out
    lq (lq - 1) / 2), times 4 (two matmuls, 2 FLOPs a multiply-add): per head and head dimension."""
    lq = (step.cu_seqlens_q[1:] - step.cu_seqlens_q[:-1]).double()
    lk = (step.cu_seqlens_k[1:] - step.cu_seqlens_k[:-1]).double()
    pairs = lq * lk - (lq * (lq - 1) / 2 if step.causal else 0)
    return 4 * float(pairs.sum())


def ring_block_rows(device: str, quick: bool, context: int = 4) -> list[dict]:
    """The GPU goal's measurement, in one process: context rank 0's ring steps (its queries against each rank's
    block, forward with the (out, lse) merge and backward from the merged result, as ``context_attention`` runs
    them, without the transfers) against evo's single-process varlen attention over the whole row (forward and
    ``flash_attn_varlen_backward``), TFLOP/s each, same documents (bench/attention.py's VARLEN: 16k tokens),
    bf16, 16 query heads, 4 key/value heads, head dim 128 on a GPU; fp32, 4/2 heads, 32 and a 1k row on a CPU."""
    from bench.attention import VARLEN
    from bench.common import measure, quantile
    from evo import kernels
    from evo.parallel.context_attention import attend_step, attend_step_backward, ring_step, zigzag_shards

    gpu = device == "cuda"
    lengths = VARLEN if gpu else [256, 128, 128, 64, 64, 64, 64, 32, 32, 32, 32, 32, 32, 32, 32, 32]
    hq, hkv, d, dtype = (16, 4, 128, torch.bfloat16) if gpu else (4, 2, 32, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    total, longest = int(cu[-1]), max(lengths)
    q, k, v, dout = (torch.randn(total, h, d, device=device, dtype=dtype, generator=gen)
                     for h in (hq, hkv, hkv, hq))
    shards = zigzag_shards(cu.tolist(), context)
    steps = [ring_step(shards, 0, s, device) for s in range(context)]
    mine = shards[0].tokens.to(device)
    q0, dout0 = q[mine], dout[mine]
    blocks = [torch.stack([k[sh.tokens.to(device)], v[sh.tokens.to(device)]]) for sh in shards]
    whole_out, whole_lse, _ = kernels.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True,
                                                             return_attn_probs=True)
    state = {}

    def ring():
        out = torch.zeros(q0.shape, dtype=torch.float32, device=device)
        lse = torch.full((hq, q0.shape[0]), float("-inf"), device=device)
        for step, block in zip(steps, blocks):
            if step is not None:
                attend_step(q0, block, step, None, (-1, -1), out, lse)
        out = out.to(dtype)
        dq = torch.zeros(q0.shape, dtype=torch.float32, device=device)
        for step, block in zip(steps, blocks):
            if step is not None:
                attend_step_backward(dout0, q0, out, lse, block, step, None, (-1, -1), dq, torch.zeros_like(
                    block, dtype=torch.float32))
        state["ring"] = out

    def whole():
        out, lse, _ = kernels.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True,
                                                     return_attn_probs=True)
        kernels.flash_attn_varlen_backward(dout, q, k, v, out, lse, cu, cu, longest, longest, causal=True)

    samples = measure({"ring": ring, "evo": whole}, device, quick)
    err = float((state["ring"].float() - whole_out[mine].float()).abs().max())
    flops = {"ring": 3.5 * hq * d * sum(step_flops(s) for s in steps if s is not None),
             "evo": 3.5 * hq * d * 4 * sum(n * (n + 1) / 2 for n in lengths)}
    rows = []
    for name in ("ring", "evo"):
        ms = quantile(samples[name], 0.5)
        rows.append({"op": "ring per-block attention", "mode": "fwd+bwd", "provider": name,
                     "shape": f"{total}x{hq}/{hkv}x{d}, context {context}", "ms": ms,
                     "TFLOP_s": flops[name] / ms / 1e9, "max_abs_error_vs_whole": err if name == "ring" else 0.0})
    rows[0]["vs_single_process"] = rows[0]["TFLOP_s"] / rows[1]["TFLOP_s"]
    return rows


def run(quick: bool, device: str) -> list[dict]:
    rows = computed_rows() + ring_block_rows(device, quick)
    if device != "cpu":
        return rows + [{"case": "long packed rows", "kind": "measured", "skipped": "gloo processes on a CPU only"}]
    from bench.parallel import tiny_config
    from tests.dist import run_distributed

    cfg = tiny_config().model
    tokens, steps = (2048, 1) if quick else (TOKENS, 3)
    for name, world, mode, fields in LAYOUTS:
        if world == 1:
            ranks = [measure(0, 1, None, None, steps, tokens)]
        else:
            ranks = run_distributed(measure, world, mode, fields, steps, tokens)
        seconds = max(r["seconds"] for r in ranks)
        formula = formula_bytes(fields or ({} if mode else None), world, tokens, cfg.num_layers,
                                cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim)
        sent = max(r["sent_bytes"] for r in ranks)
        rows.append({"case": f"tiny, {tokens}-token row, {name}", "kind": "measured", "world": world,
                     "tokens_per_s": tokens / seconds, "ms_per_step": seconds * 1e3,
                     "activation_bytes": max(r["saved_bytes"] for r in ranks), "attention_sent_bytes": sent,
                     "formula_bytes": formula, "sent_vs_formula": sent / formula if formula else None})
    return rows


# ---------------------------------------------------------------------------------------------- the paper model
H100_BYTES = 80e9 * 0.9  # an H100's memory, 10% left to the allocator's fragmentation and workspaces
LLAMA2_70B = dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_attention_heads=8,
                  intermediate_size=28672, vocab_size=32000, dtype="torch.bfloat16", checkpoint=True)


def row_memory(cfg, gpus: int, sequence_ranks: int, tokens: int, per_layer_gather: bool = False) -> dict:
    """Bytes per GPU to train one packed row of ``tokens`` split over ``sequence_ranks`` ranks (isp or 2D), bf16,
    every layer checkpointed, the rest of the ``gpus`` data-parallel, ZeRO over all of them (isp's weight groups):
    fp32 state 16 P / gpus; the bf16 compute copy, 2 P as evo keeps it (each layer's gathered weights held from
    forward to backward, evo/parallel/parallelize.py), or with ``per_layer_gather`` two layers' worth (one in use,
    the next prefetched: FSDP2's reshard_after_forward=True, not an evo option yet); per token on a rank, each
    layer's input kept (2 h bytes) and one layer's recomputation live at a time (34 h bytes: a transformer
    layer's activations with flash attention, Korthikanti et al. 2022, without the s^2 term)."""
    from evo.model import build_model, count_parameters

    model = build_model(cfg, "meta")
    params = count_parameters(model)
    layer = count_parameters(model.layers[0])
    copy = 2 * 2 * layer if per_layer_gather else 2 * params
    state = 16 * params / gpus + copy
    activations = tokens / sequence_ranks * cfg.hidden_size * (2 * cfg.num_layers + 34)
    return {"params": params, "state": state, "activations": activations, "total": state + activations}


def longest_row(cfg, gpus: int, sequence_ranks: int, per_layer_gather: bool = False) -> int:
    """The longest packed row (tokens, a multiple of 1024) that ``row_memory`` fits in an H100; 0 when the model
    state alone does not fit."""
    room = H100_BYTES - row_memory(cfg, gpus, sequence_ranks, 0, per_layer_gather)["state"]
    per_token = cfg.hidden_size * (2 * cfg.num_layers + 34) / sequence_ranks
    return max(0, int(room / per_token) // 1024 * 1024)


def ring_hidden_tokens(cfg, flops: float = 400e12, link: float = 50e9) -> float:
    """Tokens a context rank must hold for a ring step's compute to hide its key/value transfer: one step
    attends T/C queries to T/C keys (4 (T/C)^2 heads d FLOPs, half under the causal mask on the diagonal,
    all of it off it) while the next block of 2 (T/C) kv_heads d bf16 numbers crosses a ``link`` (InfiniBand,
    50 GB/s); so T/C >= flops kv_heads / (heads link)."""
    return flops * cfg.kv_heads / (cfg.num_attention_heads * link)


def computed_rows() -> list[dict]:
    from bench.parallel import model_config
    from evo.config import config_from_dict

    rows = []
    for name, cfg in (("internlm2_7b", model_config("internlm2_7b")),
                      ("llama2_70b", config_from_dict({"model": LLAMA2_70B}).model)):
        kv = cfg.kv_heads
        for gpus in (64, 512):
            for layout, ranks, context in (("isp (Ulysses)", min(kv, gpus), 1), ("ring (context)", gpus, gpus),
                                           (f"2D head {kv} x context {gpus // kv}", gpus, gpus // kv)):
                rows.append({"case": f"{name}, {gpus} H100s, {layout}", "kind": "computed", "gpus": gpus,
                             "sequence_ranks": ranks,
                             "state_GiB": row_memory(cfg, gpus, ranks, 0)["state"] / 2**30,
                             "longest_row_tokens": longest_row(cfg, gpus, ranks),
                             "longest_row_tokens_per_layer_gather": longest_row(cfg, gpus, ranks, True),
                             "shortest_row_hiding_the_ring": ring_hidden_tokens(cfg) * context if context > 1 else None})
    return rows
