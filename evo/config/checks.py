"""Validation of a loaded config: everything its types alone cannot say (``validate``, called by
``evo.config.config_from_dict`` and for a ``Config`` made by hand). Each problem is one ``ConfigError`` line
naming the keys and the values; defaults that follow from other keys are resolved here too (the run and
checkpoint folders, ``tensor.mode`` from ``sequence_parallel``, ``pipeline.mode``)."""

from __future__ import annotations

import difflib
import math
import warnings
from pathlib import Path

from evo.config.layout import (PIPELINE_MODES, TENSOR_MODE, TENSOR_MODES, check_pipeline, check_tensor_parallel,
                               data_and_zero_sizes, expert_error, expert_size, sequence_2d_error)
from evo.config.sections import CKPT_CONTENTS, DTYPES, MOE_MODEL_TYPES, MOE_TYPES, Config, DataConfig, ModelConfig
from evo.errors import ConfigError

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
    check_choice(kind, tuple(ROPE_TYPES), "model.rope_scaling.rope_type")
    if m.use_dynamic_ntk_rope:
        require(kind == "dynamic", f"'model.use_dynamic_ntk_rope' is True but 'model.rope_scaling.rope_type' is "
                                    f"{kind!r}: set one of them")
    for key in ROPE_TYPES[kind]:
        require(key in rope, f"'model.rope_scaling.{key}' is required with rope_type {kind!r}")
        value = rope[key]
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"'model.rope_scaling.{key}' must be a number > 0, got {value!r}")
    if kind == "llama3":
        require(rope["high_freq_factor"] > rope["low_freq_factor"],
                 "'model.rope_scaling.high_freq_factor' must be greater than 'low_freq_factor'")
    known = {"rope_type", "type", "rope_theta", *ROPE_TYPES[kind]}
    for key in rope:
        if key not in known:
            warn_unknown(f"model.rope_scaling.{key}")
    if "rope_theta" in rope:
        require(float(rope["rope_theta"]) == float(m.rope_base),
                 f"'model.rope_scaling.rope_theta' ({rope['rope_theta']}) differs from 'model.rope_base' ({m.rope_base})")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every section beyond its types, in order, raising one ``ConfigError`` line for the first problem, and
    fill what is derived (``tensor.mode``, ``pipeline.mode``, ``data.type``, ``lr_scheduler.total_steps``,
    ``load_ckpt_info``'s defaults, the folders). With ``world_size`` (the launcher's), the layout is checked against
    it before the model's sizes are, so a layout that cannot fit the world says so first."""
    _validate_model(cfg.model)
    _validate_moe(cfg)
    _validate_data(cfg.data)
    _validate_parallel(cfg, world_size)
    _validate_optimizer(cfg)
    _validate_memory(cfg)
    _validate_ckpt(cfg.ckpt)
    require(cfg.monitor.log_every >= 1, f"'monitor.log_every' must be >= 1, got {cfg.monitor.log_every}")
    peak = cfg.monitor.peak_tflops
    require(peak is None or peak > 0, f"'monitor.peak_tflops' must be > 0 (TFLOP/s of one device), got {peak}")
    _resolve_folders(cfg)


def _validate_memory(cfg: Config) -> None:
    """selective_checkpoint and its offload, cpu_offloading (InternEvo's rules, and none that does nothing)."""
    m, off = cfg.model, cfg.cpu_offloading
    require(not cfg.selective_checkpoint_offload or cfg.selective_checkpoint,
            "'selective_checkpoint_offload' = True needs 'selective_checkpoint' = True (it offloads what that keeps)")
    require(not cfg.selective_checkpoint or float(m.checkpoint) > 0,
            "'selective_checkpoint' = True needs 'model.checkpoint' > 0: it changes how checkpointed layers "
            "recompute, and none is checkpointed")
    require(not cfg.selective_checkpoint or not m.compile,
            "'selective_checkpoint' with 'model.compile' is not supported yet: set one off")
    require(0 <= off.num_layers <= m.num_layers, f"'cpu_offloading.num_layers' must be 0 to 'model.num_layers' "
            f"({m.num_layers}), got {off.num_layers}")
    require(off.enable or off.num_layers == 0, f"'cpu_offloading.num_layers' = {off.num_layers} with enable=False: "
            "InternEvo's rule is 0 when disabled; set enable=True or num_layers=0")
    require(not off.enable or off.num_layers >= 1, "'cpu_offloading.enable' = True offloads nothing with "
            "num_layers=0: set num_layers to the layers to offload")
    require(not off.enable or not m.compile, "'cpu_offloading' with 'model.compile' is not supported yet (its "
            "saved-tensor hooks run inside the compiled layer): set one off")


