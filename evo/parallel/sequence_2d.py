"""InternEvo's 2D sequence parallelism (LoongTrain, arXiv 2406.18485) on packed rows.

A sequence group of ``head_size * context_size`` ranks (isp's tensor group, ``parallel.sequence_2D``) is split two
ways. A head group of ``head_size`` ranks runs Ulysses' all-to-all (evo.parallel.sequence: each then holds
heads / head_size heads of its group's tokens); a context group of ``context_size`` ranks holds a part of every
document of the row and passes key/value blocks around a ring (evo.parallel.context_attention: the split of a
packed row, the ring and the double ring, the all-gather variant).

- ``sequence_2d_groups``: the ranks of each head, context, intra-window and inter-window group of one sequence
  group, placed as InternEvo's ``Initializer_2D_SEQUENCE_PARALLEL`` places them (``head_first``: head groups are
  runs of consecutive ranks and context groups strided, else the reverse; ``interleaved`` windows take every other
  rank of the context group, even and odd ranks apart, and are turned off, as InternEvo does, when the window is 8
  or more ranks or the whole context group);
- ``ContextShards``: which tokens of a packed row each rank holds (its context rank's zigzag share, cut into
  head_size contiguous pieces, one per rank of the head group), the row's attention plan and rotary segments;
- ``apply_sequence_2d`` wires it into a model: ``ContextShards`` (the model's ``sequence_shards``), the embedding
  keeping this rank's tokens, ``ContextParallelAttention`` (a class swap of each layer's attention), MoE blocks
  routing over the whole row, and isp's output head, whose per-token losses are put back in the row's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evo.model.decoder import decoder_layers
from evo.model.moe import moe_blocks
from evo.parallel.context_attention import ContextGroup, context_attention, context_plan, zigzag_shards
from evo.parallel.sequence import SequenceParallelLoss, head_to_seq, seq_to_head
from evo.parallel.shards import SequenceShards
from evo.parallel.tensor import swap_class


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


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class SequenceGroup2D:
    """One rank's place in a sequence group split as head x context: the head group (its process group, size and
    this rank's index) and the ``ContextGroup``; ``head_first``: where a tensor-group rank r sits (head index
    r % head_size when head groups are runs, else r // context_size)."""

    head_size: int
    head_index: int
    head_group: object
    context: ContextGroup
    head_first: bool = True
    all_gather: bool = False

    def place(self, tp_rank: int) -> tuple[int, int]:
        """(context index, head index) of tensor-group rank ``tp_rank``."""
        return place_2d(tp_rank, self.head_size, self.context.size, self.head_first)


def place_2d(tp_rank: int, head_size: int, context_size: int, head_first: bool) -> tuple[int, int]:
    """(context index, head index) of tensor-group rank ``tp_rank``: head groups are runs of ``head_size`` ranks
    (``head_first``), else context groups are runs of ``context_size``."""
    return (tp_rank // head_size, tp_rank % head_size) if head_first else (tp_rank % context_size,
                                                                           tp_rank // context_size)


class ContextShards(SequenceShards):
    """isp's ``SequenceShards`` for 2D: a packed row's tokens spread over its documents (``zigzag_shards``, then
    head_size contiguous pieces of a context rank's share). ``decide`` makes the row's plan: ``index`` (this rank's
    row positions), ``plan`` (its context attention), the rotary segments of its context shard, and the order the
    group's ranks hold the row in (``in_row_order``)."""

    def __init__(self, size: int, rank: int, group, layout: SequenceGroup2D, left: int = -1):
        super().__init__(size, rank, group)
        self.layout, self.left = layout, left
        self.index = self.plan = self.rotary = self._inverse = None

    def decide(self, tokens: int, packed: bool, cu_seqlens: torch.Tensor | None = None) -> None:
        super().decide(tokens, packed)
        self.sharded = self.sharded and cu_seqlens is not None
        if not self.sharded:
            return
        layout, device = self.layout, cu_seqlens.device
        bounds = [int(b) for b in cu_seqlens.tolist()]
        shards = zigzag_shards(bounds, layout.context.size)
        piece = tokens // self.size
        held = []  # each tensor-group rank's row positions, in rank order
        for r in range(self.size):
            c, h = layout.place(r)
            held.append(shards[c].tokens[h * piece:(h + 1) * piece])
        self.index = held[self.rank].to(device)
        self._inverse = torch.argsort(torch.cat(held)).to(device)
        mine = shards[layout.context.index]
        lengths = [hi - lo for _, lo, hi in mine.segments]
        self.rotary = (torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device),
                       max(lengths), torch.tensor([lo for _, lo, _ in mine.segments], dtype=torch.int32).to(device),
                       max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
        self.plan = context_plan(shards, layout.context, bounds, layout.all_gather, self.left, device)

    def mine(self, n: int) -> torch.Tensor:
        return self.index

    def in_row_order(self, gathered: torch.Tensor) -> torch.Tensor:
        return gathered.index_select(0, self._inverse)


class ContextParallelAttention:
    """A decoder layer's attention under 2D sequence parallelism (swapped in by ``apply_sequence_2d``): on a sharded
    row, q, k, v of this rank's tokens go to the head group's context shard with heads / head_size heads (Ulysses),
    are rotated at their documents' positions, attend across the context group (``context_attention``) and come
    back; any other forward runs the layer's own attention."""

    def forward(self, x, cu_seqlens=None, max_seqlen=None, cache=None, layer: int = 0):
        shards = self.shards
        if cache is not None or not shards.sharded:
            return super().forward(x, cu_seqlens, max_seqlen, cache, layer)
        heads = shards.layout.head_group if shards.layout.head_size > 1 else None
        q, k, v = self._qkv(x)
        if heads is not None:
            q, k, v = (seq_to_head(t, heads) for t in (q, k, v))
        seg_cu, seg_max, offsets, longest = shards.rotary
        q, k = (self.rotary(t, seg_cu, seg_max, seqlen_offsets=offsets, max_position=longest) for t in (q, k))
        out = context_attention(q, k, v, shards.plan, window_size=self.window, kept=self.kept)
        if heads is not None:
            out = head_to_seq(out, heads)
        return self.wo(out.reshape(out.shape[0], -1))


def apply_sequence_2d(model, ctx, layout: SequenceGroup2D) -> None:
    """2D sequence parallelism over ``ctx``'s tensor group for an ``evo.model.DecoderModel`` (or a pipeline rank's
    part): a ``ContextShards`` shared by every module, the embedding keeping this rank's tokens (a forward hook),
    each attention swapped for ``ContextParallelAttention``, MoE blocks routing over the whole row, and isp's output
    head (its per-token losses back in the row's order). Weights stay whole in compute (isp's weight groups)."""
    left = model.cfg.attention_window[0]
    shards = ContextShards(ctx.tp_size, ctx.tp_rank, ctx.tp_group, layout, left)

    def embedded(module, inputs, out):
        return out.index_select(0, shards.index) if shards.sharded else out

    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(embedded)
    for layer in decoder_layers(model):
        layer.attention.shards = shards
        swap_class(layer.attention, ContextParallelAttention)
    for block in moe_blocks(model):
        block.shards = shards
    if model.output is not None:
        model.output.shards = shards
        swap_class(model.output, SequenceParallelLoss)
    model.sequence_shards = shards
