"""Intern sequence parallelism's attention exchange (Ulysses): sequence shards <-> head shards.

Under isp each rank of a sequence group of s ranks holds tokens / s of the packed row for the whole
layer. Attention needs every token of a document, so around it the group swaps what it splits:

    seq_to_head: (tokens / s, heads, d) on each rank -> (tokens, heads / s, d)
    head_to_seq: (tokens, heads / s, d)               -> (tokens / s, heads, d)

Each is one ``all_to_all_single``: rank r sends its slice of head group j to rank j and receives rank
j's tokens of head group r; the received blocks, in rank order, are the whole row's tokens. Attention
then runs on the full row with ``cu_seqlens`` and rotary positions of the full row, on heads / s heads
(query and key/value heads must both divide by s). Each exchange is the other's backward. The model
wiring (isp in ``parallel.tensor.mode``, weight parallelism) is not done yet: these are its tested
building blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_to_all_single = dist.all_to_all_single


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 of a contiguous tensor whose dim 0 is the group size."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x (empty_like of a transposed view would keep its strides)
    _all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    s = dist.get_world_size(group)
    t, h, d = x.shape
    if h % s:
        raise ValueError(f"{h} heads do not split over a sequence group of {s}")
    blocks = x.reshape(t, s, h // s, d).transpose(0, 1)  # (s: head group, t, h / s, d)
    return _exchange(blocks, group).reshape(s * t, h // s, d)  # received in rank order: the whole row


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    s = dist.get_world_size(group)
    tokens, h, d = x.shape
    blocks = x.reshape(s, tokens // s, h, d)  # (s: sequence shard, t, h / s, d)
    return _exchange(blocks, group).transpose(0, 1).reshape(tokens // s, s * h, d)  # head groups in rank order


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group), None


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """(tokens / s, heads, d) sequence shard -> (tokens, heads / s, d): every token, this rank's head group.
    Differentiable (backward: head_to_seq). Tokens must split evenly over the group."""
    return _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(tokens, heads / s, d) -> (tokens / s, heads, d): this rank's sequence shard, every head. Differentiable."""
    return _HeadToSeq.apply(x, group)
