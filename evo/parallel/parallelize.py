"""The one place that turns a built model into a parallel one.

``parallelize(model, ctx, model_cfg)`` applies, in this order:
1. expert parallelism (``evo.parallel.expert``, when parallel.expert.size > 1), then tensor parallelism
   (``evo.parallel.tensor``, when tp > 1), or intern sequence parallelism (``evo.parallel.sequence``, tensor.mode
   isp), or isp's group split as head x context (``evo.parallel.sequence_2d``, parallel.sequence_2D);
2. activation checkpointing (``model.checkpoint``: the first layers recompute their forward in backward; with
   ``selective_checkpoint`` they keep attention's output and skip it in the recomputation, evo.model.selective),
   and ``cpu_offloading`` (the first layers' saved activations wait on the CPU);
3. ``torch.compile`` of each decoder layer (opt-in, ``model.compile=True``);
4. FSDP2 (``fully_shard``, in any world of more than one process): the fp32 weights are the masters,
   sharded over the zero group and replicated across zero groups (HSDP); compute runs in
   ``model.dtype`` (``MixedPrecisionPolicy``), gradients are reduced in fp32. Each layer's compute
   copy stays gathered from its forward to its backward (``reshard_after_forward=False``): the
   masters, gradients and optimizer state are sharded, the compute copy is whole at the end of a
   forward (docs/config.md compares this with InternEvo's ZeRO). Gradients are reduce-scattered after every micro-batch's backward (FSDP2's default), so no
   rank ever holds a full fp32 gradient; the cost is one reduce-scatter per micro-batch instead of one
   per step. evo's loss is already divided by the step's global label count, so the reduction sums
   (``set_gradient_divide_factor(1)``) instead of averaging again. With ``hybrid_zero_optimizer.cpu_offload`` the
   shards (masters, gradients, AdamW state) live on the CPU (``CPUOffloadPolicy``, pinned on a GPU).

``build_parallel_model(model_cfg, ctx, seed)`` builds on the meta device, parallelizes, then
materializes each rank's shards on its device and initializes them parameter by parameter
(``DecoderModel.init_weights``): no rank ever holds the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from evo.config import Config, ModelConfig, zero_size
from evo.model.decoder import decoder_layers
from evo.model.moe import moe_blocks
from evo.parallel.context import ParallelContext
from evo.parallel.shards import local_numel, tp_local_numel


@dataclass(frozen=True)
class MemoryOptions:
    """The config's memory savers that change how a model is built (top-level keys and
    ``hybrid_zero_optimizer.cpu_offload``)."""

    selective_checkpoint: bool = False  # checkpointed layers keep attention's (out, lse)
    selective_checkpoint_offload: bool = False  # ... on the CPU
    offloaded_layers: int = 0  # cpu_offloading: the first layers whose saved activations go to the CPU
    cpu_offload: bool = False  # fp32 masters, gradients and AdamW state on the CPU

    @classmethod
    def from_config(cls, cfg: Config) -> "MemoryOptions":
        return cls(cfg.selective_checkpoint, cfg.selective_checkpoint_offload,
                   cfg.cpu_offloading.num_layers if cfg.cpu_offloading.enable else 0,
                   cfg.hybrid_zero_optimizer.cpu_offload)

    def note(self) -> str:
        """What the memory report says beside its bytes (activations are not counted there)."""
        return (f"; cpu_offloading: the first {self.offloaded_layers} layers' saved activations wait on the CPU"
                if self.offloaded_layers else "")


def fsdp_parts(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps as roots: the model, or each stage of a pipeline rank's part."""
    return list(getattr(model, "stages", None) or [model])


