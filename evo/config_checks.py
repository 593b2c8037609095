"""Validation of a loaded config: everything its types alone cannot say (``validate``, called by
``evo.config.config_from_dict`` and for a ``Config`` made by hand). Each problem is one ``ConfigError`` line
naming the keys and the values; defaults that follow from other keys are resolved here too (the run and
checkpoint folders, ``tensor.mode`` from ``sequence_parallel``, ``pipeline.mode``)."""

from __future__ import annotations

import math
from pathlib import Path

from evo.config import (_DTYPES, CKPT_CONTENTS, Config, DataConfig, ModelConfig, _check_choice, _require,
                        _warn_unknown, parse_skip_batches)

ROPE_TYPES = {  # rope_type -> the keys it needs besides factor (Hugging Face's names)
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _validate_rope_scaling(m: ModelConfig) -> None:
    """``model.rope_scaling`` in Hugging Face's form: dict(rope_type=..., factor=..., ...) ("type" also read)."""
    if m.rope_scaling is None:
        return
    rope = dict(m.rope_scaling)
    kind = rope.get("rope_type", rope.get("type", "default"))
    _check_choice(kind, tuple(ROPE_TYPES), "model.rope_scaling.rope_type")
    if m.use_dynamic_ntk_rope:
        _require(kind == "dynamic", f"'model.use_dynamic_ntk_rope' is True but 'model.rope_scaling.rope_type' is "
                                    f"{kind!r}: set one of them")
    for key in ROPE_TYPES[kind]:
        _require(key in rope, f"'model.rope_scaling.{key}' is required with rope_type {kind!r}")
        value = rope[key]
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"'model.rope_scaling.{key}' must be a number > 0, got {value!r}")
    if kind == "llama3":
        _require(rope["high_freq_factor"] > rope["low_freq_factor"],
                 "'model.rope_scaling.high_freq_factor' must be greater than 'low_freq_factor'")
    known = {"rope_type", "type", "rope_theta", *ROPE_TYPES[kind]}
    for key in rope:
        if key not in known:
            _warn_unknown(f"model.rope_scaling.{key}")
    if "rope_theta" in rope:
        _require(float(rope["rope_theta"]) == float(m.rope_base),
                 f"'model.rope_scaling.rope_theta' ({rope['rope_theta']}) differs from 'model.rope_base' ({m.rope_base})")


