"""Tensor parallelism (``parallel.tensor.mode``): mtp, msp and fsp, on DTensor.

Parameters become DTensors on the tensor-parallel mesh (``parallelize_module`` with the styles below),
so FSDP2 composes with them (2-D parameters) and DCP saves them under their full names. The
computation stays on local tensors: each style replaces its module's forward with one that turns the
local input into a DTensor, lets DTensor run the matmul and its collectives, and hands the next
module a local tensor again; the Triton kernels never see a DTensor.

- ``mtp`` (Megatron's tensor parallelism): column-parallel wq, wk, wv, w1, w3 (output features split,
  so heads and kv heads split across ranks); row-parallel wo, w2 (input features split, outputs
  all-reduced); a vocab-parallel embedding (rows of the table split, the lookup all-reduced); a
  column-parallel output head whose local weight goes straight into the vocab-parallel loss
  (``fused_linear_cross_entropy(..., process_group=tp_group)``): full logits are never formed.
- ``msp``: mtp plus sequence parallelism: the embedding output, norms and residuals live on
  sequence shards (tokens / tp each); column-parallel layers all-gather their input (backward:
  reduce-scatter), row-parallel ones reduce-scatter their output (backward: all-gather). A norm's
  weight gradient from a shard is a partial sum over the group (marked ``Partial``; FSDP2 sums it).
- ``fsp``: msp, but a column-parallel layer does not keep its gathered input for backward: it is
  gathered again there (``torch.utils.checkpoint`` over gather + matmul), trading one all-gather per
  layer for (tp - 1) / tp of those activations.

Sequence sharding applies to a forward whose token count divides by tp (training's packed rows
always do: validation checks ``seq_len * micro_bsz``); any other forward, e.g. a generation step,
runs that call as mtp. The embedding decides per call and the other styles read the decision
(``SequenceState``), so one model serves training, evaluation and generation. Packed rows keep
working: attention runs after the column-parallel gather, on every token of the row with local heads,
so ``cu_seqlens`` and positions are those of the full row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from evo import kernels
from evo.model.decoder import decoder_layers



class SequenceState:
    """Whether the activations of the forward in progress are sequence shards (decided by the embedding)."""

    def __init__(self, mode: str, tp: int):
        self.enabled = mode in ("msp", "fsp")
        self.recompute_gather = mode == "fsp"
        self.tp = tp
        self.sharded = False

    def decide(self, tokens: int, packed: bool) -> None:
        """A forward over a packed row of ``tokens`` tokens (or batched rows: ``packed`` False) runs sharded when
        sequence parallelism is on and the row splits evenly. The embedding decides; a pipeline stage without
        it decides from the row it receives."""
        self.sharded = self.enabled and packed and tokens % self.tp == 0


def _param(module: nn.Module, name: str, mesh, placement) -> None:
    p = getattr(module, name)
    if p is not None:
        module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, [placement], src_data_rank=None)))


# torch 2.13 renamed all_gather_into_tensor (deprecated there); older releases have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherRows(torch.autograd.Function):
    """All-gather row shards (rows / n, ...) -> (rows, ...); backward keeps this rank's rows of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = grad.shape[0] // dist.get_world_size(ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * n:(r + 1) * n], None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """The group's row shards (rows / n, ...) stacked in rank order (rows, ...). Backward keeps this rank's rows of
    the gradient and reduces nothing: for a gradient that is already whole on every rank (the vocab-parallel
    loss all-reduces its input gradient), or whose other rows belong to other ranks' terms (isp's per-token
    losses, each rank's own)."""
    return _GatherRows.apply(x, group)


class _Style(ParallelStyle):
    def __init__(self, state: SequenceState):
        super().__init__()
        self.state = state

    def _input(self, x: torch.Tensor, mesh) -> DTensor:
        """A replicated DTensor of the whole input: gathered from sequence shards when they are."""
        if self.state.sharded:
            return DTensor.from_local(x, mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()])
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

    def _output(self, out: DTensor, mesh) -> torch.Tensor:
        """A partial-sum output reduced: scattered over sequence shards, or all-reduced."""
        return out.redistribute(mesh, [Shard(0) if self.state.sharded else Replicate()]).to_local()


class VocabParallelEmbedding(_Style):
    """Rows of the table split across ranks; decides whether this forward runs on sequence shards."""

    def _apply(self, module, mesh):
        _param(module, "weight", mesh, Shard(0))
        state = self.state

        def forward(ids):
            out = F.embedding(DTensor.from_local(ids, mesh, [Replicate()], run_check=False), module.weight)
            state.decide(out.shape[0], packed=out.ndim == 2)
            return self._output(out, mesh)

        module.forward = forward
        return module


