"""The mixture-of-experts block: router, routed experts, shared experts, and the load-balancing loss.

A sparse layer's feed-forward is a ``MoEBlock`` in place of the dense ``FeedForward``; ``is_moe_layer`` says which
layers are sparse (Hugging Face's rule: not in ``mlp_only_layers`` and (i + 1) divisible by ``decoder_sparse_step``;
InternEvo makes every layer sparse, which is the default). For the tokens x (T, H) of one forward:

    logits = x W_gate^T                              (T, E), fp32 (the router's weight is read in fp32)
    scores = softmax(logits) or sigmoid(logits)      (``moe_layer_kwargs.scoring_func``)
    w, ids = top_k(scores)                           (T, k) each token's experts and their weights
    w = w / sum_j w_j                                (``normalize_expert_weights``, default True)
    w = w * routed_scaling_factor
    out_t = sum_j w_tj * E_{ids_tj}(x_t)  [+ shared(x_t), times sigmoid(x_t W_sg^T) with ``shared_expert_gate``]
with every expert a SwiGLU MLP, E_e(x) = W2_e (silu(W1_e x) * W3_e x). The routed experts are one kernel call,
``evo.kernels.moe_experts``: grouped GEMMs over the T*k assignments sorted by expert, each expert's rows through its
own W1, W3 and W2, weighted and summed over each token's k choices (on a GPU with the gather, SwiGLU and weighting
fused into the GEMMs: evo/kernels/moe.py). The expert weights are 3-D parameters, w1 and w3 (E, I, H) and w2
(E, H, I), each initialised as one whole tensor from (seed, name), so every layout starts from the same experts.

``moe_type`` "GShard" (InternEvo's, after DeepSpeed) gives each expert a capacity of
max(ceil(T / E * capacity_factor * k), min_capacity) assignments. Assignments claim places choice by choice (every
token's first choice, in token order, then every second choice, ...), those past capacity are dropped, and each
token's kept weights are renormalised to sum to 1 (a token with none kept adds nothing: its residual passes).
Evaluation uses ``eval_capacity_factor``; ``drop_tokens=False`` gives every expert room for every assignment.
"Dropless" (the default) drops nothing.

The load-balancing loss of one layer is what transformers' ``load_balancing_loss_func((logits,), E, k)`` gives for
that layer alone:
    aux = E * sum_e f_e * P_e,   f_e = (assignments to e) / T,   P_e = mean over tokens of softmax(logits)_e
(about k when the load is even). The model's is the mean over its MoE layers (transformers pools all layers into
one such sum, which ties pipeline stages together; for one layer the two agree). It reaches the router through
its own backward: ``AuxLossGrad`` passes the block's output through unchanged and gives the aux loss the gradient
``aux_grad_scale``, which the trainer sets to d(step objective)/d(this layer's aux) for the micro-batches to come:
moe_loss_coeff / (MoE layers x micro-batches x data ranks) x the loss scale. So the aux term is scaled like the
main loss whatever the schedule (accumulation, 1F1B, interleaved, ZBV), with no tracker outside the block.

Each training forward appends a ``RouterStats`` (aux, tokens per expert, dropped assignments) to ``records``, where
the trainer collects them after the step; a forward without autograd (evaluation) or the rerun of a checkpointed
layer's forward during backward records nothing.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from evo import kernels
from evo.kernels.reference import SumOverGroup
from evo.config import ModelConfig


MAX_RECORDS = 4096  # a block keeps at most this many forwards' stats (more micro-batches a step: raise it)


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    """Whether decoder layer ``index`` (from 0) has a MoE block rather than a dense MLP."""
    return cfg.num_experts > 1 and index not in cfg.mlp_only_layers and (index + 1) % cfg.decoder_sparse_step == 0


def moe_layer_count(cfg: ModelConfig) -> int:
    return sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the router's dtype: fp32 for 16-bit inputs, its own for fp32 and fp64 (fp64 makes an oracle)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def load_balancing_loss(logits: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, group=None):
    """(E * sum_e f_e * P_e, the counts (E,)) for one layer: ``logits`` (T, E) the router's, ``expert_ids`` (T, k)
    its choices (transformers' load_balancing_loss_func for one layer, whose choices are the top-k of the softmax).
    With ``group``, the ranks' tokens are parts of one forward's (sequence shards): the counts, probability sums
    and token counts are summed over it, so every rank gets the loss of the whole."""
    probs = torch.softmax(wide(logits), dim=-1)
    sums = torch.zeros(2 * num_experts + 1, dtype=probs.dtype, device=logits.device)  # [counts, P sums, tokens]
    sums = sums.index_add(0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), dtype=probs.dtype,
                                                                 device=logits.device))
    sums = sums + torch.cat([torch.zeros(num_experts, dtype=probs.dtype, device=logits.device), probs.sum(0),
                             torch.full((1,), float(logits.shape[0]), dtype=probs.dtype, device=logits.device)])
    if group is not None:
        sums = SumOverGroup.apply(sums, group)
    counts, prob_sums, tokens = sums[:num_experts], sums[num_experts:-1], sums[-1].clamp(min=1)
    return num_experts * torch.sum(counts / tokens * prob_sums / tokens), counts.detach()


@dataclass
class RouterStats:
    """One recorded forward of one MoE block: its aux loss, tokens per expert and assignments dropped (GShard)."""

    aux: torch.Tensor  # () fp32, detached
    counts: torch.Tensor  # (E,) assignments routed to each expert, before dropping
    dropped: torch.Tensor  # () assignments dropped for capacity
    assignments: torch.Tensor  # () T * k (over the ranks sharing the forward)


class AuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; in backward, the gradient ``scale`` for ``aux`` (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class Router(nn.Module):
    """The gate: ``weight`` (E, H), Hugging Face's ``mlp.gate.weight``; logits in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three 3-D weights (Linear layout, out x in per expert): w1, w3 (E, I, H), w2 (E, H, I).
    Its forward hands them to the block's ``routed`` (through ``local``): a call of the module, so that FSDP2, which
    wraps the experts apart under expert parallelism, gathers them before and reduces their gradients after."""

    def __init__(self, hidden: int, width: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, width, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, width, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, width))

    def forward(self, x, ids, weights, routed, local) -> torch.Tensor:
        return routed(x, ids, weights, local(self.w1), local(self.w3), local(self.w2))


def gshard_keep(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(T, k) bool: which assignments fit their expert's ``capacity`` when places go choice by choice, tokens in
    order within a choice (InternEvo's GShard gate)."""
    choice_major = expert_ids.t().contiguous()  # (k, T): every first choice, then every second choice, ...
    counts, offs, slots, _ = kernels.moe_routing(choice_major, num_experts)
    place = slots - (offs - counts).long()[choice_major.reshape(-1)]  # position within its expert
    return (place < capacity).view(choice_major.shape).t()


def gathered_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of ``x`` stacked in rank order (no gradient)."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


# torch 2.13 renamed all_gather_into_tensor (deprecated there); older releases have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class MoEBlock(nn.Module):
    """Router, routed experts and (optionally) shared experts: the module docstring's math.

    What a parallel layout changes, it changes through two declared attributes: ``shards`` (the model's
    ``SequenceShards``, set under tensor and sequence parallelism: while ``shards.sharded``, this rank's tokens are
    one part of the forward's, so the aux loss's sums and GShard's places are taken over the group), and ``local``
    (how a weight becomes the tensor the math uses; tensor parallelism's subclass turns its replicated DTensors into
    local tensors, evo.parallel.tensor); expert parallelism's subclass also replaces ``routed`` (evo.parallel.expert)."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None, layer: int = 0):
        super().__init__()
        kw = cfg.moe_layer_kwargs
        self.layer = layer  # the decoder layer it belongs to (for its metrics)
        self.moe_layers = moe_layer_count(cfg)  # the model's MoE layers: its aux loss is their mean
        self.num_experts, self.top_k, self.moe_type = cfg.num_experts, cfg.top_k, cfg.moe_type
        self.scoring = kw.get("scoring_func", "softmax")
        self.normalize = kw.get("normalize_expert_weights", True)
        self.scaling = float(kw.get("routed_scaling_factor", 1.0))
        self.capacity_factor = kw.get("capacity_factor") if kw.get("capacity_factor") is not None else 1.0
        self.eval_capacity_factor = float(kw.get("eval_capacity_factor", 1.0))
        self.drop_tokens = kw.get("drop_tokens", True)
        self.min_capacity = int(kw.get("min_capacity", 4))
        self.gate = Router(cfg.hidden_size, cfg.num_experts)
        self.experts = GroupedExperts(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        self.shared_experts = shared
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        self.shards = None  # evo.parallel.shards.SequenceShards under tensor or sequence parallelism
        self.aux_grad_scale = 0.0  # set by the trainer: d(objective)/d(aux) per micro-batch
        # the training forwards since the trainer last took them (router_stats); bounded, for loops of one's own
        self.records: collections.deque[RouterStats] = collections.deque(maxlen=MAX_RECORDS)

    def local(self, weight: torch.Tensor) -> torch.Tensor:
        """The tensor the math uses for one of the block's weights: itself here."""
        return weight

    def routed(self, x, ids, weights, w1, w3, w2) -> torch.Tensor:
        """The routed experts' output (T, H): every expert here (expert parallelism's subclass spreads them over an
        expert group, evo.parallel.expert)."""
        return kernels.moe_experts(x, ids, weights, w1, w3, w2)

    def group(self):
        """The group whose ranks share this forward's tokens (each holding a sequence shard), or None."""
        return self.shards.group if self.shards is not None and self.shards.sharded else None

    def route(self, x: torch.Tensor):
        """(logits (T, E) fp32, weights (T, k) fp32, expert ids (T, k), assignments dropped in the whole forward)."""
        xw = wide(x)
        logits = F.linear(xw, self.local(self.gate.weight).to(xw.dtype))
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if self.moe_type == "GShard":
            keep, dropped = self.gshard(ids)
            weights = weights * keep
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
        elif self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights * self.scaling, ids, dropped

    def gshard(self, ids: torch.Tensor):
        """GShard's kept assignments of this rank's tokens, and the number dropped in the whole forward: places are
        taken over the forward's tokens in order (gathered from the group when this rank holds a shard)."""
        group = self.group()
        every = ids if group is None else self.shards.in_row_order(gathered_rows(ids, group))
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = max(math.ceil(every.shape[0] / self.num_experts * factor * self.top_k), self.min_capacity)
        if not self.drop_tokens:  # InternEvo's drop_tokens=False: room for every assignment
            capacity = every.numel()
        keep = gshard_keep(every, self.num_experts, capacity)
        mine = keep if group is None else keep[self.shards.mine(every.shape[0])]
        return mine, (~keep).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, stats = self.forward_with_stats(x)
        if stats is not None:
            self.record(*stats)
        return out

    def forward_with_stats(self, x: torch.Tensor):
        """(the block's output, its stats for ``record``: (aux, counts, dropped, assignments) tensors, or None
        without autograd). A decoder layer calls this inside its checkpointed function and records outside it, so a
        recompute records nothing and torch.compile traces the whole function (a side effect would break it)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids, dropped = self.route(x)
        out = self.experts(x, ids, weights, self.routed, self.local)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.local(self.shared_expert_gate.weight))) * shared
            out = out + shared
        if not torch.is_grad_enabled():  # evaluation: no aux loss, nothing recorded
            return out.view(shape), None
        group = self.group()  # training (a checkpointed layer's recompute too: it must save what forward did)
        aux, counts = load_balancing_loss(logits, ids, self.num_experts, group)
        assignments = torch.full((), ids.numel() * (dist.get_world_size(group) if group is not None else 1),
                                 dtype=torch.int64, device=x.device)
        out = AuxLossGrad.apply(out, aux, self.aux_grad_scale)
        return out.view(shape), (aux.detach(), counts, dropped, assignments)

    @torch.compiler.disable
    def record(self, aux, counts, dropped, assignments) -> None:
        """Keep a training forward's stats, unless this is a recompute during backward (of a block checkpointed on
        its own; a decoder layer records outside its checkpoint). Not traced by torch.compile: a side effect."""
        if torch._C._current_graph_task_id() == -1:
            self.records.append(RouterStats(aux, counts, dropped, assignments))


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks of ``model`` (a whole model or a pipeline rank's part), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def set_aux_grad_scale(blocks: list[MoEBlock], per_forward: float) -> None:
    """Each block's aux-loss gradient for the step's forwards: the objective adds ``per_forward`` (moe_loss_coeff x
    the loss scale / the step's micro-batches on every data rank) x the mean aux loss over the MoE layers."""
    for block in blocks:
        block.aux_grad_scale = per_forward / block.moe_layers


def router_stats(blocks: list[MoEBlock], num_layers: int, forwards: int, num_experts: int) -> torch.Tensor:
    """The step's records of ``blocks``, summed per layer, and cleared: (num_layers, E + 3) float64 on the CPU, a
    row per decoder layer (zeros for layers without a block here) holding the tokens routed to each expert, the
    summed aux losses, the assignments dropped and the assignments. The step's are each block's last ``forwards``
    records (one per micro-batch): a forward recorded before them in the same step is not one of its micro-batches
    (torch's pipeline stages run one on dummy inputs to learn shapes, on their first step). Rows of several ranks
    add up: every rank's has the same shape, a pipeline rank without MoE layers too."""
    out = torch.zeros(num_layers, num_experts + 3, dtype=torch.float64)
    rows, layers = [], []
    for block in blocks:
        r = list(block.records)[-forwards:]
        if r:
            rows.append(torch.cat([torch.stack([x.counts for x in r]).sum(0).double(),
                                   torch.stack([x.aux for x in r]).sum().double().reshape(1),
                                   torch.stack([x.dropped for x in r]).sum().double().reshape(1),
                                   torch.stack([x.assignments for x in r]).sum().double().reshape(1)]))
            layers.append(block.layer)
        block.records.clear()
    if rows:
        out[layers] = torch.stack(rows).cpu()  # one copy from the device
    return out


def router_metrics(stats: torch.Tensor, coeff: float, forwards: int, gshard: bool) -> dict:
    """The step's MoE metrics from ``router_stats`` summed over the ranks: ``moe_loss`` (coeff x the mean over the
    MoE layers and the step's ``forwards``, its micro-batches on every data rank, of the aux loss, the term added
    to the objective) and per MoE layer i ``moe/load/i``, the busiest expert's tokens over the mean, and under
    GShard ``moe/dropped/i``, the fraction of assignments dropped."""
    experts = stats.shape[1] - 3
    layers = [i for i in range(stats.shape[0]) if stats[i, experts + 2] > 0]
    if not layers:
        return {}
    record = {"moe_loss": coeff * float(stats[layers, experts].sum()) / (len(layers) * forwards)}
    for i in layers:
        counts = stats[i, :experts]
        record[f"moe/load/{i}"] = float(counts.max() / counts.mean().clamp(min=1e-12))
        if gshard:
            record[f"moe/dropped/{i}"] = float(stats[i, experts + 1] / stats[i, experts + 2])
    return record