def _validate_model(m) -> None:
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        require(getattr(m, key) >= 1, f"'model.{key}' must be >= 1, got {getattr(m, key)}")
    require(m.head_dim is not None,
             f"'model.hidden_size' ({m.hidden_size}) must be divisible by 'model.num_attention_heads' "
             f"({m.num_attention_heads}), or 'model.head_dim' set")
    require(m.head_dim >= 2 and m.head_dim % 2 == 0, f"'model.head_dim' must be even and >= 2 for rotary, got {m.head_dim}")
    if m.num_kv_attention_heads is not None:
        require(m.num_kv_attention_heads >= 1 and m.num_attention_heads % m.num_kv_attention_heads == 0,
                 f"'model.num_kv_attention_heads' ({m.num_kv_attention_heads}) must divide "
                 f"'model.num_attention_heads' ({m.num_attention_heads})")
    require(m.mlp_ratio > 0, f"'model.mlp_ratio' must be > 0, got {m.mlp_ratio}")
    require(m.multiple_of >= 1, f"'model.multiple_of' must be >= 1, got {m.multiple_of}")
    require(m.intermediate_size >= 1, f"'model.intermediate_size' must be >= 1, got {m.intermediate_size}")
    require(m.max_position_embeddings >= 1,
             f"'model.max_position_embeddings' must be >= 1, got {m.max_position_embeddings}")
    if m.sliding_window is not None:
        require(m.sliding_window >= 1, f"'model.sliding_window' must be >= 1 or None, got {m.sliding_window}")
    _validate_rope_scaling(m)
    check_choice(m.dtype, DTYPES, "model.dtype")
    check_choice(m.norm_type, ("rmsnorm",), "model.norm_type")
    check_choice(m.init_type, ("normal",), "model.init_type")
    require(m.layer_norm_epsilon > 0, f"'model.layer_norm_epsilon' must be > 0, got {m.layer_norm_epsilon}")
    require(m.rope_base > 0, f"'model.rope_base' must be > 0, got {m.rope_base}")
    require(not m.norm_head, "'model.norm_head' must be False (not supported yet)")
    require(not m.apply_post_layer_norm, "'model.apply_post_layer_norm' must be False (pre-norm only)")
    require(0 <= float(m.checkpoint) <= 1, f"'model.checkpoint' must be a bool or a fraction in [0, 1], got {m.checkpoint}")
    for key in ("embedding_init_std", "attn_wqkv_init_std", "attn_other_init_std", "ffn_uplayer_init_std",
                "ffn_other_init_std", "out_head_init_std"):
        require(getattr(m, key) >= 0, f"'model.{key}' must be >= 0")


def _validate_data(d) -> None:
    for key in ("seq_len", "micro_num", "micro_bsz", "valid_micro_num", "total_steps"):
        require(getattr(d, key) >= 1, f"'data.{key}' must be >= 1, got {getattr(d, key)}")
    require(d.valid_every >= 0, f"'data.valid_every' must be >= 0, got {d.valid_every}")
    require(d.min_length >= 0, f"'data.min_length' must be >= 0, got {d.min_length}")
    if d.valid_max_batches is not None:
        require(d.valid_max_batches >= 1, f"'data.valid_max_batches' must be >= 1 or None, got {d.valid_max_batches}")
    if d.type is None:
        d.type = "tokenized" if d.train_folder else "dummy"
    check_choice(d.type, ("dummy", "builtin", "tokenized", "streaming"), "data.type")
    if d.type == "builtin" and d.train_folder:  # your own data over a config of the built-in corpus
        d.type = _own_data_type(d.train_folder)
    if d.type in ("tokenized", "streaming"):
        require(d.train_folder is not None, f"'data.train_folder' is required when data.type is '{d.type}'")
    if d.type == "streaming":
        require(d.use_packed_dataset, "'data.use_packed_dataset' must be True with data.type 'streaming'")
    require(d.max_bad_lines >= 0, f"'data.max_bad_lines' must be >= 0, got {d.max_bad_lines}")
    require(0 <= d.valid_split < 1, f"'data.valid_split' must be in [0, 1) (a fraction of the documents), got "
             f"{d.valid_split}")
    if d.valid_split > 0:
        require(d.type in ("dummy", "tokenized"), f"'data.valid_split' holds out documents of an indexed corpus "
                 f"(data.type 'tokenized' or 'dummy'), not of data.type {d.type!r}"
                 + (" (it has its own validation set)" if d.type == "builtin" else " (read as it goes: give "
                    "data.valid_folder)" if d.type == "streaming" else ""))
        require(not d.valid_folder, "'data.valid_split' and 'data.valid_folder' both name the validation data: "
                 "keep one")
    _check_data_conflicts(d)
    parse_skip_batches(d.skip_batches)


