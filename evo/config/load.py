"""Python config files -> typed, validated config objects.

A config is a Python file whose module-level names are the config, with InternEvo's sections and
field names (``JOB_NAME``, ``model``, ``data``, ``parallel``, ``adam``, ``lr_scheduler``,
``grad_scaler``, ``hybrid_zero_optimizer``, ``loss``, ``ckpt``, ``monitor``). A config may import
names from another config file in its folder (``from base import *``), as InternEvo's do.

Loading happens once, at start: ``load_config(path, overrides)`` executes the file, applies
``KEY=VALUE`` overrides (dotted paths into the nested dicts), and validates everything into the
dataclasses of evo/config/sections.py (the checks that types alone cannot make live in evo/config/checks.py). Errors are
``ConfigError`` with one line naming the key and what is allowed; unknown keys are ignored with a warning
naming them.
"""

from __future__ import annotations

import ast
import dataclasses
import runpy
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from evo.config.checks import check_choice, validate
from evo.config.sections import MODEL_TYPES, MOE_MODEL_TYPES, REQUIRED, SECTIONS, TOP_LEVEL_SWITCHES, Config
from evo.errors import ConfigError

# InternEvo keys that evo accepts without a warning but that change nothing here (they tune
# InternEvo's own machinery: alerting, upload queues, ...).
_ACCEPTED_NO_EFFECT = {
    "model": {"embed_split_hidden", "embed_grad_scale", "parallel_output", "use_flash_attn",
              "adapt_hf", "mlp_layer_fusion", "use_scaled_init", "use_swiglu",
              "deepnorm", "residual_in_fp32", "fused_dropout_add_ln", "moe_use_residual"},
    "data": {"rampup_batch_size", "empty_cache_and_diag_interval", "diag_outlier_ratio", "num_worker",
             "fixed_random_dataset_seqlen", "gradient_accumulation"},
    "hybrid_zero_optimizer": {"overlap_sync_grad", "overlap_sync_param", "reduce_bucket_size",
                              "zero_overlap_communication"},
    "ckpt": {"async_upload_tmp_folder", "oss_snapshot_freq",
             "snapshot_ckpt_folder", "load_optimizer", "universal_ckpt"},
    "monitor": {"alert"},
}
# InternEvo keys of settings a reader could expect to work, accepted with a warning that names them: evo has no
# communication overlap or memory pool to tune (parallel.*); AdamW's beta2 does not follow a schedule here; the
# lr schedule starts where the checkpoint's counters say (lr_scheduler.last_epoch); checkpoints load through
# ckpt.load_ckpt_info (ckpt.load_ckpt_folder); TensorBoard is always written, untuned (monitor.tensorboard).
_ACCEPTED_WITH_WARNING = {"parallel": {"interleaved_overlap", "overlap", "memory_pool", "expert_weight"}, "adam": {"adam_beta2_c"},
                          "lr_scheduler": {"last_epoch"}, "ckpt": {"load_ckpt_folder"}, "monitor": {"tensorboard"}}
_TOP_LEVEL_NO_EFFECT = {"DO_ALERT", "model_type", "cudnn_deterministic", "cudnn_benchmark", "use_fp32_norm",
                        "beta2_scheduler", "generation"}

def parse_value(text: str) -> Any:
    """A command-line VALUE: a Python literal when it is one (``dict(size=2, mode="1F1B")`` and ``2**16`` included:
    parsed, never run), else the plain string."""
    try:
        return _literal(ast.parse(text.strip(), mode="eval").body)
    except (ValueError, SyntaxError, TypeError, ArithmeticError, RecursionError):
        return text


# no + or -: "10-20" (data.skip_batches) and "2024-12-16" stay the strings they are
_ARITHMETIC = {ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}


