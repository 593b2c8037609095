"""Intern sequence parallelism's attention exchange (Ulysses): sequence shards <-> head shards.

Under isp each rank of a sequence group of s ranks holds tokens / s of the packed row for the whole
layer. Attention needs every token of a document, so around it the group swaps what it splits:

    seq_to_head: (tokens / s, heads, d) on each rank -> (tokens, heads / s, d)
    head_to_seq: (tokens, heads / s, d)               -> (tokens / s, heads, d)

Each is one ``all_to_all_single``: rank r sends its slice of head group j to rank j and receives rank
j's tokens of head group r; the received blocks, in rank order, are the whole row's tokens. Attention
then runs on the full row with ``cu_seqlens`` and rotary positions of the full row, on heads / s heads
(query and key/value heads must both divide by s). Each exchange is the other's backward.

``apply_intern_sequence_parallel`` wires it into a model with forward hooks and one class swap, sharing one
``SequenceShards`` (``model.sequence_shards``): the embedding's output keeps this rank's tokens / s of a packed
row (when they divide; any other forward, e.g. generation, runs whole on every rank), q/k/v projections hand
their output through seq_to_head, the attention output projection takes its input through head_to_seq, and the
output head (``SequenceParallelLoss``) computes the loss of this rank's tokens and gathers the per-token losses
of the row. A MoE block routes this rank's tokens with its experts whole, and shares the ``SequenceShards`` so
that its load-balancing loss and GShard's capacity are those of the whole row (evo.model.moe). The weights are whole on every rank of a sequence group
(each sees other tokens: FSDP2 sums their gradients over every rank of the stage, and shards them over
the weight group, ``parallel.weight.size``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from evo import kernels
from evo.model.decoder import decoder_layers
from evo.model.moe import moe_blocks
from evo.parallel.shards import SequenceShards
from evo.parallel.tensor import gather_rows, swap_class

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


class _Swap(torch.autograd.Function):
    """One exchange forward (``to_heads``: seq_to_head, else head_to_seq), the other one backward."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_head if to_heads else _head_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_head_to_seq if ctx.to_heads else _seq_to_head)(grad, ctx.group), None, None


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """(tokens / s, heads, d) sequence shard -> (tokens, heads / s, d): every token, this rank's head group.
    Differentiable (backward: head_to_seq). Tokens must split evenly over the group."""
    return _Swap.apply(x, group, True)


def head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(tokens, heads / s, d) -> (tokens / s, heads, d): this rank's sequence shard, every head. Differentiable."""
    return _Swap.apply(x, group, False)


class SequenceParallelLoss:
    """isp's output head (swapped in by ``apply_intern_sequence_parallel``, ``evo.parallel.tensor.swap_class``): on
    sequence shards, the loss of this rank's tokens, with the per-token losses of the whole row gathered; any
    other forward runs the head's own."""

    def forward(self, h, labels=None, label_smoothing=0.0, return_accuracy=False):
        shards = self.shards
        if not shards.sharded:
            return super().forward(h, labels, label_smoothing, return_accuracy)
        if labels is None:  # logits of the whole row (a forward without labels: evaluation by logits, generation)
            return shards.in_row_order(gather_rows(super().forward(h), shards.group))
        out = kernels.fused_linear_cross_entropy(h, self.weight, labels[shards.mine(labels.shape[0])],
                                                 label_smoothing=label_smoothing, reduction="none",
                                                 return_accuracy=return_accuracy)
        loss, correct = out if return_accuracy else (out, None)
        loss = shards.in_row_order(gather_rows(loss, shards.group))  # the row's per-token losses, each rank's own
        # differentiable
        if not return_accuracy:
            return loss
        correct = correct.clone()
        dist.all_reduce(correct, group=shards.group)
        return loss, correct


def apply_intern_sequence_parallel(model, ctx) -> None:
    """isp over ``ctx``'s tensor group (the sequence group) for an ``evo.model.DecoderModel``: forward hooks on
    the embedding (keep this rank's tokens) and around attention (the exchanges), and the output head's class
    swapped for ``SequenceParallelLoss``."""
    shards = SequenceShards(ctx.tp_size, ctx.tp_rank, ctx.tp_group)

    def embedded(module, inputs, out):
        return out[shards.mine(out.shape[0])] if shards.sharded else out

    def heads_out(module, inputs, out):  # (tokens / s, heads * d) -> (tokens, heads / s * d)
        if not shards.sharded:
            return out
        d = module.head_dim
        return seq_to_head(out.view(out.shape[0], -1, d), shards.group).flatten(1)

    def heads_in(module, inputs):  # (tokens, heads / s * d) -> (tokens / s, heads * d)
        if not shards.sharded:
            return inputs
        (x,) = inputs
        return (head_to_seq(x.view(x.shape[0], -1, module.head_dim), shards.group).flatten(1),)

    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(embedded)
    for layer in decoder_layers(model):
        attention = layer.attention
        for proj in (attention.wq, attention.wk, attention.wv):
            proj.head_dim = attention.head_dim
            proj.register_forward_hook(heads_out)
        attention.wo.head_dim = attention.head_dim
        attention.wo.register_forward_pre_hook(heads_in)
    for block in moe_blocks(model):  # its aux loss and GShard's places are taken over the row's tokens
        block.shards = shards
    if model.output is not None:
        model.output.shards = shards
        swap_class(model.output, SequenceParallelLoss)
    model.sequence_shards = shards