def _validate_optimizer(cfg: Config) -> None:
    """adam, lr_scheduler, grad_scaler, hybrid_zero_optimizer, loss."""
    a = cfg.adam
    require(a.lr >= 0, f"'adam.lr' must be >= 0, got {a.lr}")
    require(0 <= a.adam_beta1 < 1 and 0 <= a.adam_beta2 < 1, "'adam.adam_beta1' and 'adam.adam_beta2' must be in [0, 1)")
    require(a.adam_eps > 0, f"'adam.adam_eps' must be > 0, got {a.adam_eps}")
    require(a.weight_decay >= 0, f"'adam.weight_decay' must be >= 0, got {a.weight_decay}")

    s = cfg.lr_scheduler
    if s.total_steps is None:
        s.total_steps = cfg.data.total_steps
    require(s.total_steps >= 1, f"'lr_scheduler.total_steps' must be >= 1, got {s.total_steps}")
    require(0 <= s.init_steps < s.total_steps, "'lr_scheduler.init_steps' must be in [0, total_steps)")
    require(0 <= s.warmup_ratio <= 1, f"'lr_scheduler.warmup_ratio' must be in [0, 1], got {s.warmup_ratio}")
    require(s.eta_min >= 0, f"'lr_scheduler.eta_min' must be >= 0, got {s.eta_min}")

    g = cfg.grad_scaler
    require(g.fp16.initial_scale > 0 and g.fp16.min_scale > 0, "'grad_scaler.fp16' scales must be > 0")
    require(g.fp16.min_scale <= g.fp16.initial_scale <= g.max_scale,
             "'grad_scaler' needs fp16.min_scale <= fp16.initial_scale <= max_scale")
    require(g.growth_factor > 1, f"'grad_scaler.growth_factor' must be > 1, got {g.growth_factor}")
    require(0 < g.backoff_factor < 1, f"'grad_scaler.backoff_factor' must be in (0, 1), got {g.backoff_factor}")
    require(g.fp16.growth_interval >= 1 and g.hysteresis >= 1,
             "'grad_scaler.fp16.growth_interval' and 'grad_scaler.hysteresis' must be >= 1")
    require(math.isfinite(cfg.hybrid_zero_optimizer.clip_grad_norm),
             "'hybrid_zero_optimizer.clip_grad_norm' must be a finite number (<= 0 turns clipping off)")
    require(0 <= cfg.loss.label_smoothing < 1, f"'loss.label_smoothing' must be in [0, 1), got {cfg.loss.label_smoothing}")


def _validate_ckpt(c) -> None:
    require(c.checkpoint_every >= 0, f"'ckpt.checkpoint_every' must be >= 0, got {c.checkpoint_every}")
    require(c.keep_latest >= 0, f"'ckpt.keep_latest' must be >= 0 (0 keeps every checkpoint), got {c.keep_latest}")
    info = c.load_ckpt_info
    if info is not None:
        require("path" in info, "'ckpt.load_ckpt_info' needs a 'path'")
        content = info.get("content", ("all",))
        content = (content,) if isinstance(content, str) else tuple(content)
        for c in content:
            check_choice(c, CKPT_CONTENTS, "ckpt.load_ckpt_info.content")
        info["content"] = content
        kind = info.setdefault("ckpt_type", "evo")
        check_choice(kind, ("evo", "hf", "internevo"), "ckpt.load_ckpt_info.ckpt_type")
        require(kind != "hf" or content == ("model",), "'ckpt.load_ckpt_info.ckpt_type' 'hf': a Hugging Face "
                 f"folder holds the model only; set content=('model',), got {content}")
        require(kind != "internevo" or content == ("model",), "'ckpt.load_ckpt_info.ckpt_type' 'internevo': evo "
                 f"reads the model from an InternEvo folder, not its optimizer or data state; set "
                 f"content=('model',), got {content}")