def parallelize(model: nn.Module, ctx: ParallelContext, cfg: ModelConfig,
                memory: MemoryOptions = MemoryOptions()) -> nn.Module:
    """Apply TP, activation checkpointing (and ``memory``'s savers), compile and FSDP2 to ``model`` (an
    ``evo.model.DecoderModel``, or a pipeline rank's ``PipelineModel``, whose stages are each wrapped), in that
    order, in place; returns it. The trainer and model code never branch on the layout."""
    if ctx.ep_size > 1:  # first: tensor parallelism then leaves the spread experts alone
        from evo.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, ctx)
    if ctx.tp_size > 1 and ctx.tensor_mode.splits_matrices:
        from evo.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, ctx)
    elif ctx.tp_size > 1 and ctx.sequence_2d is not None:  # isp's group as head x context: rings on packed rows
        from evo.parallel.sequence_2d import apply_sequence_2d

        apply_sequence_2d(model, ctx, ctx.sequence_2d_layout())
    elif ctx.tp_size > 1:  # isp: the weights stay whole in compute; heads split around attention
        from evo.parallel.sequence import apply_intern_sequence_parallel

        apply_intern_sequence_parallel(model, ctx)
    if hasattr(model, "make_stages"):
        model.make_stages()
    for part in fsdp_parts(model):
        layers = decoder_layers(part)
        mark_checkpointed(layers, cfg.checkpoint)  # the first layers of each pipeline stage
        mark_memory_savers(part, memory)
        for layer in layers if cfg.compile else ():
            layer.compile()
        if ctx.distributed:
            apply_fsdp(part, ctx.fsdp_mesh, cfg, ctx.expert_fsdp_mesh,
                       offload_to=ctx.device if memory.cpu_offload else None)
    return model


def mark_checkpointed(layers: list[nn.Module], fraction) -> None:
    """Activation checkpointing (``model.checkpoint``): the first ``round(fraction * len(layers))`` layers recompute
    their forward in backward, the others keep their activations."""
    n_ckpt = round(float(fraction) * len(layers))
    for i, layer in enumerate(layers):
        layer.checkpointed = i < n_ckpt


def mark_memory_savers(model: nn.Module, memory: MemoryOptions) -> None:
    """Selective checkpointing on the checkpointed layers, and cpu_offloading on the layers whose index in the
    whole model (a pipeline stage's keys) is below ``memory.offloaded_layers``."""
    layers = model.layers
    indexed = [(int(i), layer) for i, layer in layers.items()] if isinstance(layers, nn.ModuleDict) else \
        list(enumerate(layers))
    for index, layer in indexed:
        layer.keeps_attention = layer.checkpointed and memory.selective_checkpoint
        layer.offloads_kept = layer.keeps_attention and memory.selective_checkpoint_offload
        layer.offloaded = index < memory.offloaded_layers


