"""The parallel layout's rules, checked with the config before any process group exists: the tensor modes (one
table, ``TENSOR_MODE``, that the code asks), the pipeline modes, the zero and weight group sizes, and what a model
and a world size must satisfy to be split by them (``check_tensor_parallel``, ``check_pipeline``,
``layout_error``: the reason it cannot, or None). evo/config/checks.py asks them with the config,
evo.parallel.context at launch; evo/parallel runs the layouts they allow."""

from __future__ import annotations

from dataclasses import dataclass

from evo.errors import ConfigError


@dataclass(frozen=True)
class TensorMode:
    """What one ``parallel.tensor.mode`` shards and gathers over the tensor group (of ``parallel.tensor.size``)."""

    name: str
    splits_matrices: bool  # Megatron's column/row split of every linear weight and the vocabulary (evo.parallel.tensor)
    sequence_parallel: bool  # norms and residuals run on sequence shards of the tensor group (msp, fsp, isp)
    regathers_in_backward: bool  # fsp: the gathered sequence is gathered again in backward instead of kept
    weight_parallel: bool  # isp: weights sharded over weight groups, gathered for use (evo.parallel.sequence); ZeRO
    # is the weight group's
    splits: tuple[str, ...]  # the ModelConfig sizes the tensor size must divide


_HEADS = ("num_attention_heads", "kv_heads")
TENSOR_MODE = {m.name: m for m in (
    TensorMode("mtp", True, False, False, False, _HEADS + ("vocab_size", "intermediate_size")),
    TensorMode("msp", True, True, False, False, _HEADS + ("vocab_size", "intermediate_size")),
    TensorMode("fsp", True, True, True, False, _HEADS + ("vocab_size", "intermediate_size")),
    # intern sequence parallelism: Ulysses all-to-alls around attention (heads split), weights whole in compute
    TensorMode("isp", False, True, False, True, _HEADS),
)}
TENSOR_MODES = tuple(TENSOR_MODE)  # InternEvo's: megatron, + sequence parallel, + full sequence, intern


@dataclass(frozen=True)
class PipelineMode:
    """What one ``parallel.pipeline.mode`` runs (evo.parallel.pipeline, on torch.distributed.pipelining)."""

    name: str
    chunks: int | None  # the chunks a rank must hold (``model.num_chunks``), or None: any
    v_shape: bool  # chunk 1 runs down the ranks in reverse: rank 0 holds the first and the last stage
    zero_bubble: bool  # weight gradients apart from input gradients: a compiled layer cannot be split so
    schedule: str  # torch's schedule class (one chunk under 1F1B: Schedule1F1B)


PIPELINE_MODE = {m.name: m for m in (
    PipelineMode("1F1B", None, False, False, "ScheduleInterleaved1F1B"),
    PipelineMode("ZBH1", None, False, True, "ScheduleInterleavedZeroBubble"),
    PipelineMode("ZBV", 2, True, True, "ScheduleZBVZeroBubble"),
)}
PIPELINE_MODES = tuple(PIPELINE_MODE)
_WORDS = {2: "two"}


def check_tensor_parallel(cfg, tp: int, mode: str = "mtp", head_size: int | None = None) -> str | None:
    """Why a model config cannot be split over ``tp`` ranks in ``mode``, or None (isp splits only the heads; under
    sequence_2D only its ``head_size`` ranks split them)."""
    for attr in TENSOR_MODE[mode].splits:
        value, size = getattr(cfg, attr), tp if head_size is None else head_size
        if value % size:
            key = "num_kv_attention_heads" if attr == "kv_heads" else attr
            by = "'parallel.tensor.size'" if head_size is None else "'parallel.sequence_2D.head_size'"
            return f"{by} ({size}) must divide 'model.{key}' ({value})"
    return None


KV_EXCHANGES = ("ring", "all_gather")  # how a context group shares keys and values (evo.parallel.sequence_2d)