class ColwiseLinear(_Style):
    """Output features split: y_local = x W_local^T (+ b_local); x gathered first under sequence parallelism."""

    def _apply(self, module, mesh):
        _param(module, "weight", mesh, Shard(0))
        _param(module, "bias", mesh, Shard(0))
        state = self.state

        def run(x):
            return F.linear(self._input(x, mesh), module.weight, module.bias).to_local()

        def forward(x):
            if state.sharded and state.recompute_gather and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)  # fsp: gather again in backward
            return run(x)

        module.forward = forward
        return module


class RowwiseLinear(_Style):
    """Input features split: y = sum over ranks of x_local W_local^T, reduced (+ b once)."""

    def _apply(self, module, mesh):
        _param(module, "weight", mesh, Shard(1))
        _param(module, "bias", mesh, Replicate())

        def forward(x):
            out = F.linear(DTensor.from_local(x, mesh, [Shard(-1)], run_check=False), module.weight, module.bias)
            return self._output(out, mesh)

        module.forward = forward
        return module


class ReplicatedNorm(_Style):
    """An RMSNorm with its weight replicated. Its gradient is a partial sum over the group when each rank saw
    part of the rows (sequence shards) or part of the heads (``per_head``: q/k norms), else complete."""

    def __init__(self, state: SequenceState, per_head: bool = False):
        super().__init__(state)
        self.per_head = per_head

    def _apply(self, module, mesh):
        _param(module, "weight", mesh, Replicate())
        state, per_head = self.state, self.per_head

        def forward(x):
            partial = per_head or state.sharded
            w = module.weight.to_local(grad_placements=[Partial() if partial else Replicate()])
            return kernels.rms_norm(x, w, module.eps)

        module.forward = forward
        return module


class VocabParallelHead(_Style):
    """The output head, rows (vocab) split: with labels the local weight goes to the vocab-parallel loss; without,
    logits are gathered whole (generation)."""

    def __init__(self, state: SequenceState, group):
        super().__init__(state)
        self.group = group

    def _apply(self, module, mesh):
        _param(module, "weight", mesh, Shard(0))
        state, group = self.state, self.group

        def forward(h, labels=None, label_smoothing=0.0, return_accuracy=False):
            if labels is None:
                logits = F.linear(self._input(h, mesh), module.weight)
                return logits.redistribute(mesh, [Replicate()]).to_local()
            if state.sharded:
                h = gather_rows(h, group)
            return kernels.fused_linear_cross_entropy(h, module.weight.to_local(), labels, label_smoothing=label_smoothing,
                                                      reduction="none", return_accuracy=return_accuracy,
                                                      process_group=group)

        module.forward = forward
        return module


def apply_tensor_parallel(model: nn.Module, ctx) -> None:
    """Shard ``model`` (an ``evo.model.DecoderModel``, on any device, meta included) over ``ctx``'s tensor group in
    ``ctx.tp_mode``; the attention modules' head counts become the local ones."""
    mesh, tp = ctx.tp_mesh, ctx.tp_size
    state = SequenceState(ctx.tp_mode, tp)
    plan = {"tok_embeddings": VocabParallelEmbedding(state), "norm": ReplicatedNorm(state),
            "output": VocabParallelHead(state, ctx.tp_group)}
    layer_plan = {"attention_norm": ReplicatedNorm(state), "ffn_norm": ReplicatedNorm(state),
                  "attention.wq": ColwiseLinear(state), "attention.wk": ColwiseLinear(state),
                  "attention.wv": ColwiseLinear(state), "attention.wo": RowwiseLinear(state),
                  "feed_forward.w1": ColwiseLinear(state), "feed_forward.w3": ColwiseLinear(state),
                  "feed_forward.w2": RowwiseLinear(state)}
    tied = model.tok_embeddings is not None and model.output is not None and \
        model.output.weight is model.tok_embeddings.weight
    parallelize_module(model, mesh, {name: style for name, style in plan.items() if getattr(model, name) is not None})
    for layer in decoder_layers(model):
        plan = dict(layer_plan)
        if layer.attention.q_norm is not None:
            plan.update({"attention.q_norm": ReplicatedNorm(state, per_head=True),
                         "attention.k_norm": ReplicatedNorm(state, per_head=True)})
        parallelize_module(layer, mesh, plan)
        layer.attention.num_heads //= tp
        layer.attention.num_kv_heads //= tp
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.sequence_state = state


def tensor_parallel_plan() -> dict[str, str]:
    """How each parameter is split across tensor-parallel ranks, by name suffix: 'rows', 'cols' or 'replicated'
    (for memory estimates computed without building anything)."""
    return {"tok_embeddings.weight": "rows", "output.weight": "rows", "wq.weight": "rows", "wk.weight": "rows",
            "wv.weight": "rows", "w1.weight": "rows", "w3.weight": "rows", "wq.bias": "rows", "wk.bias": "rows",
            "wv.bias": "rows", "w1.bias": "rows", "w3.bias": "rows", "wo.weight": "cols", "w2.weight": "cols"}