def _literal(node: ast.AST) -> Any:
    """What ``ast.literal_eval`` reads (but complex numbers), plus ``dict(key=literal, ...)``, ``list(...)``/``tuple(...)``
    of one literal, and ``*``, ``/`` and ``**`` of numbers (``2**16``, ``8/3``): the forms config files use. Anything
    else is a ValueError."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_literal(node.operand))
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _number(_literal(node.left)), _number(_literal(node.right))
        if isinstance(node.op, ast.Pow) and abs(right) > 1024:
            raise ValueError("exponent too large")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "dict" and not node.args and all(k.arg for k in node.keywords):
            return {k.arg: _literal(k.value) for k in node.keywords}
        if node.func.id in ("list", "tuple") and len(node.args) == 1 and not node.keywords:
            return {"list": list, "tuple": tuple}[node.func.id](_literal(node.args[0]))
    raise ValueError(f"not a literal: {ast.dump(node)[:60]}")


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply ``KEY=VALUE`` strings (dotted KEY into nested dicts) to the raw config namespace."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. data.total_steps=20")
        *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"override '{item}': '{where}' is a {type(child).__name__}, not a section")
            node = child
        node[leaf] = parse_value(value)


def read_config_file(path: str | Path) -> dict:
    """Execute a config file and return its public module-level names (sections and constants).

    The file's folder is put on ``sys.path`` while it runs, so it can import a base config beside it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    before = set(sys.modules)
    try:
        namespace = runpy.run_path(str(path), run_name="__evo_config__")
    except ConfigError:
        raise
    except Exception as exc:  # a config that does not execute is bad input, not an evo bug
        raise ConfigError(f"config file '{path}' failed to execute: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
        # base configs imported by this file must not leak into the next load (overrides mutate them)
        for name in set(sys.modules) - before:
            mod = sys.modules[name]
            if getattr(mod, "__file__", None) and str(Path(mod.__file__).resolve().parent) == folder:
                del sys.modules[name]
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def load_config(path: str | Path, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Read, override and validate a config file into a :class:`Config` (its layout checked against
    ``world_size`` when given)."""
    raw = read_config_file(path)
    raw = _deepcopy_dicts(raw)
    apply_overrides(raw, list(overrides or []))
    cfg = config_from_dict(raw, world_size)
    cfg.source = str(path)
    return cfg


def resolve_config(config, overrides=None, world_size: int | None = None) -> Config:
    """The validated ``Config`` of ``initialize_distributed_env``'s ``config``: a file path (with the command
    line's overrides, or ``overrides``), a dict of sections, or a ``Config`` made by hand (checked, and its folders
    resolved, as a loaded one's are); the layout checked against ``world_size`` when given."""
    if isinstance(config, Config):
        validate(config, world_size)
        return config
    if isinstance(config, dict):
        return config_from_dict(config, world_size)
    overrides = list(overrides if overrides is not None else getattr(config, "overrides", ()))
    return load_config(str(config), overrides, world_size)


def config_from_dict(raw: dict, world_size: int | None = None) -> Config:
    """Validate a config namespace (sections as dicts) into a :class:`Config` (its layout checked against
    ``world_size`` when given)."""
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name in SECTIONS or name == "model":
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' must be a dict, got {type(value).__name__}")
            kwargs[name] = _build(_section_type(name), value, name)
        elif name == "JOB_NAME":
            kwargs[name] = _check_type(value, str, name)
        elif name in TOP_LEVEL_SWITCHES:
            kwargs[name] = _check_type(value, bool, name)
        elif name == "source":  # a saved config's (to_dict) record of its file
            kwargs[name] = _check_type(value, Optional[str], name)
        elif name == "model_type":
            kwargs[name] = check_choice(_check_type(value, str, name), MODEL_TYPES, name)
        elif name == "extra":  # the config's own keys: carried, never checked (but saved: string keys)
            kwargs[name] = _check_type(value, dict, name)
            if not all(isinstance(key, str) for key in value):
                raise ConfigError(f"'extra' keys must be strings (config.json saves them), got {list(value)!r}")
        elif name.isupper() or name in _TOP_LEVEL_NO_EFFECT:
            continue  # constants such as SEQ_LEN, and InternEvo switches evo has no use for
        else:
            raise ConfigError(unknown_key(name))
    if "model" not in kwargs:
        raise ConfigError("'model' is required: a dict with num_layers, hidden_size, num_attention_heads, vocab_size")
    cfg = Config(**kwargs)
    validate(cfg, world_size)
    return cfg


def model_config(section: dict, model_type: str | None = None):
    """A ``model`` section validated on its own, as a checkpoint or a weights folder holds one: the ModelConfig.
    ``model_type``: the one the section was saved with; None (a folder that records none) means a dense type, or
    for a section with experts InternEvo's first MoE type (the type only labels the config: one decoder builds
    every model)."""
    if model_type is None:
        experts = section.get("num_experts", 1)
        model_type = MOE_MODEL_TYPES[0] if isinstance(experts, int) and experts > 1 else "INTERNLM2_PUBLIC"
    return config_from_dict({"model": section, "model_type": model_type}).model


def _section_type(name: str):
    return typing.get_type_hints(Config)[name]


def _deepcopy_dicts(obj):
    if isinstance(obj, dict):
        return {k: _deepcopy_dicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy_dicts(v) for v in obj]
    return obj


def _build(cls, raw: dict, where: str):
    """Build dataclass ``cls`` from dict ``raw``, checking every value against its annotation."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    section = where.split(".")[0]
    kwargs = {}
    raw = _newer_names(raw, where)
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key not in known:
            _not_a_field(section, key, path, value)
            continue
        kwargs[key] = _convert(value, hints[key], path)
    for f in dataclasses.fields(cls):
        if f.default is REQUIRED and f.name not in kwargs:
            raise ConfigError(f"'{where}.{f.name}' is required ({_type_name(hints[f.name])})")
    return cls(**kwargs)


_OLDER_NAMES = {"model.moe_gate_k": "model.top_k"}  # InternEvo's earlier name of a key -> its current one


def _newer_names(raw: dict, where: str) -> dict:
    """``raw`` with InternEvo's older key names under their current ones (both given: they must agree)."""
    out = dict(raw)
    for old, new in _OLDER_NAMES.items():
        section, old_key = old.rsplit(".", 1)
        new_key = new.rsplit(".", 1)[1]
        if section == where and old_key in out:
            value = out.pop(old_key)
            if new_key in out and out[new_key] != value:
                raise ConfigError(f"'{old}' ({value!r}) is the older name of '{new}' ({out[new_key]!r}): give one")
            out[new_key] = value
    return out


def _not_a_field(section: str, key: str, path: str, value) -> None:
    """A key with no field in its section: accepted silently, with a warning naming it, or refused."""
    if key in _ACCEPTED_WITH_WARNING.get(section, ()):
        warnings.warn(f"config key '{path}' has no effect in evo (InternEvo's; accepted and ignored)", UserWarning,
                      stacklevel=4)
    elif key not in _ACCEPTED_NO_EFFECT.get(section, ()):
        raise ConfigError(unknown_key(path))


def known_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every config key as a dotted path (``model.num_layers``, ``grad_scaler.fp16.min_scale``, ...)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += known_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def unknown_key(path: str) -> str:
    """The one line for a key evo does not know: the closest key of the same section (a typo's), and where a
    config's own keys go."""
    import difflib

    parent, _, leaf = path.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known_keys() if k.rpartition(".")[0] == parent and k != "source"}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.8)
    hint = f"did you mean '{siblings[close[0]]}'?" if close else "see docs/config.md for the keys"
    return (f"unknown config key '{path}': {hint} (a key of your own goes in the top-level 'extra' dict; "
            "ALL_CAPS names are constants and are ignored)")


def _convert(value, annotation, path: str):
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, int) and not isinstance(value, bool) and "size" in {f.name for f in dataclasses.fields(annotation)}:
            value = {"size": value}  # InternEvo allows parallel=dict(tensor=2) for dict(size=2)
        if not isinstance(value, dict):
            first = dataclasses.fields(annotation)[0].name
            raise ConfigError(f"'{path}' must be a dict, got {value!r}: write dict(...) with literal values, e.g. "
                              f"{path}=dict({first}=...), or set one key, e.g. {path}.{first}=...")
        return _build(annotation, value, path)
    return _check_type(value, annotation, path)


def _check_type(value, annotation, path: str):
    origin = typing.get_origin(annotation)
    if origin is Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"'{path}' must be {_type_name(annotation)}, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
        return int(value)
    if annotation is dict and isinstance(value, dict):
        return value
    if annotation is list and isinstance(value, (list, tuple)):
        return list(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"'{path}' must be {_type_name(annotation)}, got {value!r}")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return {type(None): "None", int: "an int", float: "a number", str: "a string", bool: "True or False",
            dict: "a dict", list: "a list"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
