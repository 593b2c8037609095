"""Expert parallelism: the experts of a MoE layer spread over the ranks of an expert group, each token sent to the
rank of its expert and its output sent back.

Groups (InternEvo's ``Initializer_Expert_Data``, tensor ranks apart): the data ranks of one pipeline stage that hold
the same tensor rank are cut into runs of ``ep`` consecutive ones, the expert groups; the ranks at the same place of
each run form an expert-data group. With 8 ranks, tp 2 and ep 2, data groups [0, 2, 4, 6] and [1, 3, 5, 7] give the
expert groups [0, 2] [4, 6] [1, 3] [5, 7] and the expert-data groups [0, 4] [2, 6] [1, 5] [3, 7]. In the mesh
("pp", "dp_replicate", "zero", "tp") that is the data dimension unflattened into ("edp", "ep"), "ep" the faster.
Rank i of an expert group holds experts [i * E / ep, (i + 1) * E / ep): an expert is never split, and the tensor
ranks hold the same experts.

A layer's forward on one rank, T tokens each choosing k experts (``expert_parallel_experts``):
1. the T*k assignments are put in expert order (``evo.kernels.moe_routing``), which is also the order of their
   destination ranks, and this rank's counts per expert are exchanged (an all-to-all of E integers): each rank then
   knows how many rows it gets from each rank for each of its experts;
2. the split sizes are read on the host (the layer's one device-to-host sync: the all-to-all takes Python lists),
   and the token rows go out in one uneven all-to-all (``AllToAll``: its backward is the reverse exchange);
3. the received rows, ordered by source and then by expert, go through this rank's experts (``kernels.moe_experts``
   with one choice of weight 1 per row: it sorts them by local expert);
4. the outputs go back by the reverse all-to-all, land in the sender's expert order, and each token's k outputs
   are weighted and added, in fp32 for 16-bit inputs (as on one process).
A rank that receives no rows still takes part in every exchange. The gradient of an expert's weights on its rank
sums the rows every rank of its group sent it; FSDP2 then sums it over the expert-data group and, with tp > 1,
over the tensor ranks, each of which routed tokens of its own (its sequence shard under msp, fsp and isp; under
mtp, where the tensor ranks share their tokens, its 1 / tp piece of them: ``ExpertParallelBlock``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from evo import kernels
from evo.kernels.reference import SortTokens
from evo.model.moe import moe_blocks
from evo.parallel.tensor import distribute_parameter, gather_rows, swap_class


def expert_groups(world_size: int, pp: int, tp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert groups, expert-data groups) as lists of global ranks, for ``world_size`` ranks in ``pp`` stages of
    ``tp``-rank tensor groups (evo's rank order: tp fastest, then data, then pipeline) and expert groups of ``ep``
    data ranks (the module docstring)."""
    per_stage = world_size // pp
    dp = per_stage // tp
    if dp % ep:
        raise ValueError(f"expert groups of {ep} do not divide the {dp} data ranks")
    experts, expert_data = [], []
    for stage in range(pp):
        for t in range(tp):
            data = [stage * per_stage + t + d * tp for d in range(dp)]
            runs = [data[i:i + ep] for i in range(0, dp, ep)]
            experts += runs
            expert_data += [list(same_place) for same_place in zip(*runs)]
    return experts, expert_data


class AllToAll(torch.autograd.Function):
    """Rows of ``x`` to the ranks of ``group``: the first ``send[0]`` to rank 0, the next ``send[1]`` to rank 1, ...;
    returns the rows received, ``recv[j]`` from rank j, in rank order. Backward sends the gradients back the same
    way reversed (a hand-written Function: torch's functional all-to-all under activation checkpointing has leaked
    memory, pytorch/torchtitan#1467)."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """``counts`` (ep, E_local): this rank's rows for each rank's each expert -> (ep, E_local): the rows each rank
    sends to each of this rank's experts."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


