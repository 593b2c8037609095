"""Hugging Face's Llama-family models in evo's terms: config fields and parameter names.

``model_config_from_hf`` turns a transformers config of one of ``FAMILIES`` (a ``PretrainedConfig`` or
its dict) into evo's ``model`` section; ``state_dict_from_hf`` / ``state_dict_to_hf`` rename the
tensors. The tensors themselves need no change: evo's decoder uses the same layouts (rotary in the
GPT-NeoX halves layout, ``nn.Linear`` weights as (out, in)). The tests check every family against
transformers' own model on the same weights.
"""

from __future__ import annotations

import re

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# evo name -> Hugging Face name, per layer (``{}`` is the layer index)
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, evo's rope_scaling or None) from transformers 5's ``rope_parameters`` or the older fields."""
    params = _get(config, "rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", _get(config, "rope_theta", 10000.0))
    else:
        theta, params = _get(config, "rope_theta", 10000.0), dict(_get(config, "rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    keep = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    return float(theta), dict({k: v for k, v in params.items() if k in keep}, rope_type=kind)


def model_config_from_hf(config) -> dict:
    """evo's ``model`` section for a transformers config of a family in ``FAMILIES``."""
    family = _get(config, "model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not one of evo's families: {', '.join(FAMILIES)}")
    if _get(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {_get(config, 'hidden_act')!r}: evo's MLP is SwiGLU (silu)")
    heads, hidden, layers = _get(config, "num_attention_heads"), _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    theta, scaling = _rope(config)
    partial = (_get(config, "rope_parameters") or {}).get("partial_rotary_factor",
                                                          _get(config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial}: evo rotates the whole head")
    attention_bias = bool(_get(config, "attention_bias", False))
    sliding = _get(config, "sliding_window") if family == "mistral" else None
    if family in ("qwen2", "qwen3") and _get(config, "use_sliding_window", False) and _get(config, "sliding_window"):
        # transformers windows the layers from max_window_layers on (or as layer_types says)
        first = _get(config, "max_window_layers", 0)
        types = _get(config, "layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                                for i in range(layers)]
        if set(types) != {"sliding_attention"}:
            raise ValueError("a window on some layers only (layer_types, max_window_layers) is not supported: evo "
                             "windows every layer or none")
        sliding = _get(config, "sliding_window")
    return dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_kv_attention_heads=_get(config, "num_key_value_heads") or heads,
        head_dim=_get(config, "head_dim") or hidden // heads, vocab_size=_get(config, "vocab_size"),
        intermediate_size=_get(config, "intermediate_size"), layer_norm_epsilon=float(_get(config, "rms_norm_eps")),
        rope_base=theta, rope_scaling=scaling, qk_interleaved=False,
        max_position_embeddings=_get(config, "max_position_embeddings", 2048),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(_get(config, "mlp_bias", False)), qk_norm=family == "qwen3", sliding_window=sliding,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
    )


def _rename(name: str, layer_names: dict, top_names: dict, layer_prefix: tuple[str, str]) -> str:
    src_prefix, dst_prefix = layer_prefix
    m = re.match(rf"{re.escape(src_prefix)}(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        index, module, kind = m.groups()
        if module in layer_names:
            return f"{dst_prefix}{index}.{layer_names[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    if module in top_names:
        return f"{top_names[module]}.{kind}"
    raise KeyError(f"no counterpart for parameter {name!r}")


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict:
    """evo's state dict (same tensors, evo's names) from a transformers one; rotary buffers are dropped."""
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    top_names = {v: k for k, v in _TOP_NAMES.items()}
    out = {_rename(k, layer_names, top_names, ("model.layers.", "layers.")): v for k, v in hf_state.items()
           if not k.endswith("rotary_emb.inv_freq")}
    if tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict:
    """A transformers state dict (Hugging Face's names) from evo's; a tied head is left out, as transformers saves it."""
    return {_rename(k, _LAYER_NAMES, _TOP_NAMES, ("layers.", "model.layers.")): v for k, v in state.items()
            if not (tie_word_embeddings and k == "output.weight")}