def apply_fsdp(model: nn.Module, mesh, cfg: ModelConfig, expert_mesh=None, offload_to=None) -> None:
    """FSDP2 over ``mesh`` (1-D: shard; 2-D: replicate x shard), each decoder layer and the root: fp32 shards as
    the masters, compute in ``cfg.dtype``, gradients reduced in fp32 and summed, not averaged. With expert
    parallelism each MoE block's experts (already spread over the expert group) are sharded over ``expert_mesh``,
    the expert-data group, first: the gradient of an expert is summed over the ranks that hold it. With
    ``offload_to`` (the compute device) the shards live on the CPU (``CPUOffloadPolicy``; pinned only for a GPU:
    pinning asks for an accelerator)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = cfg.torch_dtype
    # no casting of forward inputs: the activations are already in the compute dtype (the embedding runs in it),
    # and a cast would copy a KV cache passed in (its in-place updates then lost)
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    offload = OffloadPolicy() if offload_to is None else CPUOffloadPolicy(pin_memory=offload_to.type == "cuda")
    layers = decoder_layers(model)
    experts = [block.experts for block in moe_blocks(model)] if expert_mesh is not None else []
    for module in experts:
        fully_shard(module, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)
    for module in (*experts, *layers, model):  # each FSDP module's setting covers its own parameters only
        module.set_gradient_divide_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # plain SUM collectives: gloo has no PREMUL_SUM
            module.set_force_sum_reduction_for_comms(True)


def build_parallel_model(cfg: ModelConfig, ctx: ParallelContext, seed: int, for_training: bool = False,
                         memory: MemoryOptions = MemoryOptions()) -> nn.Module:
    """The model of this rank: built on meta, parallelized, then materialized and initialized shard by shard on
    ``ctx.device``. One process gets the model in ``cfg.dtype`` (its optimizer keeps fp32 masters; with
    ``for_training`` they start from the fp32 values the model was initialized with, ``model.initial_masters``,
    as FSDP2's do, rather than from their 16-bit rounding); under FSDP2
    the parameters are the fp32 master shards and compute runs in ``cfg.dtype``. With pipeline parallelism it is
    this rank's ``PipelineModel`` (``evo.parallel.pipeline``)."""
    from evo.model import DecoderModel

    with torch.device("meta"):
        model = DecoderModel(cfg)
    if ctx.pp_size > 1:
        from evo.parallel.pipeline import PipelineModel

        model = PipelineModel(model, ctx, ctx.pp_mode)
    parallelize(model, ctx, cfg, memory)
    home = torch.device("cpu") if memory.cpu_offload and ctx.distributed else ctx.device  # FSDP2's CPU shards
    for part in fsdp_parts(model):  # each FSDP2 root materializes its own parameters (and the rotary tables, which
        part.to_empty(device=home)  # follow the activations to their device)
    model.tie_weights()
    model.init_weights(seed)
    if hasattr(model, "make_tied_group"):
        model.make_tied_group()
    if not ctx.distributed:
        if for_training and cfg.torch_dtype != torch.float32:  # taken (and dropped) by MixedPrecisionOptimizer
            # the fp32 tensors themselves: .to() gives the parameters new 16-bit storage, leaving these alone
            model.initial_masters = {name: p.detach() for name, p in model.named_parameters()}
        model.to(cfg.torch_dtype)
    return model


def reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered parameters after forwards without backward (evaluation, generation): compute
    parameters stay gathered from forward to backward (``reshard_after_forward=False``), so a forward that has
    no backward would leave them gathered, and the sharded parameters out of ``model.parameters()``. A no-op
    without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for module in (*model.modules(), *fsdp_parts(model)):
        if isinstance(module, FSDPModule):
            module.reshard()


def memory_estimate(model: nn.Module, ctx: ParallelContext, cfg: ModelConfig, memory: MemoryOptions = MemoryOptions(),
                    tokens: int = 0) -> dict[str, int]:
    """Bytes this rank holds for the model's state: fp32 master weights, fp32 gradients, AdamW's two fp32 moments
    (all sharded as the parameters are), and the compute copy of the weights. Under FSDP2 that copy is gathered
    layer by layer in forward and kept until the layer's backward (``reshard_after_forward=False``), so at the end
    of a forward this rank holds every parameter (its tensor-parallel part) in ``model.dtype``, fp32 included. In
    one process it is the model itself in a 16-bit run, and nothing in an fp32 one (the parameters are the
    masters). Transient buffers (one process's 16-bit gradients before they reach the masters, collectives'
    staging) are not counted. ``memory``'s savers move parts to the CPU and add what selective checkpointing keeps
    for one micro-batch of ``tokens`` (``with_memory_savers``)."""
    params = list({id(p): p for p in model.parameters()}.values())
    local = sum(local_numel(p) for p in params)
    out = {"master_weights": 4 * local, "gradients": 4 * local, "optimizer_state": 8 * local}
    size = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    if ctx.distributed:
        out["compute_weights"] = size * sum(tp_local_numel(p) for p in params)
    elif size < 4 or memory.cpu_offload:  # the model itself, its masters apart
        out["compute_weights"] = size * local
    kept = sum(layer.keeps_attention for part in fsdp_parts(model) for layer in decoder_layers(part))
    return with_memory_savers(out, memory, cfg, ctx.tp_size, tokens, kept)


def with_memory_savers(out: dict, memory: MemoryOptions, cfg: ModelConfig, tp: int, tokens: int,
                       kept_layers: int) -> dict:
    """``out`` (master_weights, gradients, optimizer_state, compute_weights) with ``total`` the device's bytes:
    under cpu_offload the fp32 state moves to ``*_on_cpu`` keys (summed in ``on_cpu``); with selective checkpointing
    ``kept_attention`` (or ``kept_attention_on_cpu``): each of the ``kept_layers`` keeps one micro-batch's attention
    output (tokens x heads / tp x head_dim in the model's dtype) and log-sum-exp (fp32)."""
    out = dict(out)
    on_cpu = ("master_weights", "gradients", "optimizer_state") if memory.cpu_offload else ()
    for key in on_cpu:
        out[f"{key}_on_cpu"] = out.pop(key)
    if memory.selective_checkpoint and kept_layers and tokens:
        size = torch.tensor([], dtype=cfg.torch_dtype).element_size()
        kept = kept_layers * tokens * (cfg.num_attention_heads // tp) * (cfg.head_dim * size + 4)
        out["kept_attention_on_cpu" if memory.selective_checkpoint_offload else "kept_attention"] = kept
    out["total"] = sum(v for k, v in out.items() if not k.endswith("_on_cpu"))
    if any(k.endswith("_on_cpu") for k in out):
        out["on_cpu"] = sum(v for k, v in out.items() if k.endswith("_on_cpu"))
    return out


def _split(name: str, plan: dict) -> str | None:
    return next((how for suffix, how in plan.items() if name == suffix or name.endswith("." + suffix)), None)


def computed_memory(model_cfg, world: int = 1, tp: int = 1, zero1: int = 1, meta_model=None, ep: int = 1,
                    memory: MemoryOptions = MemoryOptions(), tokens: int = 0) -> dict:
    """Bytes the largest rank (rank 0) holds for the model state under a layout, computed without building or
    starting anything: shapes from the model on the meta device, the tensor split from ``tensor_parallel_plan()``
    (a split dimension chunked as torch.chunk does), then FSDP2's shard of dim 0 over the zero group (any world of
    more than one process). The keys and formulas of ``evo.parallel.memory_estimate``, whose
    ``compute_weights`` is the compute copy held from forward to backward: under FSDP2
    (``reshard_after_forward=False``) every parameter's tensor-parallel part gathered over the zero group in
    ``model.dtype``, fp32 included; in one process the 16-bit model (absent for an fp32 model, whose parameters
    are the masters). Added keys:

    - ``layer_weights``: the decoder layers' fp32 masters (what tensor parallelism splits, norms aside);
    - ``params``: the model's parameter count (unsharded).

    With expert groups of ``ep`` (zero then the whole data group) a routed expert tensor's fp32 state is sharded
    over the data ranks as any other's (E / ep experts over ep ranks, each over the expert-data group: numel /
    zero), and its compute copy is the E / ep experts of this rank's part of the group."""
    from evo.model import build_model
    from evo.parallel.tensor import tensor_parallel_plan

    model = meta_model if meta_model is not None else build_model(model_cfg, "meta")
    dp = world // tp
    zero = zero_size(zero1, dp)
    distributed = world > 1
    plan = tensor_parallel_plan() if tp > 1 else {}
    size = torch.tensor([], dtype=model_cfg.torch_dtype).element_size()
    local_total = tp_local_total = params = layers = 0
    seen = set()
    for name, p in model.named_parameters():  # tied parameters once
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = list(p.shape)
        params += p.numel()
        how = _split(name, plan)
        if how is not None:
            dim = 0 if how == "rows" else 1
            shape[dim] = math.ceil(shape[dim] / tp)
        tp_local = p.numel() // tp if how is not None else p.numel()  # as memory_estimate's tp_local_numel
        if ".experts.w" in name:
            tp_local //= ep
        if distributed:
            shape[0] = math.ceil(shape[0] / zero)
        local = math.prod(shape)
        local_total += local
        tp_local_total += tp_local
        if name.startswith("layers."):
            layers += local
    out = {"master_weights": 4 * local_total, "gradients": 4 * local_total, "optimizer_state": 8 * local_total}
    if distributed:
        out["compute_weights"] = size * tp_local_total
    elif size < 4 or memory.cpu_offload:
        out["compute_weights"] = size * local_total
    checkpointed = round(float(model_cfg.checkpoint) * model_cfg.num_layers)
    out = with_memory_savers(out, memory, model_cfg, tp, tokens, checkpointed)
    out["layer_weights"] = 4 * layers
    out["params"] = params
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