def validate(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        _require(getattr(m, key) >= 1, f"'model.{key}' must be >= 1, got {getattr(m, key)}")
    _require(m.head_dim is not None,
             f"'model.hidden_size' ({m.hidden_size}) must be divisible by 'model.num_attention_heads' "
             f"({m.num_attention_heads}), or 'model.head_dim' set")
    _require(m.head_dim >= 2 and m.head_dim % 2 == 0, f"'model.head_dim' must be even and >= 2 for rotary, got {m.head_dim}")
    if m.num_kv_attention_heads is not None:
        _require(m.num_kv_attention_heads >= 1 and m.num_attention_heads % m.num_kv_attention_heads == 0,
                 f"'model.num_kv_attention_heads' ({m.num_kv_attention_heads}) must divide "
                 f"'model.num_attention_heads' ({m.num_attention_heads})")
    _require(m.mlp_ratio > 0, f"'model.mlp_ratio' must be > 0, got {m.mlp_ratio}")
    _require(m.multiple_of >= 1, f"'model.multiple_of' must be >= 1, got {m.multiple_of}")
    _require(m.intermediate_size >= 1, f"'model.intermediate_size' must be >= 1, got {m.intermediate_size}")
    _require(m.max_position_embeddings >= 1,
             f"'model.max_position_embeddings' must be >= 1, got {m.max_position_embeddings}")
    if m.sliding_window is not None:
        _require(m.sliding_window >= 1, f"'model.sliding_window' must be >= 1 or None, got {m.sliding_window}")
    _validate_rope_scaling(m)
    _check_choice(m.dtype, _DTYPES, "model.dtype")
    _check_choice(m.norm_type, ("rmsnorm",), "model.norm_type")
    _check_choice(m.init_type, ("normal",), "model.init_type")
    _require(m.layer_norm_epsilon > 0, f"'model.layer_norm_epsilon' must be > 0, got {m.layer_norm_epsilon}")
    _require(m.rope_base > 0, f"'model.rope_base' must be > 0, got {m.rope_base}")
    _require(not m.norm_head, "'model.norm_head' must be False (not supported yet)")
    _require(not m.apply_post_layer_norm, "'model.apply_post_layer_norm' must be False (pre-norm only)")
    _require(0 <= float(m.checkpoint) <= 1, f"'model.checkpoint' must be a bool or a fraction in [0, 1], got {m.checkpoint}")
    for key in ("embedding_init_std", "attn_wqkv_init_std", "attn_other_init_std", "ffn_uplayer_init_std",
                "ffn_other_init_std", "out_head_init_std"):
        _require(getattr(m, key) >= 0, f"'model.{key}' must be >= 0")

    for key in ("seq_len", "micro_num", "micro_bsz", "valid_micro_num", "total_steps"):
        _require(getattr(d, key) >= 1, f"'data.{key}' must be >= 1, got {getattr(d, key)}")
    _require(d.valid_every >= 0, f"'data.valid_every' must be >= 0, got {d.valid_every}")
    _require(d.min_length >= 0, f"'data.min_length' must be >= 0, got {d.min_length}")
    if d.valid_max_batches is not None:
        _require(d.valid_max_batches >= 1, f"'data.valid_max_batches' must be >= 1 or None, got {d.valid_max_batches}")
    if d.type is None:
        d.type = "tokenized" if d.train_folder else "dummy"
    _check_choice(d.type, ("dummy", "builtin", "tokenized", "streaming"), "data.type")
    if d.type in ("tokenized", "streaming"):
        _require(d.train_folder is not None, f"'data.train_folder' is required when data.type is '{d.type}'")
    if d.type == "streaming":
        _require(d.use_packed_dataset, "'data.use_packed_dataset' must be True with data.type 'streaming'")
    _require(d.max_bad_lines >= 0, f"'data.max_bad_lines' must be >= 0, got {d.max_bad_lines}")
    _check_data_conflicts(d)
    parse_skip_batches(d.skip_batches)

    _validate_parallel(cfg)

    a = cfg.adam
    _require(a.lr >= 0, f"'adam.lr' must be >= 0, got {a.lr}")
    _require(0 <= a.adam_beta1 < 1 and 0 <= a.adam_beta2 < 1, "'adam.adam_beta1' and 'adam.adam_beta2' must be in [0, 1)")
    _require(a.adam_eps > 0, f"'adam.adam_eps' must be > 0, got {a.adam_eps}")
    _require(a.weight_decay >= 0, f"'adam.weight_decay' must be >= 0, got {a.weight_decay}")

    s = cfg.lr_scheduler
    if s.total_steps is None:
        s.total_steps = d.total_steps
    _require(s.total_steps >= 1, f"'lr_scheduler.total_steps' must be >= 1, got {s.total_steps}")
    _require(0 <= s.init_steps < s.total_steps, "'lr_scheduler.init_steps' must be in [0, total_steps)")
    _require(0 <= s.warmup_ratio <= 1, f"'lr_scheduler.warmup_ratio' must be in [0, 1], got {s.warmup_ratio}")
    _require(s.eta_min >= 0, f"'lr_scheduler.eta_min' must be >= 0, got {s.eta_min}")

    g = cfg.grad_scaler
    _require(g.fp16.initial_scale > 0 and g.fp16.min_scale > 0, "'grad_scaler.fp16' scales must be > 0")
    _require(g.fp16.min_scale <= g.fp16.initial_scale <= g.max_scale,
             "'grad_scaler' needs fp16.min_scale <= fp16.initial_scale <= max_scale")
    _require(g.growth_factor > 1, f"'grad_scaler.growth_factor' must be > 1, got {g.growth_factor}")
    _require(0 < g.backoff_factor < 1, f"'grad_scaler.backoff_factor' must be in (0, 1), got {g.backoff_factor}")
    _require(g.fp16.growth_interval >= 1 and g.hysteresis >= 1,
             "'grad_scaler.fp16.growth_interval' and 'grad_scaler.hysteresis' must be >= 1")
    _require(math.isfinite(cfg.hybrid_zero_optimizer.clip_grad_norm),
             "'hybrid_zero_optimizer.clip_grad_norm' must be a finite number (<= 0 turns clipping off)")
    _require(0 <= cfg.loss.label_smoothing < 1, f"'loss.label_smoothing' must be in [0, 1), got {cfg.loss.label_smoothing}")
    _require(cfg.ckpt.checkpoint_every >= 0, f"'ckpt.checkpoint_every' must be >= 0, got {cfg.ckpt.checkpoint_every}")
    _require(cfg.ckpt.keep_latest >= 0, f"'ckpt.keep_latest' must be >= 0 (0 keeps every checkpoint), got "
             f"{cfg.ckpt.keep_latest}")
    info = cfg.ckpt.load_ckpt_info
    if info is not None:
        _require("path" in info, "'ckpt.load_ckpt_info' needs a 'path'")
        content = info.get("content", ("all",))
        content = (content,) if isinstance(content, str) else tuple(content)
        for c in content:
            _check_choice(c, CKPT_CONTENTS, "ckpt.load_ckpt_info.content")
        info["content"] = content
        kind = info.setdefault("ckpt_type", "evo")
        _check_choice(kind, ("evo", "hf", "internevo"), "ckpt.load_ckpt_info.ckpt_type")
        _require(kind != "hf" or content == ("model",), "'ckpt.load_ckpt_info.ckpt_type' 'hf': a Hugging Face "
                 f"folder holds the model only; set content=('model',), got {content}")
        _require(kind != "internevo" or content == ("model",), "'ckpt.load_ckpt_info.ckpt_type' 'internevo': evo "
                 f"reads the model from an InternEvo folder, not its optimizer or data state; set "
                 f"content=('model',), got {content}")
    _require(cfg.monitor.log_every >= 1, f"'monitor.log_every' must be >= 1, got {cfg.monitor.log_every}")
    peak = cfg.monitor.peak_tflops
    _require(peak is None or peak > 0, f"'monitor.peak_tflops' must be > 0 (TFLOP/s of one device), got {peak}")
    _resolve_folders(cfg)


def _validate_parallel(cfg: Config) -> None:
    """The layout keys on their own (the world size is checked at launch, ``evo.parallel.context.layout_error``)."""
    p, m = cfg.parallel, cfg.model
    for name in ("tensor", "pipeline", "weight"):
        size = getattr(p, name).size
        _require(size >= 1, f"'parallel.{name}.size' must be >= 1, got {size}")
    p.tensor.mode = p.tensor.mode or ("msp" if p.sequence_parallel else "mtp")  # InternEvo's older configs: the switch
    _check_choice(p.tensor.mode, ("mtp", "msp", "fsp", "isp"), "parallel.tensor.mode")
    p.pipeline.mode = p.pipeline.mode or "1F1B"
    from evo.parallel.pipeline import check_pipeline

    problem = check_pipeline(m, p.pipeline.size, p.pipeline.mode, cfg.data.micro_num)
    _require(problem is None, str(problem))
    isp = p.tensor.mode == "isp"
    _require(p.weight.size == 1 or isp, f"'parallel.weight.size' = {p.weight.size} needs 'parallel.tensor.mode' "
             f"'isp' (weight parallelism is isp's); got '{p.tensor.mode}'")
    _require(not isp or p.zero1.size in (-1, 0, 1),
             f"'parallel.zero1.size' = {p.zero1.size} with tensor.mode 'isp': evo shards the weights, gradients and "
             "optimizer state over the weight group ('parallel.weight.size'); leave zero1 at -1")
    if p.sequence_parallel is not None:
        sp = p.tensor.mode in ("msp", "fsp", "isp")
        _require(bool(p.sequence_parallel) == sp or p.tensor.size == 1,
                 f"'parallel.sequence_parallel' = {p.sequence_parallel} contradicts 'parallel.tensor.mode' "
                 f"'{p.tensor.mode}' (msp and fsp are sequence parallel, mtp is not): leave it out, or make them agree")
    _require(p.timeout_s > 0, f"'parallel.timeout_s' must be > 0 seconds, got {p.timeout_s}")
    tp = p.tensor.size
    if tp > 1:
        from evo.parallel.tensor import check_tensor_parallel

        problem = check_tensor_parallel(m, tp, p.tensor.mode)
        _require(problem is None, str(problem))
        if p.tensor.mode in ("msp", "fsp", "isp"):
            _require(cfg.data.packed_length % tp == 0,
                     f"'data.seq_len' x 'data.micro_bsz' ({cfg.data.packed_length} tokens a row) must be divisible by "
                     f"'parallel.tensor.size' ({tp}) for tensor.mode '{p.tensor.mode}' (rows are split into sequence "
                     "shards)")


# A data key set to something other than its default that the chosen data.type never reads: an error
# naming both (a setting that is silently ignored looks like it works). type -> the keys it ignores.
_IGNORED_BY_TYPE = {
    "dummy": ("train_folder", "valid_folder", "tokenizer_path", "max_bad_lines"),
    "builtin": ("train_folder", "valid_folder", "num_dummy_samples", "max_bad_lines"),
    "tokenized": ("num_dummy_samples", "max_bad_lines"),
    "streaming": ("num_dummy_samples",),
}


def _check_data_conflicts(d: DataConfig) -> None:
    defaults = DataConfig()
    for key in _IGNORED_BY_TYPE[d.type]:
        value = getattr(d, key)
        _require(value == getattr(defaults, key),
                 f"'data.{key}' ({value!r}) is not used with 'data.type' {d.type!r}: remove one of them")
    _require(not (d.pack_sample_into_one and not d.use_packed_dataset),
             "'data.pack_sample_into_one' is True but 'data.use_packed_dataset' is False (one document per "
             "seq_len slot, never packed): remove one of them")


def _resolve_folders(cfg: Config) -> None:
    """The run folder defaults to runs/<JOB_NAME>, the checkpoint folder to <run folder>/checkpoints."""
    if cfg.monitor.run_folder is None:
        name = cfg.JOB_NAME
        _require(bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name,
                 f"'JOB_NAME' {name!r} names the run folder runs/<JOB_NAME>: it must be a plain folder name "
                 "(or set 'monitor.run_folder')")
        cfg.monitor.run_folder = str(Path("runs") / name)
    if cfg.ckpt.save_ckpt_folder is None:
        cfg.ckpt.save_ckpt_folder = str(Path(cfg.monitor.run_folder) / "checkpoints")
