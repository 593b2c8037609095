"""InternEvo's 2D sequence parallelism (LoongTrain, arXiv 2406.18485) on packed rows: the plan of it so far.

A sequence group of ``head_size * context_size`` ranks (isp's tensor group) is split two ways: head groups of
``head_size`` ranks run Ulysses' all-to-all (each holds heads / head_size of the heads), context groups of
``context_size`` ranks hold a part of every document of the packed row and pass key/value blocks around a ring
(a double ring: inner windows of ``window_size`` consecutive context ranks, an outer ring across the windows).

This file holds, so far, the two layouts everything else builds on (issue 27; the ring attention itself and its
wiring into the model and config come next):

- ``sequence_2d_groups``: the ranks of each head, context, intra-window and inter-window group of one sequence
  group, placed as InternEvo's ``Initializer_2D_SEQUENCE_PARALLEL`` places them (``head_first``: head groups are
  runs of consecutive ranks and context groups strided, else the reverse; ``interleaved`` windows take every other
  rank of the context group, even and odd ranks apart, and are turned off, as InternEvo does, when the window is 8
  or more ranks or the whole context group);
- ``zigzag_shards``: which tokens of a packed row each context rank holds. Every document is cut into
  2 * context_size chunks as equal as can be (the first ``length % (2 C)`` chunks one token longer), and rank r
  holds chunks r and 2 C - 1 - r of every document: under a causal mask the early chunks see few keys and the
  late ones many, so the pairs balance the work. A document shorter than 2 C tokens leaves some chunks empty: no
  padding; every token is held by exactly one rank, with its position in its document for rotary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sequence_2d_groups(ranks: list[int], head_size: int, context_size: int, window_size: int, head_first: bool = True,
                       interleaved: bool = False) -> dict[str, list[list[int]]]:
    """The head, context, intra-window and inter-window groups (lists of global ranks) of the sequence group
    ``ranks`` (``head_size * context_size`` of them, in rank order), as InternEvo's initializer makes them."""
    if len(ranks) != head_size * context_size:
        raise ValueError(f"a sequence group of {len(ranks)} ranks is not head_size {head_size} x context_size "
                         f"{context_size}")
    if context_size % window_size:
        raise ValueError(f"window_size {window_size} must divide context_size {context_size}")
    if head_first:  # heads: runs of head_size; contexts: every head_size-th rank
        heads = [ranks[i * head_size:(i + 1) * head_size] for i in range(context_size)]
        contexts = [ranks[i::head_size] for i in range(head_size)]
    else:
        contexts = [ranks[i * context_size:(i + 1) * context_size] for i in range(head_size)]
        heads = [ranks[i::context_size] for i in range(context_size)]
    if window_size >= 8 or window_size == context_size:
        interleaved = False
    intra, inter = [], []
    for context in contexts:
        a, b = _windows(context, window_size, interleaved)
        intra += a
        inter += b
    return {"head": heads, "context": contexts, "intra_window": intra, "inter_window": inter}


def _windows(context: list[int], window: int, interleaved: bool) -> tuple[list[list[int]], list[list[int]]]:
    """(intra-window groups, inter-window groups) of one context group (InternEvo's get_sliding_window_pg)."""
    count = len(context) // window
    if not interleaved:  # windows of consecutive ranks; the inter-window groups take one rank of each
        intra = [context[j * window:(j + 1) * window] for j in range(count)]
        return intra, [[context[t * window + j] for t in range(count)] for j in range(window)]
    even = [r for r in context if r % 2 == 0]  # interleaved: the even and the odd ranks each make windows
    odd = [r for r in context if r % 2 == 1]
    if len(even) != len(odd):
        raise ValueError(f"interleaved windows need as many even as odd ranks in the context group {context}")
    starts = [r for i in range(0, len(even), window) for r in (even[i], odd[i])]
    intra = [[start + 2 * i for i in range(window)] for start in starts]
    inter = [[r for j in range(len(even)) if j % window == i for r in (even[j], odd[j])] for i in range(window)]
    return intra, inter


@dataclass
class Shard:
    """One context rank's part of a packed row: ``tokens`` the row positions it holds, in its order; ``positions``
    each one's position within its document; ``segments`` (document, start, end) of each chunk it holds, end
    exclusive and in document positions, in the order of ``tokens``."""

    tokens: torch.Tensor
    positions: torch.Tensor
    segments: list[tuple[int, int, int]]


def chunk_bounds(length: int, pieces: int) -> list[int]:
    """The ``pieces + 1`` boundaries of ``length`` tokens cut into ``pieces`` chunks as equal as can be, the first
    ``length % pieces`` one longer (torch.tensor_split's rule)."""
    base, extra = divmod(length, pieces)
    bounds = [0]
    for i in range(pieces):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def zigzag_shards(cu_seqlens: list[int], context_size: int) -> list[Shard]:
    """Each context rank's ``Shard`` of the packed row whose documents end at ``cu_seqlens`` (the module
    docstring's head-tail split)."""
    pieces = 2 * context_size
    shards = []
    for rank in range(context_size):
        tokens, positions, segments = [], [], []
        for doc, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            bounds = chunk_bounds(end - start, pieces)
            for chunk in (rank, pieces - 1 - rank):
                lo, hi = bounds[chunk], bounds[chunk + 1]
                if hi > lo:
                    segments.append((doc, lo, hi))
                    tokens += range(start + lo, start + hi)
                    positions += range(lo, hi)
        shards.append(Shard(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                            segments))
    return shards