def sequence_2d_error(parallel, model_cfg, packed_length: int) -> str | None:
    """Why ``parallel.sequence_2D`` (enabled) cannot run, or None: InternEvo's rules (isp, head x context = tensor
    size, windows dividing the context group, no interleaving of head-first placements with head groups), evo's
    key exchange and a row long enough to give every rank of the sequence group two tokens (a document filling it
    gives each context rank a head and a tail chunk)."""
    s, tp, mode = parallel.sequence_2D, parallel.tensor.size, parallel.tensor.mode
    key = "'parallel.sequence_2D"
    if mode != "isp":
        return f"{key}.enable' needs 'parallel.tensor.mode' 'isp' (its sequence group is what 2D splits); got '{mode}'"
    for name in ("head_size", "context_size", "window_size"):
        if getattr(s, name) < 1:
            return f"{key}.{name}' must be >= 1, got {getattr(s, name)}"
    if s.head_size * s.context_size != tp:
        return (f"{key}.head_size' ({s.head_size}) x {key}.context_size' ({s.context_size}) must equal "
                f"'parallel.tensor.size' ({tp})")
    if s.context_size % s.window_size:
        return f"{key}.window_size' ({s.window_size}) must divide {key}.context_size' ({s.context_size})"
    place = s.device_placement_strategy
    if place.head_first and place.interleaved and s.head_size > 1:
        return (f"{key}.device_placement_strategy.interleaved' must be False when head_first is True and "
                f"head_size ({s.head_size}) > 1 (InternEvo's rule: context groups are then strided)")
    if s.kv_exchange not in KV_EXCHANGES:
        return f"{key}.kv_exchange' must be one of {', '.join(KV_EXCHANGES)}; got {s.kv_exchange!r}"
    if model_cfg.sliding_window and s.kv_exchange == "ring" and s.context_size > 1:
        return (f"'model.sliding_window' ({model_cfg.sliding_window}) with {key}.kv_exchange' 'ring': a ring step's "
                "keys are not where the window needs them; set kv_exchange='all_gather'")
    if model_cfg.compile:
        return (f"'model.compile' with {key}' is not supported yet (the ring's transfers and per-row plans are not "
                "traced): set one off")
    if parallel.pipeline.size > 1 and float(model_cfg.checkpoint) > 0:
        return (f"'model.checkpoint' with 'parallel.pipeline.size' > 1 under {key}' is not supported yet: a "
                "pipeline runs the next micro-batch's forward before this one's backward, and a checkpointed layer "
                "would recompute with that row's split; set one off")
    if packed_length < 2 * tp:
        return (f"'data.seq_len' x 'data.micro_bsz' ({packed_length} tokens a row) is too short for a sequence group "
                f"of {tp} ranks under {key}': every rank needs at least two tokens (a head and a tail chunk)")
    return None


def zero_size(zero1: int, dp: int, tp_mode: str = "mtp") -> int:
    """InternEvo's zero1.size: <= 0 the whole data group, 1 off, else a divisor of dp. Under isp there are no
    zero groups (1): the weight group is what shards."""
    if TENSOR_MODE[tp_mode].weight_parallel:
        return 1
    return dp if zero1 <= 0 else zero1


