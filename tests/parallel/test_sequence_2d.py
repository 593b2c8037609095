"""InternEvo's 2D sequence parallelism, the layouts (evo/parallel/sequence_2d.py): the groups against the examples in
InternEvo's Initializer_2D_SEQUENCE_PARALLEL and its rules, and the zigzag split of packed rows: every token on
exactly one context rank with its document position, and the causal attention work balanced."""

import pytest
import torch

from evo.parallel.sequence_2d import chunk_bounds, sequence_2d_groups, zigzag_shards


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
@pytest.mark.parametrize("lengths", [[64], [17, 1, 40, 6], [3, 2, 5, 1, 29], [8] * 8])
def test_zigzag_gives_every_token_to_one_rank_with_its_position_and_balances_causal_work(lengths, context):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    shards = zigzag_shards(cu, context)
    held = torch.cat([s.tokens for s in shards])
    assert sorted(held.tolist()) == list(range(cu[-1]))  # each token exactly once
    starts = torch.tensor(cu[:-1])
    doc_of = torch.bucketize(torch.arange(cu[-1]), torch.tensor(cu[1:]), right=True)
    for s in shards:
        assert torch.equal(s.positions, s.tokens - starts[doc_of[s.tokens]])  # positions within the document
        assert sum(end - start for _, start, end in s.segments) == len(s.tokens)
    # causal work of a token: the keys it sees (its position + 1); a document's ranks differ by at most one chunk's
    # rounding: two tokens of the longest chunk's, times the document length
    for doc, n in enumerate(lengths):
        work = [sum(e * (e + 1) // 2 - b * (b + 1) // 2 for d, b, e in s.segments if d == doc) for s in shards]
        assert max(work) - min(work) <= 2 * n, (doc, work)
        if n % (2 * context) == 0:
            assert len(set(work)) == 1  # divisible: exactly equal
    assert chunk_bounds(10, 4) == [0, 3, 6, 8, 10]
