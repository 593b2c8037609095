"""InternEvo's 2D sequence parallelism, the layouts (evo/parallel/sequence_2d.py): the groups against the examples in
InternEvo's Initializer_2D_SEQUENCE_PARALLEL and its rules, and the zigzag split of packed rows: every token on
exactly one context rank with its document position, and the causal attention work balanced."""

import pytest
import torch

from evo.parallel.context_attention import balanced_counts, ring_schedule, zigzag_shards
from evo.parallel.sequence_2d import sequence_2d_groups
from tests.dist import run_distributed


def test_windows_are_internevos_examples():
    # get_sliding_window_pg's comments: 16 context ranks, windows of 4, not interleaved
    groups = sequence_2d_groups(list(range(16)), head_size=1, context_size=16, window_size=4, head_first=True)
    assert groups["intra_window"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups["inter_window"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    # interleaved: even and odd ranks apart (the comment's intra example; its inter example has a typo, [2, 3, 12,
    # 13] for [2, 3, 10, 11], which the code does not make)
    groups = sequence_2d_groups(list(range(16)), head_size=1, context_size=16, window_size=4, interleaved=True)
    assert groups["intra_window"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["inter_window"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]


def test_head_first_places_heads_in_runs_and_contexts_strided():
    first = sequence_2d_groups(list(range(8, 16)), head_size=2, context_size=4, window_size=2, head_first=True)
    assert first["head"] == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert first["context"] == [[8, 10, 12, 14], [9, 11, 13, 15]]
    assert first["intra_window"] == [[8, 10], [12, 14], [9, 11], [13, 15]]
    context_first = sequence_2d_groups(list(range(8)), head_size=2, context_size=4, window_size=4, head_first=False)
    assert context_first["context"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert context_first["head"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert context_first["intra_window"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the whole group: one window
    # InternEvo turns interleaving off for windows of 8 or more ranks or the whole context group
    assert sequence_2d_groups(list(range(4)), 1, 4, 4, interleaved=True)["intra_window"] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="window_size 3 must divide context_size 4"):
        sequence_2d_groups(list(range(4)), 1, 4, 3)
    with pytest.raises(ValueError, match="not head_size 2 x context_size 4"):
        sequence_2d_groups(list(range(6)), 2, 4, 1)


@pytest.mark.parametrize("context", [2, 3, 4])
@pytest.mark.parametrize("lengths", [[64], [17, 1, 40, 6], [3, 2, 5, 1, 29], [8] * 8, [1] * 12, [5, 7]])
def test_zigzag_gives_every_token_to_one_rank_with_its_position_and_balances_causal_work(lengths, context):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    shards = zigzag_shards(cu, context)
    held = torch.cat([s.tokens for s in shards])
    assert sorted(held.tolist()) == list(range(cu[-1]))  # each token exactly once
    counts = [len(s.tokens) for s in shards]
    assert max(counts) - min(counts) <= 1  # no padding: equal whenever the context size divides the row
    if cu[-1] % context == 0:
        assert len(set(counts)) == 1
    starts = torch.tensor(cu[:-1])
    doc_of = torch.bucketize(torch.arange(cu[-1]), torch.tensor(cu[1:]), right=True)
    for s in shards:
        assert torch.equal(s.positions, s.tokens - starts[doc_of[s.tokens]])  # positions within the document
        assert sum(end - start for _, start, end in s.segments) == len(s.tokens)
        assert all(s.segments[i][:2] < s.segments[i + 1][:2] for i in range(len(s.segments) - 1))  # in order
    # causal work of a token: the keys it sees (its position + 1). A document's ranks differ by at most what one
    # token more in each chunk costs (two tokens, each seeing at most the whole document)
    for doc, n in enumerate(lengths):
        work = [sum(e * (e + 1) // 2 - b * (b + 1) // 2 for d, b, e in s.segments if d == doc) for s in shards]
        assert max(work) - min(work) <= 2 * n, (doc, work)
        if n % (2 * context) == 0:
            assert len(set(work)) == 1  # divisible: exactly equal


def test_balanced_counts_give_the_extra_tokens_to_the_emptiest_ranks():
    assert balanced_counts([5, 5, 2], 2) == [[3, 2], [2, 3], [1, 1]]
    assert balanced_counts([1, 1, 1, 1], 4) == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("context,window,interleaved", [(4, 1, False), (4, 4, False), (8, 2, False), (8, 2, True),
                                                        (6, 3, False)])
def test_the_double_ring_shows_every_rank_every_block_once(context, window, interleaved):
    groups = sequence_2d_groups(list(range(context)), 1, context, window, interleaved=interleaved)
    rounds = ring_schedule(groups["intra_window"])
    assert len(rounds) == context // window and all(len(steps) == window for steps in rounds)
    for c in range(context):
        seen = [held[c] for steps in rounds for held in steps]
        assert sorted(seen) == list(range(context)) and seen[0] == c  # every block once, its own first
    for steps in rounds:
        for held in steps:
            assert sorted(held) == list(range(context))  # each step a permutation: every block at one rank
        for i in range(1, len(steps)):  # inner steps: a block moves within its window
            for c in range(context):
                window_of = next(w for w in groups["intra_window"] if c in w)
                assert steps[i][c] in [steps[i - 1][x] for x in window_of]
    # the inter-window groups are the ranks at one place in every window, as InternEvo's initializer makes them
    windows = groups["intra_window"]
    assert [[w[j] for w in windows] for j in range(len(windows[0]))] == groups["inter_window"]


# ---------------------------------------------------------------------------------------------- the attention op
def _row(lengths, heads, kv_heads, d, seed=0, dtype=torch.float32):
    """cu_seqlens and a packed row's q, k, v and the gradient of the output, whole."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, dout = (torch.randn(total, h, d, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads, heads))
    return cu, q, k, v, dout


def _masked_attention(q, k, v, cu, left):
    """An independent reference: softmax over keys allowed by a mask built from token positions (same document,
    key position <= query position, within ``left`` when >= 0), in fp64; returns (out, lse (heads, tokens))."""
    doc = torch.bucketize(torch.arange(q.shape[0]), cu[1:].long(), right=True)
    pos = torch.arange(q.shape[0]) - cu[doc].long()
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if left >= 0:
        allowed &= pos[None, :] >= pos[:, None] - left
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv), lse


def _sequence_2d_rank(rank, world, lengths, head_size, window_size, heads, kv_heads, left, all_gather, backend,
                      head_first):
    from evo import kernels as K
    from evo.parallel.sequence import head_to_seq, seq_to_head
    from evo.parallel.context_attention import ContextGroup, context_attention
    from evo.parallel.sequence_2d import ContextShards, SequenceGroup2D
    import torch.distributed as dist

    context = world // head_size
    groups = sequence_2d_groups(list(range(world)), head_size, context, window_size, head_first)
    made = {}
    for kind in ("head", "context"):
        for ranks in groups[kind]:
            made[kind, tuple(ranks)] = dist.new_group(ranks)
    mine = {kind: next(r for r in groups[kind] if rank in r) for kind in ("head", "context")}
    windows = [[mine["context"].index(r) for r in w] for w in groups["intra_window"] if set(w) <= set(mine["context"])]
    group = ContextGroup(mine["context"], mine["context"].index(rank), windows, made["context", tuple(mine["context"])])
    layout = SequenceGroup2D(head_size, mine["head"].index(rank), made["head", tuple(mine["head"])], group, head_first,
                             all_gather)
    shards = ContextShards(world, rank, None, layout, left)
    cu, q, k, v, dout = _row(lengths, heads, kv_heads, 8)
    shards.decide(int(cu[-1]), True, cu)
    idx = shards.index
    q, k, v = (t[idx].clone().requires_grad_() for t in (q, k, v))
    runs = []
    for _ in range(2):  # twice: the same result, bit for bit (a fixed order of steps and merges)
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with K.use_backend(backend):
            qh, kh, vh = (seq_to_head(t, layout.head_group) if head_size > 1 else t for t in (q, k, v))
            out, lse = context_attention(qh, kh, vh, shards.plan, window_size=(left, 0) if left >= 0 else (-1, -1),
                                         return_lse=True)
            out = head_to_seq(out, layout.head_group) if head_size > 1 else out
            out.backward(dout[idx])
        runs.append([out.detach(), lse, q.grad, k.grad, v.grad])
    deterministic = all(torch.equal(a, b) for a, b in zip(*runs))
    return {"index": idx, "out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "lse": lse,
            "deterministic": deterministic}


def _scatter(results, key, total):
    whole = torch.zeros(total, *results[0][key].shape[1:], dtype=results[0][key].dtype)
    for r in results:
        whole[r["index"]] = r[key]
    return whole


CASES = {  # name: (lengths, world, head_size, window_size, heads, kv_heads, left, all_gather)
    "context 2, documents crossing shard edges": ([13, 3, 22, 2, 8], 2, 1, 1, 2, 2, -1, False),
    "context 4, one long document, double ring": ([48], 4, 1, 2, 2, 1, -1, False),
    "context 4, many short documents": ([3, 1, 2, 5, 1, 4, 2, 6, 1, 7], 4, 1, 1, 2, 2, -1, False),
    "head 2 x context 2, gqa": ([21, 11], 4, 2, 1, 4, 2, -1, False),
    "context 2, all-gather": ([13, 3, 22, 2, 8], 2, 1, 1, 2, 2, -1, True),
    "context 4, sliding window, all-gather": ([30, 9, 9], 4, 1, 2, 2, 1, 5, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_sequence_2d_attention_equals_one_process_and_a_position_mask(case, backend):
    from evo import kernels as K

    lengths, world, head_size, window, heads, kv_heads, left, all_gather = CASES[case]
    results = run_distributed(_sequence_2d_rank, world, lengths, head_size, window, heads, kv_heads, left,
                              all_gather, backend, True)
    total = sum(lengths)
    cu, q, k, v, dout = _row(lengths, heads, kv_heads, 8)
    # every token once, each rank the same number of tokens
    assert sorted(torch.cat([r["index"] for r in results]).tolist()) == list(range(total))
    assert len({len(r["index"]) for r in results}) == 1
    assert all(r["deterministic"] for r in results)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    window_size = (left, 0) if left >= 0 else (-1, -1)
    with K.use_backend("torch"):
        ref, ref_lse, _ = K.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                                   window_size=window_size, return_attn_probs=True)
    ref.backward(dout)
    masked, masked_lse = _masked_attention(q.detach(), k.detach(), v.detach(), cu, left)
    out = _scatter(results, "out", total)
    torch.testing.assert_close(out, ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), masked, atol=1e-5, rtol=1e-5)
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        torch.testing.assert_close(_scatter(results, name, total), t.grad, atol=1e-5, rtol=1e-5, msg=name)
    if head_size == 1:  # lse (heads, rows) of each context rank's rows
        lse = torch.zeros(heads, total)
        for r in results:
            lse[:, r["index"]] = r["lse"]
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), masked_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # about 20 s: three layouts on 2 and 4 processes
def test_attention_sends_what_the_benchmark_formulas_say():
    """bench/context.py's communication model against the bytes counted at the collectives, forward and backward
    of the tiny model on a 512-token row: isp, the double ring, the all-gather variant, head x context."""
    from bench.context import LAYOUTS, formula_bytes, measure
    from bench.parallel import tiny_config

    cfg = tiny_config().model
    for name, world, mode, fields in LAYOUTS:
        if name not in ("isp s=2", "double ring, context 4, windows of 2", "all-gather, context 2",
                        "head 2 x context 2"):
            continue
        ranks = run_distributed(measure, world, mode, fields, 1, 512)
        formula = formula_bytes(fields or {}, world, 512, cfg.num_layers, cfg.num_attention_heads, cfg.kv_heads,
                                cfg.head_dim)
        assert formula > 0 and max(r["sent_bytes"] for r in ranks) == pytest.approx(formula, rel=1e-9), name


def test_the_ring_block_benchmark_computes_what_one_process_does():
    from bench.context import ring_block_rows

    ring, whole = ring_block_rows("cpu", quick=True)
    assert ring["provider"] == "ring" and whole["provider"] == "evo"
    assert ring["max_abs_error_vs_whole"] < 1e-5 and ring["TFLOP_s"] > 0 and ring["vs_single_process"] > 0


@pytest.mark.parametrize("head_first, rank, place", [(True, 5, "head 1 context 0"), (False, 5, "head 0 context 1")])
def test_the_layout_line_names_the_head_and_context_sizes_and_this_ranks_place(head_first, rank, place):
    from evo.config import config_from_dict
    from evo.parallel import ParallelContext
    from tests.helpers import small_sections

    two_d = dict(enable=True, head_size=2, context_size=2, device_placement_strategy=dict(head_first=head_first))
    cfg = config_from_dict(small_sections(parallel=dict(tensor=dict(size=4, mode="isp"), sequence_2D=two_d)),
                           world_size=8)
    line = ParallelContext.plan(cfg.parallel, 8, rank).describe()
    assert "2D sequence groups of head 2 x context 2 (windows of 1, ring)" in line and line.endswith(place)
    # tp rank 1: head-first places head groups in runs (head 1 of context 0); context-first the reverse
