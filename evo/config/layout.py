"""The parallel layout's rules, checked with the config before any process group exists: the tensor modes, the
pipeline modes, and what a model must satisfy to be split by them (``check_tensor_parallel``,
``check_pipeline``: the reason it cannot, or None). evo/config/checks.py asks them; evo/parallel runs the
layouts they allow."""

from __future__ import annotations

TENSOR_MODES = ("mtp", "msp", "fsp", "isp")  # InternEvo's: megatron, + sequence parallel, + full sequence, intern
PIPELINE_MODES = ("1F1B", "ZBH1", "ZBV")


def check_tensor_parallel(cfg, tp: int, mode: str = "mtp") -> str | None:
    """Why a model config cannot be split over ``tp`` ranks in ``mode``, or None (isp splits only the heads)."""
    split = (("num_attention_heads", cfg.num_attention_heads), ("num_kv_attention_heads", cfg.kv_heads))
    if mode != "isp":
        split += (("vocab_size", cfg.vocab_size), ("intermediate_size", cfg.intermediate_size))
    for key, value in split:
        if value % tp:
            return f"'parallel.tensor.size' ({tp}) must divide 'model.{key}' ({value})"
    return None


def check_pipeline(model_cfg, pp: int, mode: str, micro_num: int) -> str | None:
    """Why ``model_cfg`` cannot run pipelined over ``pp`` ranks in ``mode`` with ``micro_num`` micro-batches, or
    None. Checked with the config, before any process group exists."""
    v, layers = model_cfg.num_chunks, model_cfg.num_layers
    if mode not in PIPELINE_MODES:
        return f"'parallel.pipeline.mode' must be one of {', '.join(PIPELINE_MODES)}; got {mode!r}"
    if v < 1:
        return f"'model.num_chunks' must be >= 1, got {v}"
    if mode == "ZBV" and v != 2:
        return (f"'parallel.pipeline.mode' 'ZBV' runs exactly two chunks per rank (the V): set 'model.num_chunks' to 2, "
                f"got {v}")
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
    if pp > 1 and mode in ("ZBH1", "ZBV") and model_cfg.compile:
        return (f"'model.compile' = True with 'parallel.pipeline.mode' '{mode}': torch's zero-bubble schedules "
                "cannot split a compiled layer's backward; use mode '1F1B' or compile=False")
    return None