def data_and_zero_sizes(parallel, world_size: int) -> tuple[int, int]:
    """(data-parallel size, zero group size) of the ``parallel`` section over ``world_size`` ranks: what is left
    after tensor x pipeline, and InternEvo's zero1 within it; a ``ConfigError`` naming the keys when the layout
    does not fit the world (``layout_error``). The one place these sizes are worked out (validation with the
    launcher's world, ``ParallelContext.plan``)."""
    pp, tp, tp_mode = parallel.pipeline.size, parallel.tensor.size, parallel.tensor.mode or "mtp"
    dp = max(1, world_size // (pp * tp))
    zero = zero_size(parallel.zero1.size, dp, tp_mode)
    problem = layout_error(world_size, pp, None, tp, zero, parallel.weight.size)
    if problem:
        raise ConfigError(problem)
    return dp, zero


def layout_error(world_size: int, pp: int, dp: int | None, tp: int, zero: int, weight: int = 1) -> str | None:
    """Why (pp, tp, zero, isp's weight) cannot be laid over ``world_size`` ranks, or None (dp: None = what is
    left)."""
    procs = f"{world_size} process{'es' if world_size != 1 else ''}"
    if world_size % (pp * tp):
        return (f"'parallel.tensor.size' ({tp}) x 'parallel.pipeline.size' ({pp}) must divide the world size "
                f"({procs})")
    dp = world_size // (pp * tp) if dp is None else dp
    if dp * tp * pp != world_size:
        return (f"data ({dp}) x 'parallel.tensor.size' ({tp}) x 'parallel.pipeline.size' ({pp}) must equal the "
                f"world size ({procs})")
    if dp % zero:
        return (f"'parallel.zero1.size' ({zero}) must divide the data-parallel size ({dp} = {procs} "
                f"/ tensor {tp} / pipeline {pp}); -1 or 0 shards over the whole data group, 1 turns ZeRO off")
    if (dp * tp) % weight:
        return (f"'parallel.weight.size' ({weight}) must divide a pipeline stage's ranks ({dp * tp} = data {dp} x "
                f"'parallel.tensor.size' {tp})")
    return None


def expert_size(size: int, dp: int, num_experts: int) -> int:
    """InternEvo's parallel.expert.size: <= 0 the data-parallel size capped at the experts, else itself; 1 for a
    dense model."""
    if num_experts <= 1:
        return 1
    return min(dp, num_experts) if size <= 0 else size


def expert_error(ep: int, dp: int, zero: int, num_experts: int, zero1: int, tp_mode: str = "mtp") -> str | None:
    """Why expert groups of ``ep`` cannot hold ``num_experts`` experts over ``dp`` data ranks, or None (under isp
    the weight groups shard, not zero groups: zero1 stays -1 there)."""
    if ep == 1:
        return None
    if num_experts % ep:
        return f"'parallel.expert.size' ({ep}) must divide 'model.num_experts' ({num_experts}): experts are not split"
    if dp % ep:
        return (f"'parallel.expert.size' ({ep}) must divide the data-parallel size ({dp}): expert groups are runs "
                "of data ranks")
    if zero != dp and not TENSOR_MODE[tp_mode].weight_parallel:
        return (f"'parallel.zero1.size' ({zero1}) must be -1 or the data-parallel size ({dp}) with expert "
                "parallelism (InternEvo's rule)")
    return None


def check_pipeline(model_cfg, pp: int, mode: str, micro_num: int) -> str | None:
    """Why ``model_cfg`` cannot run pipelined over ``pp`` ranks in ``mode`` with ``micro_num`` micro-batches, or
    None. Checked with the config, before any process group exists."""
    v, layers = model_cfg.num_chunks, model_cfg.num_layers
    if mode not in PIPELINE_MODES:
        return f"'parallel.pipeline.mode' must be one of {', '.join(PIPELINE_MODES)}; got {mode!r}"
    if v < 1:
        return f"'model.num_chunks' must be >= 1, got {v}"
    need = PIPELINE_MODE[mode].chunks
    if need is not None and v != need:
        return (f"'parallel.pipeline.mode' '{mode}' runs exactly {_WORDS.get(need, need)} chunks per rank (the V): "
                f"set 'model.num_chunks' to {need}, got {v}")
    if layers % v:
        return (f"'model.num_chunks' ({v}) must divide 'model.num_layers' ({layers}): each chunk of a rank holds "
                "num_layers / num_chunks layers' share")
    if layers // v < pp:
        return (f"'parallel.pipeline.size' ({pp}) is larger than the layers a chunk group has to split "
                f"('model.num_layers' {layers} / 'model.num_chunks' {v} = {layers // v}): every stage needs a layer")
    if pp > 1 and micro_num < pp:
        return (f"'data.micro_num' ({micro_num}) must be >= 'parallel.pipeline.size' ({pp}): a pipeline needs a "
                "micro-batch per stage to fill")
    if pp > 1 and (v > 1 or mode != "1F1B"):
        rounds = max(1, micro_num // pp)
        if micro_num % rounds:
            return (f"'data.micro_num' ({micro_num}) must be a multiple of micro_num // 'parallel.pipeline.size' "
                    f"({rounds}) for the interleaved and zero-bubble schedules (torch's rounds of pipeline.size "
                    f"micro-batches): a multiple of {pp} always is")
    if pp > 1 and PIPELINE_MODE[mode].zero_bubble and model_cfg.compile:
        return (f"'model.compile' = True with 'parallel.pipeline.mode' '{mode}': torch's zero-bubble schedules "
                "cannot split a compiled layer's backward; use mode '1F1B' or compile=False")
    return None