def _validate_parallel(cfg: Config, world_size: int | None = None) -> None:
    """The layout keys, against ``world_size`` when known (else at launch: ``evo.config.layout.layout_error``)."""
    p, m = cfg.parallel, cfg.model
    for name in ("tensor", "pipeline", "weight"):
        size = getattr(p, name).size
        require(size >= 1, f"'parallel.{name}.size' must be >= 1, got {size}")
    p.tensor.mode = p.tensor.mode or ("msp" if p.sequence_parallel else "mtp")  # InternEvo's older configs: the switch
    check_choice(p.tensor.mode, TENSOR_MODES, "parallel.tensor.mode")
    if p.sequence_2D.enable:  # the section's own rules, before the world's
        problem = sequence_2d_error(p, m, cfg.data.packed_length)
        require(problem is None, str(problem))
    mode = p.pipeline.mode or "1F1B"
    p.pipeline.mode = mode.upper() if mode.upper() in PIPELINE_MODES else mode  # InternEvo's configs write "1f1b"
    require(p.expert.size != 0 and p.expert.size >= -1, f"'parallel.expert.size' must be >= 1, or -1 (the "
            f"data-parallel size, capped at the experts), got {p.expert.size}")
    require(p.expert.size <= 1 or m.num_experts > 1, f"'parallel.expert.size' = {p.expert.size} needs a mixture of "
            "experts: set 'model.num_experts' > 1 or leave parallel.expert out")
    if world_size is not None:
        dp, zero = data_and_zero_sizes(p, world_size)  # the layout against the launcher's world, before the model's
        p.expert.size = expert_size(p.expert.size, dp, m.num_experts)  # -1 resolved: the size every rank uses
        problem = expert_error(p.expert.size, dp, zero, m.num_experts, p.zero1.size, p.tensor.mode)
        require(problem is None, str(problem))
    require(p.expert.size <= 1 or not m.compile, f"'model.compile' with 'parallel.expert.size' {p.expert.size} is not "
            "supported yet (compiled, an expert-parallel layer does not yet train as it does eagerly): set one off")
    problem = check_pipeline(m, p.pipeline.size, p.pipeline.mode, cfg.data.micro_num)
    require(problem is None, str(problem))
    mode = TENSOR_MODE[p.tensor.mode]
    require(p.weight.size == 1 or mode.weight_parallel, f"'parallel.weight.size' = {p.weight.size} needs 'parallel.tensor.mode' "
             f"'isp' (weight parallelism is isp's); got '{p.tensor.mode}'")
    require(not mode.weight_parallel or p.zero1.size in (-1, 0, 1),
             f"'parallel.zero1.size' = {p.zero1.size} with tensor.mode 'isp': evo shards the weights, gradients and "
             "optimizer state over the weight group ('parallel.weight.size'); leave zero1 at -1")
    if p.sequence_parallel is not None:
        require(bool(p.sequence_parallel) == mode.sequence_parallel or p.tensor.size == 1,
                 f"'parallel.sequence_parallel' = {p.sequence_parallel} contradicts 'parallel.tensor.mode' "
                 f"'{p.tensor.mode}' (msp and fsp are sequence parallel, mtp is not): leave it out, or make them agree")
    require(p.timeout_s > 0, f"'parallel.timeout_s' must be > 0 seconds, got {p.timeout_s}")
    tp, two_d = p.tensor.size, p.sequence_2D.enable
    if tp > 1:
        problem = check_tensor_parallel(m, tp, p.tensor.mode, p.sequence_2D.head_size if two_d else None)
        require(problem is None, str(problem))
        if mode.sequence_parallel:
            require(cfg.data.packed_length % tp == 0,
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


def _own_data_type(folder: str) -> str:
    """The data.type of a ``data.train_folder`` given over ``data.type='builtin'``: what the folder holds
    (tokenized ``.bin`` files, or ``.jsonl`` text), said in a warning; else one line saying what to do."""
    path = Path(folder)
    kind = ("tokenized" if any(path.rglob("*.bin")) else "streaming" if any(path.rglob("*.jsonl")) else None) \
        if path.is_dir() else None
    require(kind is not None, f"'data.train_folder' '{folder}' holds neither tokenized data (.bin files, from "
            f"scripts/tokenize.py) nor .jsonl text, and 'data.type' is 'builtin' (the Python standard library): "
            f"tokenize your text (python scripts/tokenize.py --input TEXT --output {folder} --tokenizer byte) and "
            "add data.type=tokenized")
    warnings.warn(f"'data.train_folder' '{folder}' is read as data.type={kind!r}, what it holds (the config's "
                  "data.type 'builtin' is the Python standard library)", UserWarning, stacklevel=2)
    return kind


def _check_data_conflicts(d: DataConfig) -> None:
    defaults = DataConfig()
    for key in _IGNORED_BY_TYPE[d.type]:
        value = getattr(d, key)
        require(value == getattr(defaults, key),
                 f"'data.{key}' ({value!r}) is not used with 'data.type' {d.type!r}: remove one of them")
    require(not (d.pack_sample_into_one and not d.use_packed_dataset),
             "'data.pack_sample_into_one' is True but 'data.use_packed_dataset' is False (one document per "
             "seq_len slot, never packed): remove one of them")


def _resolve_folders(cfg: Config) -> None:
    """The run folder defaults to runs/<JOB_NAME>, the checkpoint folder to <run folder>/checkpoints."""
    if cfg.monitor.run_folder is None:
        name = cfg.JOB_NAME
        require(bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name,
                 f"'JOB_NAME' {name!r} names the run folder runs/<JOB_NAME>: it must be a plain folder name "
                 "(or set 'monitor.run_folder')")
        cfg.monitor.run_folder = str(Path("runs") / name)
    if cfg.ckpt.save_ckpt_folder is None:
        cfg.ckpt.save_ckpt_folder = str(Path(cfg.monitor.run_folder) / "checkpoints")


def warn_unknown(key: str) -> None:
    """A config key evo does not know: a warning naming it (InternEvo configs carry keys of its own machinery)."""
    warnings.warn(f"unknown config key '{key}' (ignored)", UserWarning, stacklevel=3)


# moe_layer_kwargs: the router's options evo reads (their checks), and InternEvo's that change nothing here (they
# tune its token dispatch, fused kernels or noisy gates; accepted with a warning naming them)
MOE_LAYER_KWARGS = {"scoring_func": lambda v: v in ("softmax", "sigmoid"),
                    "normalize_expert_weights": lambda v: isinstance(v, bool),
                    "routed_scaling_factor": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                    "capacity_factor": lambda v: v is None or (isinstance(v, (int, float)) and v > 0),
                    "min_capacity": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                    "eval_capacity_factor": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                    "drop_tokens": lambda v: isinstance(v, bool),
                    "drop_and_pad": lambda v: isinstance(v, bool)}
MOE_LAYER_KWARGS_NO_EFFECT = ("token_dispatch_policy", "use_grouped_mlp", "aux_loss_by_layer", "noisy_gate_policy",
                              "moe_jitter_eps", "use_rts", "use_fused_gating",
                              "drop_policy", "enable_fused_permute", "deterministic_mode", "parallel_mode")


def _validate_moe(cfg: Config) -> None:
    """The mixture-of-experts keys (docs/moe.md): a MoE model type, top_k within the experts, the router's options."""
    m = cfg.model
    require(m.num_experts >= 1, f"'model.num_experts' must be >= 1 (1: a dense model), got {m.num_experts}")
    check_choice(m.moe_type, MOE_TYPES, "model.moe_type")
    require(m.decoder_sparse_step >= 1, f"'model.decoder_sparse_step' must be >= 1, got {m.decoder_sparse_step}")
    require(cfg.loss.moe_loss_coeff >= 0, f"'loss.moe_loss_coeff' must be >= 0, got {cfg.loss.moe_loss_coeff}")
    if m.num_experts == 1:
        moe_keys = [k for k, dense in (("top_k", 1), ("num_shared_experts", 0), ("moe_layer_kwargs", {}),
                                       ("shared_expert_gate", False)) if getattr(m, k) != dense]
        require(not moe_keys, f"'model.{moe_keys[0] if moe_keys else ''}' is set on a dense model: set "
                              "'model.num_experts' > 1 (with a MoE model_type) or leave it out")
        return
    require(cfg.model_type in MOE_MODEL_TYPES,
            f"'model.num_experts' is {m.num_experts} but model_type '{cfg.model_type}' is a dense model: set "
            f"model_type to one of {', '.join(MOE_MODEL_TYPES)}")
    require(1 <= m.top_k <= m.num_experts,
            f"'model.top_k' must be between 1 and 'model.num_experts' ({m.num_experts}), got {m.top_k}")
    require(m.num_shared_experts >= 0, f"'model.num_shared_experts' must be >= 0, got {m.num_shared_experts}")
    require(m.moe_intermediate_size >= 1, f"'model.moe_intermediate_size' must be >= 1, got {m.moe_intermediate_size}")
    require(not m.shared_expert_gate or m.num_shared_experts >= 1,
            "'model.shared_expert_gate' gates the shared experts: set 'model.num_shared_experts' >= 1")
    if m.num_shared_experts:
        require(m.shared_expert_intermediate_size >= 1, "'model.shared_expert_intermediate_size' must be >= 1, got "
                f"{m.shared_expert_intermediate_size} (with 'model.num_shared_experts' {m.num_shared_experts})")
    bad = [i for i in m.mlp_only_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < m.num_layers]
    require(not bad, f"'model.mlp_only_layers' must hold layer indices in [0, {m.num_layers}), got {bad[:1]}")
    for key, value in m.moe_layer_kwargs.items():
        if key in MOE_LAYER_KWARGS_NO_EFFECT:
            warnings.warn(f"'model.moe_layer_kwargs.{key}' has no effect in evo (InternEvo's; accepted and ignored)",
                          UserWarning, stacklevel=3)
            continue
        near = difflib.get_close_matches(str(key), [*MOE_LAYER_KWARGS, *MOE_LAYER_KWARGS_NO_EFFECT], n=1)
        require(key in MOE_LAYER_KWARGS, f"unknown key 'model.moe_layer_kwargs.{key}'"
                + (f": did you mean '{near[0]}'?" if near else f"; known: {', '.join(MOE_LAYER_KWARGS)}"))
        require(MOE_LAYER_KWARGS[key](value), f"'model.moe_layer_kwargs.{key}' has an invalid value {value!r} "
                                              "(docs/moe.md says what each takes)")
        if key in ("capacity_factor", "drop_and_pad", "min_capacity", "eval_capacity_factor", "drop_tokens") and \
                m.moe_type != "GShard":
            warnings.warn(f"'model.moe_layer_kwargs.{key}' has no effect with moe_type '{m.moe_type}' (evo drops "
                          "tokens only under 'GShard')", UserWarning, stacklevel=3)
    if m.moe_type.startswith("MegaBlock"):
        warnings.warn(f"'model.moe_type' '{m.moe_type}' runs as 'Dropless' in evo (the same math: no token is "
                      "dropped)", UserWarning, stacklevel=3)


def check_choice(value, choices, path: str):
    """``value`` if it is one of ``choices``, else a ConfigError naming ``path`` and the choices."""
    if value not in choices:
        raise ConfigError(f"'{path}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def require(cond: bool, message: str) -> None:
    """A ConfigError with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def parse_skip_batches(spec: str) -> set[int]:
    """InternEvo's ``data.skip_batches``: "10-20,30" -> {10, ..., 20, 30} (inclusive ranges)."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"'data.skip_batches' must look like \"10-20,30\", got {spec!r}") from None
        if a > b or a < 0:
            raise ConfigError(f"'data.skip_batches' range '{part}' is empty or negative")
        out.update(range(a, b + 1))
    return out


def strip_folder_prefix(path: str) -> str:
    """InternEvo writes local paths as 'local:/x'; other backends (boto3:, volc:) are not supported."""
    if path.startswith("local:"):
        return path[len("local:"):]
    if ":" in path.split("/")[0] and not path[1:3] == ":\\":
        raise ConfigError(f"storage '{path.split(':')[0]}:' in '{path}' is not supported; use a local path or 'local:'")
    return path