def expert_parallel_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                            w3: torch.Tensor, w2: torch.Tensor, group) -> torch.Tensor:
    """``kernels.moe_experts(x, expert_ids, weights, ...)`` with this rank's experts w1, w3 (E_local, I, H) and w2
    (E_local, H, I), the rank's share of the E = E_local * ep experts of ``group`` (the module docstring's steps).
    Returns (T, H) in x's dtype."""
    ep, local = dist.get_world_size(group), w1.shape[0]
    tokens, k = expert_ids.shape
    counts, _, slots, order = kernels.moe_routing(expert_ids, local * ep)
    sent = counts.view(ep, local)
    received = exchange_counts(sent, group)
    splits = torch.stack([sent.sum(1), received.sum(1)]).tolist()  # the one device-to-host sync
    rows = AllToAll.apply(SortTokens.apply(x, order, slots, k), splits[0], splits[1], group)
    local_ids = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(received.reshape(-1).long())
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    y = kernels.moe_experts(rows, local_ids.unsqueeze(1), ones, w1, w3, w2)
    y = AllToAll.apply(y, splits[1], splits[0], group)[slots].view(tokens, k, x.shape[1])
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (y.to(wide) * weights.to(wide).unsqueeze(-1)).sum(1).to(x.dtype)


class _TakeMine(torch.autograd.Function):
    """Rows of ``x`` (the same on every rank of ``group``) cut in group-size pieces of ceil(T / n): this rank's
    piece. Backward gathers every rank's piece of the gradient (``_gather_pieces``), so each rank gets the whole
    gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.total = group, x.shape[0]
        return x[_piece(x.shape[0], group)]

    @staticmethod
    def backward(ctx, grad):
        return _gather_pieces(grad, ctx.total, ctx.group), None


def _piece(total: int, group) -> slice:
    per = -(-total // dist.get_world_size(group))
    start = min(total, dist.get_rank(group) * per)
    return slice(start, min(total, start + per))


def _gather_pieces(y: torch.Tensor, total: int, group) -> torch.Tensor:
    """Each rank's piece of ``_TakeMine`` -> all ``total`` rows, on every rank of ``group``: the pieces padded to
    ceil(T / n) rows and gathered (``gather_rows``, whose backward keeps this rank's rows of the gradient: every rank
    holds the same gradient, the tensor group computes alike)."""
    per = -(-total // dist.get_world_size(group))
    padded = torch.cat([y, y.new_zeros((per - y.shape[0], *y.shape[1:]))])
    out = gather_rows(padded, group)
    return out if out.shape[0] == total else out[:total].clone()  # not a view: FSDP2 hooks the experts' output


class ExpertParallelBlock:
    """A MoE block (evo.model.moe.MoEBlock) whose routed experts are spread over an expert group: its w1, w3, w2 are
    DTensors sharded over the experts on the "ep" mesh (so DCP reshards between expert sizes), the math uses this
    rank's part, and ``routed`` dispatches the tokens (``expert_parallel_experts``). Under mtp, where the tensor
    ranks hold the same tokens (``tensor_group``), each takes 1 / tp of them through the experts and the outputs
    are gathered back: no expert work is repeated."""

    expert_group = None
    tensor_group = None

    def local(self, weight):
        if isinstance(weight, DTensor) and weight.device_mesh.mesh_dim_names == ("ep",):
            return weight.to_local()
        return super().local(weight)

    def routed(self, x, ids, weights, w1, w3, w2):
        if self.tensor_group is None:
            return expert_parallel_experts(x, ids, weights, w1, w3, w2, self.expert_group)
        mine = _piece(x.shape[0], self.tensor_group)
        out = expert_parallel_experts(_TakeMine.apply(x, self.tensor_group), ids[mine],
                                      _TakeMine.apply(weights, self.tensor_group), w1, w3, w2, self.expert_group)
        return _gather_pieces(out, x.shape[0], self.tensor_group)


def apply_expert_parallel(model: nn.Module, ctx) -> None:
    """Spread every MoE block's experts over this rank's expert group (``ctx.ep_size`` ranks), in place; on a model
    built on the meta device, before tensor parallelism (which then replicates only the router) and FSDP2 (which
    shards each rank's experts over ``ctx.expert_fsdp_mesh``)."""
    mesh = ctx.expert_mesh["ep"]
    for block in moe_blocks(model):
        for name in ("w1", "w3", "w2"):
            distribute_parameter(block.experts, name, mesh, Shard(0))
        block.expert_group = ctx.ep_group
        if ctx.tp_size > 1 and not ctx.tensor_mode.sequence_parallel:  # mtp: the tensor ranks share the tokens
            block.tensor_group = ctx.tp_group
        swap_class(block, ExpertParallelBlock)
