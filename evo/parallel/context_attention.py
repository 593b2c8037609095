"""Causal attention over a packed row whose documents are split across a context group, exactly as one process
computes it (the attention of 2D sequence parallelism, evo.parallel.sequence_2d; LoongTrain, arXiv 2406.18485).

How a packed row is split (``zigzag_shards``). Document d of length n_d gives each of the C context ranks
floor(n_d / C) or ceil(n_d / C) of its tokens, the extra ones going to the ranks that hold fewest so far, so every
rank ends with exactly T / C tokens of a row of T (validation makes the group divide T): no padding, ever. A
rank's share of a document is a head chunk (the first half, rounded up) and a tail chunk, laid out head-tail
("zigzag"):

    document:  | h0 | h1 | ... | h(C-1) | t(C-1) | ... | t1 | t0 |      rank r holds h_r and t_r

Under a causal mask early chunks see few keys and late ones many, so the pairs balance each rank's attention work.
A document shorter than 2C tokens leaves some chunks empty; one rank's adjacent chunks are one segment. Every token
keeps its position in its document (rotary takes per-segment ``seqlen_offsets``).

The ring (``context_attention``). Query segment [lo, hi) of a document on rank c sees, of rank s's segments of that
document, those ending at or before lo: fully (no mask), and on its own rank also itself, causally. Laid out in
position order, its own rank's keys end with its own segment, so one causal call with flash-attn's bottom-right
mask covers them, and one non-causal call covers another rank's. Each ring step calls
``evo.kernels.flash_attn_varlen_func`` once, on this rank's queries against the visiting block, with per-step
``cu_seqlens_q`` / ``cu_seqlens_k`` (``Step``), and merges (out, lse) in fp32:

    lse = log(exp(lse_a) + exp(lse_b)),   out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)

(a row that sees no key has lse = +inf from the kernel and weighs zero). The backward runs the same ring: from the
merged (out, lse), ``evo.kernels.flash_attn_varlen_backward`` gives each step's dq (kept) and the visiting block's
dk, dv (added to an fp32 accumulator that travels with the block and is sent home). Steps and merges run in a
fixed order: the same layout gives the same result, bit for bit.

The double ring (``ring_schedule``): inner windows of ``window_size`` context ranks pass blocks among themselves;
after each inner round every rank passes the block it started the round with to the next window (the inter-window
ring), so every rank sees every block once, and inner (intra-node) links carry most of the traffic. The next
block's transfer runs while the current one is attended to (isend / irecv; on a GPU on NCCL's stream).

``all_gather=True`` (``kv_exchange='all_gather'``) instead gathers the context group's keys and values once
(cheaper for short documents, and what sliding windows need: each query segment attends to its document's keys
[lo - window, hi) in position order, one causal call); backward reduce-scatters dk, dv to their owners.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from evo import kernels

# torch 2.13 renamed these two (the old names deprecated there); older releases have only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------- splitting a row
@dataclass
class Shard:
    """One context rank's part of a packed row: ``tokens`` the row positions it holds, in its order; ``positions``
    each one's position within its document; ``segments`` (document, start, end) of each run of a document it
    holds, end exclusive and in document positions, in the order of ``tokens``."""

    tokens: torch.Tensor
    positions: torch.Tensor
    segments: list[tuple[int, int, int]]


def balanced_counts(lengths: list[int], size: int) -> list[list[int]]:
    """counts[d][r]: the tokens of document d (``lengths[d]`` long) that rank r of ``size`` holds: floor or ceil of
    length / size, the ceil going to the ranks holding fewest tokens so far (the lower rank first). The totals
    never differ by more than one, so they are equal whenever ``size`` divides the row."""
    totals, counts = [0] * size, []
    for n in lengths:
        base, extra = divmod(n, size)
        row = [base] * size
        for r in sorted(range(size), key=lambda r: (totals[r], r))[:extra]:
            row[r] += 1
        totals = [t + c for t, c in zip(totals, row)]
        counts.append(row)
    return counts


def zigzag_shards(cu_seqlens: list[int], context_size: int) -> list[Shard]:
    """Each context rank's ``Shard`` of the packed row whose documents end at ``cu_seqlens`` (the module docstring's
    head-tail split of ``balanced_counts``)."""
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    parts: list[list[tuple[int, int, int]]] = [[] for _ in range(context_size)]
    for doc, counts in enumerate(balanced_counts(lengths, context_size)):
        heads = [c - c // 2 for c in counts]
        bounds, at = {}, 0
        for r in list(range(context_size)) + list(reversed(range(context_size))):
            size = heads[r] if r not in bounds else counts[r] - heads[r]
            bounds.setdefault(r, []).append((at, at + size))
            at += size
        for r in range(context_size):
            (a, b), (c, d) = bounds[r]
            runs = [(a, d)] if b == c else [(a, b), (c, d)]  # the last rank's two chunks meet
            parts[r] += [(doc, lo, hi) for lo, hi in runs if hi > lo]
    shards = []
    for segments in parts:
        tokens = [torch.arange(cu_seqlens[d] + lo, cu_seqlens[d] + hi) for d, lo, hi in segments]
        positions = [torch.arange(lo, hi) for _, lo, hi in segments]
        shards.append(Shard(torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long),
                            torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long), segments))
    return shards


# ---------------------------------------------------------------------------------------------- the ring
def ring_schedule(windows: list[list[int]]) -> list[list[list[int]]]:
    """held[o][i][c]: the context rank whose block context rank c attends to at inner step i of outer round o of
    the double ring over ``windows`` (the intra-window groups as context indices, every window as long, the
    inter-window groups being the ranks at one place in each window). Each inner step a rank takes its window
    predecessor's block; each new round it starts from the block its predecessor in the inter-window ring
    started the last round with."""
    size, ws = sum(len(w) for w in windows), len(windows[0])
    place = {c: (w, j) for w, window in enumerate(windows) for j, c in enumerate(window)}
    intra_prev = [windows[place[c][0]][(place[c][1] - 1) % ws] for c in range(size)]
    inter_prev = [windows[(place[c][0] - 1) % len(windows)][place[c][1]] for c in range(size)]
    start, rounds = list(range(size)), []
    for _ in windows:
        held, steps = start, []
        for _ in range(ws):
            steps.append(held)
            held = [held[intra_prev[c]] for c in range(size)]
        rounds.append(steps)
        start = [start[inter_prev[c]] for c in range(size)]
    return rounds


@dataclass
class ContextGroup:
    """A context group as the ring sees it: ``ranks`` its global ranks in context order, ``index`` this rank's
    place, ``windows`` the inner rings (lists of context indices), ``group`` its process group (the all-gather
    variant's; None in a world of one)."""

    ranks: list[int]
    index: int
    windows: list[list[int]]
    group: object = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    def neighbours(self) -> tuple[int, int, int, int]:
        """Global ranks (intra next, intra previous, inter next, inter previous) of this rank."""
        ws, nw = len(self.windows[0]), len(self.windows)
        w, j = next((w, win.index(self.index)) for w, win in enumerate(self.windows) if self.index in win)
        r = self.ranks
        return (r[self.windows[w][(j + 1) % ws]], r[self.windows[w][(j - 1) % ws]],
                r[self.windows[(w + 1) % nw][j]], r[self.windows[(w - 1) % nw][j]])


@dataclass
class Step:
    """One attention call of a context rank: its queries ``q_index`` (rows of its shard) against keys ``k_index``
    (rows of the visiting block, or of the gathered row), packed per query segment (``cu_seqlens_q``,
    ``cu_seqlens_k``), with flash-attn's bottom-right causal mask or none."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool


def _runs(starts: list[int], lengths: list[int], device) -> torch.Tensor:
    """The indices start, ..., start + length - 1 of every run, concatenated."""
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    total = int(lengths_t.sum())
    offsets = torch.tensor(starts, dtype=torch.long) - (torch.cumsum(lengths_t, 0) - lengths_t)
    return (torch.repeat_interleave(offsets, lengths_t, output_size=total) + torch.arange(total)).to(device)


def _step(q_rows: list[int], q_lens: list[int], k_index: torch.Tensor, k_lens: list[int], causal: bool,
          device) -> Step | None:
    """A ``Step`` of query segments (first row, length) and their keys (``k_index``, ``k_lens`` per segment)."""
    if not q_rows:
        return None
    cu = [torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
          for lens in (q_lens, k_lens)]
    return Step(_runs(q_rows, q_lens, device), k_index.to(device), cu[0], cu[1], max(q_lens), max(k_lens), causal)


def _rows(shard: Shard) -> list[tuple[int, int, int, int]]:
    """(document, start, end, first row in the shard) of each segment of ``shard``."""
    out, row = [], 0
    for doc, lo, hi in shard.segments:
        out.append((doc, lo, hi, row))
        row += hi - lo
    return out


def ring_step(shards: list[Shard], me: int, source: int, device) -> Step | None:
    """Context rank ``me``'s queries against rank ``source``'s block: per query segment, the source's segments of
    its document that end at or before it starts (no mask), and on its own block also itself (causal)."""
    theirs: dict[int, list[tuple[int, int, int]]] = {}
    for doc, lo, hi, row in _rows(shards[source]):
        theirs.setdefault(doc, []).append((lo, hi, row))
    q_rows, q_lens, k_rows, k_runs, k_lens = [], [], [], [], []
    for doc, lo, hi, row in _rows(shards[me]):
        keys = [(krow, khi - klo) for klo, khi, krow in theirs.get(doc, ())
                if khi <= lo or (source == me and klo < hi)]
        if keys:
            q_rows.append(row)
            q_lens.append(hi - lo)
            k_rows += [r for r, _ in keys]
            k_runs += [n for _, n in keys]
            k_lens.append(sum(n for _, n in keys))
    return _step(q_rows, q_lens, _runs(k_rows, k_runs, "cpu"), k_lens, source == me, device)


def gathered_step(shards: list[Shard], me: int, cu_seqlens: list[int], left: int, device) -> Step | None:
    """Context rank ``me``'s queries against the gathered keys of the whole group (rank order: shard after shard):
    per query segment, its document's keys at positions [max(0, start - left), end) (left < 0: from 0) in
    position order, under the causal mask."""
    where = torch.empty(cu_seqlens[-1], dtype=torch.long)  # row position -> row of the gathered block
    where[torch.cat([s.tokens for s in shards])] = torch.arange(cu_seqlens[-1])
    q_rows, q_lens, k_starts, k_lens = [], [], [], []
    for doc, lo, hi, row in _rows(shards[me]):
        first = 0 if left < 0 else max(0, lo - left)
        q_rows.append(row)
        q_lens.append(hi - lo)
        k_starts.append(cu_seqlens[doc] + first)
        k_lens.append(hi - first)
    return _step(q_rows, q_lens, where[_runs(k_starts, k_lens, "cpu")], k_lens, True, device)


@dataclass
class ContextPlan:
    """What one context rank's attention needs for one packed row: its ``group``, and either the ring's ``steps``
    (by source context rank: None where it sees none of that rank's keys) or, for ``kv_exchange='all_gather'``,
    the one ``gathered`` step against the whole group's keys."""

    group: ContextGroup
    steps: list[Step | None] = field(default_factory=list)
    gathered: Step | None = None
    all_gather: bool = False


def context_plan(shards: list[Shard], group: ContextGroup, cu_seqlens: list[int], all_gather: bool = False,
                 left: int = -1, device="cpu") -> ContextPlan:
    """The ``ContextPlan`` of context rank ``group.index`` for a row split into ``shards`` (``zigzag_shards``);
    ``left``: the attention window's left reach (the all-gather variant's keys start there)."""
    me = group.index
    if all_gather:
        return ContextPlan(group, gathered=gathered_step(shards, me, cu_seqlens, left, device), all_gather=True)
    return ContextPlan(group, steps=[ring_step(shards, me, s, device) for s in range(group.size)])


def _p2p(pairs: list[tuple[torch.Tensor, int, torch.Tensor, int]], group=None) -> list:
    """Start sending each ``send`` to global rank ``dst`` and receiving ``recv`` from ``src`` within the context
    ``group`` (all of whose ranks make each call together, as NCCL wants of a group's first); the works to wait."""
    ops = []
    for send, dst, recv, src in pairs:
        ops += [dist.P2POp(dist.isend, send, dst, group), dist.P2POp(dist.irecv, recv, src, group)]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def attend_step(q, kv, step: Step, scale, window, out, lse) -> None:
    """One step forward: attention of ``step``'s queries against ``kv`` (2, rows, kv heads, d), merged into the fp32
    ``out`` (rows, heads, d) and ``lse`` (heads, rows) in place."""
    idx = step.q_index
    o, s, _ = kernels.flash_attn_varlen_func(
        q.index_select(0, idx), kv[0].index_select(0, step.k_index), kv[1].index_select(0, step.k_index),
        step.cu_seqlens_q, step.cu_seqlens_k, step.max_seqlen_q, step.max_seqlen_k, softmax_scale=scale,
        causal=step.causal, window_size=window, return_attn_probs=True)
    s = s.masked_fill(s == float("inf"), float("-inf"))  # a row that sees no key: weight zero
    old = lse.index_select(1, idx)
    new = torch.logaddexp(old, s)
    seen = new > float("-inf")
    a = torch.where(seen, torch.exp(old - new), 0.0).t().unsqueeze(-1)
    b = torch.where(seen, torch.exp(s - new), 0.0).t().unsqueeze(-1)
    out.index_copy_(0, idx, out.index_select(0, idx) * a + o.float() * b)
    lse.index_copy_(1, idx, new)


def attend_step_backward(dout, q, out, lse, kv, step: Step, scale, window, dq, dkv) -> None:
    """One step backward from the merged ``out`` and ``lse``: dq and the visiting block's dk, dv added (fp32)."""
    idx, kidx = step.q_index, step.k_index
    dq_s, dk_s, dv_s = kernels.flash_attn_varlen_backward(
        dout.index_select(0, idx), q.index_select(0, idx), kv[0].index_select(0, kidx), kv[1].index_select(0, kidx),
        out.index_select(0, idx), lse.index_select(1, idx).contiguous(), step.cu_seqlens_q, step.cu_seqlens_k,
        step.max_seqlen_q, step.max_seqlen_k, softmax_scale=scale, causal=step.causal, window_size=window,
        deterministic=True)
    dq.index_add_(0, idx, dq_s.float())
    dkv[0].index_add_(0, kidx, dk_s.float())
    dkv[1].index_add_(0, kidx, dv_s.float())


def _ring_forward(q, kv, plan: ContextPlan, scale, window):
    group = plan.group
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    intra_next, intra_prev, inter_next, inter_prev = group.neighbours()
    rounds = ring_schedule(group.windows)
    start = kv
    for o, steps in enumerate(rounds):
        block = start
        for i, held in enumerate(steps):
            pairs = []
            if i + 1 < len(steps):  # the next inner block travels while this one is attended to
                following = torch.empty_like(block)
                pairs.append((block, intra_next, following, intra_prev))
            if i == 0 and o + 1 < len(rounds):  # and the next round's first block, round by round
                next_start = torch.empty_like(start)
                pairs.append((start, inter_next, next_start, inter_prev))
            works = _p2p(pairs, group.group)
            step = plan.steps[held[group.index]]
            if step is not None:
                attend_step(q, block, step, scale, window, out, lse)
            _wait(works)
            if i + 1 < len(steps):
                block = following
        if o + 1 < len(rounds):
            start = next_start
    return out, lse


def _ring_backward(dout, q, kv, out, lse, plan: ContextPlan, scale, window):
    group = plan.group
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # this rank's block's, summed as they come home
    intra_next, intra_prev, inter_next, inter_prev = group.neighbours()
    rounds = ring_schedule(group.windows)
    start = kv
    for o, steps in enumerate(rounds):
        block, grad = start, torch.zeros_like(dkv)  # the visiting block and its gradient so far, travelling together
        for i, held in enumerate(steps):
            pairs = []
            if i + 1 < len(steps):
                following = torch.empty_like(block)
                pairs.append((block, intra_next, following, intra_prev))
            if i == 0 and o + 1 < len(rounds):
                next_start = torch.empty_like(start)
                pairs.append((start, inter_next, next_start, inter_prev))
            works = _p2p(pairs, group.group)
            step = plan.steps[held[group.index]]
            if step is not None:
                attend_step_backward(dout, q, out, lse, block, step, scale, window, dq, grad)
            _wait(works)
            if i + 1 < len(steps):
                arriving = torch.empty_like(grad)
                _wait(_p2p([(grad, intra_next, arriving, intra_prev)], group.group))
                block, grad = following, arriving
        # home: the block held last goes back to its owner with its gradient; this rank's comes from its last holder
        owner = group.ranks[steps[-1][group.index]]
        holder = group.ranks[next(c for c in range(group.size) if steps[-1][c] == group.index)]
        if owner == group.ranks[group.index]:
            dkv += grad
        else:
            arriving = torch.empty_like(grad)
            _wait(_p2p([(grad, owner, arriving, holder)], group.group))
            dkv += arriving
        if o + 1 < len(rounds):
            start = next_start
    return dq, dkv


def _gathered_forward(q, kv, plan: ContextPlan, scale, window):
    everything = _gather_blocks(kv, plan.group)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    if plan.gathered is not None:
        attend_step(q, everything, plan.gathered, scale, window, out, lse)
    return out, lse


def _gathered_backward(dout, q, kv, out, lse, plan: ContextPlan, scale, window):
    everything = _gather_blocks(kv, plan.group)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    grad = torch.zeros(everything.shape, dtype=torch.float32, device=q.device)
    if plan.gathered is not None:
        attend_step_backward(dout, q, out, lse, everything, plan.gathered, scale, window, dq, grad)
    size, rows = plan.group.size, kv.shape[1]
    if size == 1:
        return dq, grad
    mine = torch.empty(kv.shape, dtype=torch.float32, device=q.device)
    parts = grad.unflatten(1, (size, rows)).transpose(0, 1).flatten(0, 1)  # (size * 2, rows, heads, d): rank order
    _reduce_scatter_single(mine, parts.contiguous(), group=plan.group.group)
    return dq, mine


def _gather_blocks(kv: torch.Tensor, group: ContextGroup) -> torch.Tensor:
    """(2, size * rows, kv heads, d): every context rank's block, in rank order."""
    if group.size == 1:
        return kv
    parts = torch.empty((group.size * kv.shape[0], *kv.shape[1:]), dtype=kv.dtype, device=kv.device)  # dim 0 split
    _all_gather_single(parts, kv.contiguous(), group=group.group)
    return parts.unflatten(0, (group.size, kv.shape[0])).transpose(0, 1).flatten(1, 2)


class _ContextAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: ContextPlan, scale: float | None, window: tuple[int, int], kept):
        kv = torch.stack([k, v])
        if kept is not None and kept.filled:  # a selective checkpoint's recomputation: the ring does not run again
            out, lse = (t.detach() for t in kept.take())  # the forward's output: this call's output is its own
        else:
            run = _gathered_forward if plan.all_gather else _ring_forward
            out, lse = run(q, kv, plan, scale, window)
            out = out.to(q.dtype)
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # flash-attn's: +inf where no key was seen
            if kept is not None:
                kept.keep(out, lse)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.plan, ctx.scale, ctx.window = plan, scale, window
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _):
        q, kv, out, lse = ctx.saved_tensors
        run = _gathered_backward if ctx.plan.all_gather else _ring_backward
        dq, dkv = run(dout.contiguous(), q, kv, out, lse, ctx.plan, ctx.scale, ctx.window)
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None, None, None, None


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ContextPlan,
                      softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                      return_lse: bool = False, kept=None):
    """Causal attention of this context rank's shard of a packed row against the whole group's keys: q (rows,
    heads, d), k and v (rows, kv heads, d), this rank's rows in ``plan``'s shard order (``zigzag_shards``). Returns
    out (rows, heads, d), with ``return_lse`` also lse (heads, rows) fp32 (+inf where no key is seen), both equal
    to one process's ``flash_attn_varlen_func`` over the whole row; differentiable in q, k, v. Sliding windows
    (``window_size`` (left, 0)) need the all-gather plan (made with that ``left``). ``kept``: a selective
    checkpoint's ``evo.model.selective.KeptAttention`` slot: the forward fills it, the recomputation reads it."""
    if window_size != (-1, -1) and not plan.all_gather and plan.group.size > 1:
        raise ValueError("a sliding window needs kv_exchange='all_gather' (a ring step's keys are not contiguous in "
                         "position)")
    out, lse = _ContextAttention.apply(q, k, v, plan, softmax_scale, tuple(window_size), kept)
    return (out, lse) if return_lse else out
