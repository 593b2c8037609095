"""Tensor parallelism (``parallel.tensor.mode``): mtp, msp and fsp, on DTensor.

Parameters become DTensors on the tensor-parallel mesh (``parallelize_module`` with one
``TensorParallelStyle`` per entry of ``TP_PLAN`` / ``TP_LAYER_PLAN``, the one table of what is split how), so
FSDP2 composes with them (2-D parameters) and DCP saves them under their full names. The computation stays on
local tensors: each style swaps its module's class for a parallel subclass (``swap_class``: the module becomes a
``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``, ``ReplicatedWeightRMSNorm`` or
``VocabParallelLossOutputHead``) whose forward turns the local input into a DTensor, lets DTensor run the
matmul and its collectives, and hands the next module a local tensor again; the Triton kernels never see a
DTensor.

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
runs that call as mtp. The model decides at the start of each forward and the styles read the decision
(``evo.parallel.shards.SequenceShards``, ``model.sequence_shards``), so one model serves training, evaluation
and generation. Packed rows keep working: attention runs after the column-parallel gather, on every token of the row with local heads,
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
from evo.model.decoder import decoder_layers, head_is_tied
from evo.model.moe import MoEBlock
from evo.parallel.shards import SequenceShards



def distribute_parameter(module: nn.Module, name: str, mesh, placement) -> None:
    """``module.<name>`` (if it has one) as a DTensor parameter on the 1-D ``mesh`` with ``placement``."""
    p = getattr(module, name, None)
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


# ---------------------------------------------------------------------------------------------- the modules
# What tensor parallelism changes in a module is its class: ``swap_class`` makes the module an instance of a
# subclass of its own class and a parallel forward below (as FSDP2's fully_shard makes an ``FSDP<class>``), so
# ``type(module).__name__`` says what runs (``ColumnParallelLinear``, ``VocabParallelLossOutputHead``, ...). Each reads
# its mesh (``tp_mesh``) and the row's ``SequenceShards`` (``shards``) from attributes the style sets.
def swap_class(module: nn.Module, forward_cls: type) -> None:
    """Make ``module`` an instance of ``forward_cls`` + its own class (one class per pair, made once)."""
    base = type(module)
    key = (forward_cls, base)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{forward_cls.__name__}{base.__name__}", (forward_cls, base), {})
    module.__class__ = _SWAPPED[key]


_SWAPPED: dict[tuple[type, type], type] = {}  # made once per (forward, module class): a fixed set, never grows


def _replicated_input(x: torch.Tensor, mesh, shards: SequenceShards) -> DTensor:
    """A replicated DTensor of the whole input: gathered from sequence shards when they are."""
    if shards.sharded:
        return DTensor.from_local(x, mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()])
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)


def _reduced_output(out: DTensor, mesh, shards: SequenceShards) -> torch.Tensor:
    """A partial-sum output reduced: scattered over sequence shards, or all-reduced."""
    return out.redistribute(mesh, [Shard(0) if shards.sharded else Replicate()]).to_local()


class VocabParallel:
    """An embedding with the rows of its table split across ranks; its output reduced, onto this rank's sequence
    shard when the forward runs on them."""

    def forward(self, ids):
        out = F.embedding(DTensor.from_local(ids, self.tp_mesh, [Replicate()], run_check=False), self.weight)
        return _reduced_output(out, self.tp_mesh, self.shards)


class ColumnParallel:
    """A linear layer with its output features split: y_local = x W_local^T (+ b_local); x gathered first under
    sequence parallelism."""

    def _column(self, x):
        return F.linear(_replicated_input(x, self.tp_mesh, self.shards), self.weight, self.bias).to_local()

    def forward(self, x):
        shards = self.shards
        if shards.sharded and shards.regather_in_backward and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._column, x, use_reentrant=False)  # fsp: gather again
        return self._column(x)


class RowParallel:
    """A linear layer with its input features split: y = sum over ranks of x_local W_local^T, reduced (+ b once)."""

    def forward(self, x):
        out = F.linear(DTensor.from_local(x, self.tp_mesh, [Shard(-1)], run_check=False), self.weight, self.bias)
        return _reduced_output(out, self.tp_mesh, self.shards)


class ReplicatedWeight:
    """An RMSNorm with its weight replicated. Its gradient is a partial sum over the group when each rank saw
    part of the rows (sequence shards) or part of the heads (``per_head``: q/k norms), else complete."""

    def forward(self, x):
        partial = self.per_head or self.shards.sharded
        w = self.weight.to_local(grad_placements=[Partial() if partial else Replicate()])
        return kernels.rms_norm(x, w, self.eps)


class VocabParallelLoss:
    """The output head, rows (vocab) split: with labels the local weight goes to the vocab-parallel loss; without,
    logits are gathered whole (generation)."""

    def forward(self, h, labels=None, label_smoothing=0.0, return_accuracy=False):
        mesh, shards = self.tp_mesh, self.shards
        if labels is None:
            logits = F.linear(_replicated_input(h, mesh, shards), self.weight)
            return logits.redistribute(mesh, [Replicate()]).to_local()
        if shards.sharded:
            h = gather_rows(h, shards.group)
        return kernels.fused_linear_cross_entropy(h, self.weight.to_local(), labels, label_smoothing=label_smoothing,
                                                  reduction="none", return_accuracy=return_accuracy,
                                                  process_group=shards.group)


class ReplicatedExperts:
    """A MoE block (evo.model.moe.MoEBlock) with its router and routed experts replicated over the tensor group:
    experts whole on every rank. On sequence shards (msp, fsp) each rank routes its own tokens and the weights'
    gradients are partial sums over the group (the block takes its aux loss and GShard's places over the group);
    under mtp every rank routes every token and the gradients are complete. Its shared experts are split as a dense
    MLP is (their own entries of the plan). Routed experts already spread over an expert group (evo.parallel.expert,
    applied first) are not replicated here: their ``local`` is the expert-parallel block's."""

    def local(self, weight):
        if not isinstance(weight, DTensor) or weight.device_mesh.mesh_dim_names != ("tp",):
            return super().local(weight)
        return weight.to_local(grad_placements=[Partial() if self.shards.sharded else Replicate()])


class ReplicatedExpertsStyle(ParallelStyle):
    """The plan's "experts" entry: a MoE block's own weights (router, routed experts, shared-expert gate) become
    replicated DTensors on the tensor mesh, and the block a ``ReplicatedExperts``."""

    def __init__(self, shards: SequenceShards):
        super().__init__()
        self.shards = shards

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        for owner, name in ((module.gate, "weight"), (module.experts, "w1"), (module.experts, "w3"),
                            (module.experts, "w2"), (module.shared_expert_gate, "weight")):
            if owner is not None and not isinstance(getattr(owner, name), DTensor):  # not expert-parallel ones
                distribute_parameter(owner, name, mesh, Replicate())
        module.shards = self.shards
        swap_class(module, ReplicatedExperts)
        return module


# ---------------------------------------------------------------------------------------------- the plan
# How each module is split over the tensor group, by its path in the model (a decoder layer's below it): "rows" of
# its weight (a linear layer's output features, an embedding's vocabulary), "cols" (a linear layer's input
# features), or "replicated" (a norm). The one table that apply_tensor_parallel (the styles) and
# tensor_parallel_plan (memory estimates, by parameter) read.
TP_PLAN = {"tok_embeddings": "rows", "norm": "replicated", "output": "rows"}
TP_LAYER_PLAN = {"attention_norm": "replicated", "ffn_norm": "replicated",
                 "attention.wq": "rows", "attention.wk": "rows", "attention.wv": "rows", "attention.wo": "cols",
                 "attention.q_norm": "replicated", "attention.k_norm": "replicated",
                 "feed_forward.w1": "rows", "feed_forward.w3": "rows", "feed_forward.w2": "cols",
                 # a MoE layer's feed-forward: its router and experts whole on every rank, its shared experts split
                 "feed_forward": "experts", "feed_forward.shared_experts.w1": "rows",
                 "feed_forward.shared_experts.w3": "rows", "feed_forward.shared_experts.w2": "cols"}
_FORWARD = {"tok_embeddings": VocabParallel, "output": VocabParallelLoss}  # the rest by split
_BY_SPLIT = {"rows": ColumnParallel, "cols": RowParallel, "replicated": ReplicatedWeight}
# the placements of a module's weight and bias over the tensor mesh (a bias of a row-split layer is added once)
_PLACEMENTS = {"rows": (Shard(0), Shard(0)), "cols": (Shard(1), Replicate()), "replicated": (Replicate(), None)}


class TensorParallelStyle(ParallelStyle):
    """How ``parallelize_module`` applies one entry of the plan: distribute the module's parameters over the tensor
    mesh as its split says, set the attributes the parallel forward reads, and swap its class."""

    def __init__(self, path: str, split: str, shards: SequenceShards):
        super().__init__()
        self.split, self.shards = split, shards
        self.forward_cls = _FORWARD.get(path, _BY_SPLIT[split])
        self.per_head = path.endswith(("q_norm", "k_norm"))

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        weight, bias = _PLACEMENTS[self.split]
        distribute_parameter(module, "weight", mesh, weight)
        if bias is not None:
            distribute_parameter(module, "bias", mesh, bias)
        module.tp_mesh, module.shards, module.per_head = mesh, self.shards, self.per_head
        swap_class(module, self.forward_cls)
        return module


def apply_tensor_parallel(model: nn.Module, ctx) -> None:
    """Shard ``model`` (an ``evo.model.DecoderModel``, on any device, meta included) over ``ctx``'s tensor group in
    ``ctx.tp_mode``; the attention modules' head counts become the local ones."""
    mesh, tp, mode = ctx.tp_mesh, ctx.tp_size, ctx.tensor_mode
    shards = SequenceShards(tp, ctx.tp_rank, ctx.tp_group, enabled=mode.sequence_parallel,
                            regather_in_backward=mode.regathers_in_backward)
    tied = head_is_tied(model)
    plan = {path: TensorParallelStyle(path, split, shards) for path, split in TP_PLAN.items()
            if getattr(model, path) is not None}
    parallelize_module(model, mesh, plan)
    for layer in decoder_layers(model):
        plan = {path: ReplicatedExpertsStyle(shards) if split == "experts" else TensorParallelStyle(path, split, shards)
                for path, split in TP_LAYER_PLAN.items()
                if _has(layer, path) and (split == "experts") == isinstance(_module(layer, path), MoEBlock)}
        parallelize_module(layer, mesh, plan)
        layer.attention.num_heads //= tp
        layer.attention.num_kv_heads //= tp
    if tied:  # parallelize_module gave each its own DTensor
        model.tie_weights()
    model.sequence_shards = shards


def _module(module: nn.Module, path: str) -> nn.Module | None:
    """``module``'s submodule at ``path``, or None (q/k norms exist only with ``qk_norm``, w1 only in a dense MLP)."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _has(module: nn.Module, path: str) -> bool:
    return _module(module, path) is not None


def tensor_parallel_plan() -> dict[str, str]:
    """How each parameter is split across tensor-parallel ranks, by name suffix: 'rows' or 'cols' (the rest is
    replicated), from ``TP_PLAN`` and ``TP_LAYER_PLAN``, for memory estimates computed without building anything."""
    out = {}
    for path, split in {**TP_PLAN, **TP_LAYER_PLAN}.items():
        if split == "experts":  # replicated
            continue
        name = path.rsplit(".", 1)[-1]
        if split != "replicated":
            out[f"{name}.weight"] = split
        if split == "rows" and name not in TP_PLAN:  # a linear layer's bias follows its output features
            out[f"{name}.bias"] = split
    return out
