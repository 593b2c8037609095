"""Hugging Face's Llama-family models in evo's terms: config fields and parameter names.

``model_config_from_hf`` turns a transformers config of one of ``FAMILIES`` (a ``PretrainedConfig`` or
its dict) into evo's ``model`` section; ``state_dict_from_hf`` / ``state_dict_to_hf`` rename the
tensors. The tensors themselves need no change: evo's decoder uses the same layouts (rotary in the
GPT-NeoX halves layout, ``nn.Linear`` weights as (out, in)). The tests check every family against
transformers' own model on the same weights. ``hf_config_from_model`` is the way back (a ``config.json`` for
an evo model), and the InternLM2 functions at the end read and write InternLM2's own layout (packed ``wqkv``).
"""

from __future__ import annotations

import re

import torch

from evo.model.decoder import tied_name

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe")
MOE_FAMILIES = {"qwen3_moe": "qwen3", "mixtral": "mistral", "qwen2_moe": "qwen2"}  # -> the dense family around them

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
    if family in MOE_FAMILIES:
        section = _dense_config_from_hf(config, MOE_FAMILIES[family])
        return {**section, **_moe_config_from_hf(config, family)}
    return _dense_config_from_hf(config, family)


def _dense_config_from_hf(config, family: str) -> dict:
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


def hf_name(name: str) -> str:
    """transformers' name of evo's parameter ``name`` ("layers.3.attention.wq.weight" ->
    "model.layers.3.self_attn.q_proj.weight"); KeyError for a name it has no counterpart for."""
    return _rename(name, _LAYER_NAMES, _TOP_NAMES, ("layers.", "model.layers."))


def evo_name(name: str) -> str:
    """evo's name of transformers' parameter ``name``, the inverse of ``hf_name``."""
    return _rename(name, _EVO_LAYER_NAMES, _EVO_TOP_NAMES, ("model.layers.", "layers."))


_EVO_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_EVO_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict:
    """evo's state dict (same tensors, evo's names) from a transformers one; rotary buffers are dropped."""
    out = {evo_name(k): v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if tie_word_embeddings:
        out["output.weight"] = out[tied_name("output.weight", True)]
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict:
    """A transformers state dict (Hugging Face's names) from evo's; a tied head is left out, as transformers saves it."""
    return {hf_name(k): v for k, v in state.items() if not (tie_word_embeddings and k == "output.weight")}


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}


def hf_family(cfg) -> str:
    """The transformers family that computes what evo's model config ``cfg`` does, or ValueError saying why none
    does: q/k norms are Qwen3's, q/k/v biases without an output bias Qwen2's, a sliding window Mistral's (or
    Qwen2's), the rest Llama's (biases all or none); with experts, their MoE families (``moe_family``)."""
    dense = _dense_family(cfg)
    return moe_family(cfg, dense) if cfg.num_experts > 1 else dense


def _dense_family(cfg) -> str:
    attention_bias = cfg.qkv_bias and cfg.o_bias
    if cfg.qk_norm:
        family = "qwen3"
        ok = cfg.qkv_bias == cfg.o_bias and not cfg.mlp_bias
    elif cfg.qkv_bias and not cfg.o_bias:
        family = "qwen2"
        ok = not cfg.mlp_bias
    elif cfg.sliding_window:
        family = "mistral"
        ok = not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    else:
        family = "llama"
        ok = cfg.qkv_bias == cfg.o_bias
    if not ok:
        raise ValueError(f"no transformers family has this model's biases (qkv_bias={cfg.qkv_bias}, "
                         f"o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}, qk_norm={cfg.qk_norm}); attention_bias="
                         f"{attention_bias} in {family} would compute another function")
    if cfg.sliding_window and family == "qwen3":
        raise ValueError("q/k norms with a sliding window: no transformers family computes that")
    return family


def hf_config_from_model(cfg, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """transformers' ``config.json`` for evo's model config ``cfg``, every field written out (transformers'
    defaults are not evo's: rms_norm_eps 1e-6 against evo's 1e-5, rope_theta, tie_word_embeddings, ...)."""
    family = hf_family(cfg)
    dense = MOE_FAMILIES.get(family, family)
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_base)}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
        rope["rope_type"] = cfg.rope_scaling.get("rope_type", "default")
    legacy_scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    dtype = str(cfg.torch_dtype).replace("torch.", "")
    out = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": float(cfg.layer_norm_epsilon),
        "rope_theta": float(cfg.rope_base), "rope_scaling": legacy_scaling, "rope_parameters": rope,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings), "initializer_range": 0.02, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if dense == "llama":
        out.update(attention_bias=bool(cfg.qkv_bias), mlp_bias=bool(cfg.mlp_bias), pretraining_tp=1)
    elif dense == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif dense == "qwen2":
        out.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window,
                   max_window_layers=0 if cfg.sliding_window else cfg.num_layers)
    else:
        out.update(attention_bias=bool(cfg.qkv_bias), use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.num_layers)
    if family in MOE_FAMILIES:
        out.update(_moe_config_to_hf(cfg, family))
    return out


# ---------------------------------------------------------------------------------------------- mixtures of experts
# transformers 5 holds a layer's experts fused in memory but saves them one by one (save_pretrained's conversion
# mapping): model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight and mlp.gate.weight (Qwen3-MoE,
# Qwen2-MoE, whose shared expert is mlp.shared_expert.* with mlp.shared_expert_gate.weight), and for Mixtral
# model.layers.{i}.block_sparse_moe.experts.{e}.w1|w3|w2.weight and block_sparse_moe.gate.weight. evo's layer holds
# them as 3-D weights: feed_forward.experts.w1 and w3 (E, I, H) stack the experts' gate and up projections, w2
# (E, H, I) their down projections.
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _moe_config_from_hf(config, family: str) -> dict:
    if family == "mixtral" and _get(config, "router_jitter_noise", 0.0):
        raise ValueError(f"router_jitter_noise {_get(config, 'router_jitter_noise')}: evo's router has no noise")
    experts = _get(config, "num_experts") or _get(config, "num_local_experts")
    width = _get(config, "intermediate_size") if family == "mixtral" else _get(config, "moe_intermediate_size")
    section = dict(num_experts=experts, top_k=_get(config, "num_experts_per_tok"), moe_type="Dropless",
                   moe_intermediate_size=width, moe_layer_kwargs=dict(
                       scoring_func="softmax",
                       normalize_expert_weights=family == "mixtral" or bool(_get(config, "norm_topk_prob", False))))
    if family != "mixtral":
        section.update(decoder_sparse_step=_get(config, "decoder_sparse_step", 1),
                       mlp_only_layers=list(_get(config, "mlp_only_layers") or []))
    if family == "qwen2_moe":
        section.update(num_shared_experts=1, shared_expert_gate=True,
                       shared_expert_intermediate_size=_get(config, "shared_expert_intermediate_size"))
    return section


def moe_family(cfg, dense: str) -> str:
    """The transformers MoE family computing evo's MoE model ``cfg`` (its attention that of family ``dense``), or
    ValueError: q/k norms make Qwen3-MoE, a gated shared expert Qwen2-MoE, neither Mixtral."""
    kw = cfg.moe_layer_kwargs
    if cfg.moe_type == "GShard" or kw.get("scoring_func", "softmax") != "softmax" or \
            float(kw.get("routed_scaling_factor", 1.0)) != 1.0:
        raise ValueError("transformers' MoE blocks route by softmax, drop no token and scale nothing: this model's "
                         f"moe_type {cfg.moe_type!r} / moe_layer_kwargs {kw} compute another function")
    family = {"qwen3": "qwen3_moe", "qwen2": "qwen2_moe", "mistral": "mixtral", "llama": "mixtral"}[dense]
    if cfg.num_shared_experts:
        family = "qwen2_moe"
        ok = cfg.shared_expert_gate and dense == "qwen2"
    elif family == "mixtral":
        ok = kw.get("normalize_expert_weights", True) and cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers
    else:
        ok = family == "qwen3_moe"
    if not ok:
        raise ValueError(f"no transformers MoE family has this model's layout (attention as {dense}, "
                         f"num_shared_experts={cfg.num_shared_experts}, shared_expert_gate={cfg.shared_expert_gate}, "
                         f"decoder_sparse_step={cfg.decoder_sparse_step}, mlp_only_layers={cfg.mlp_only_layers})")
    return family


def _moe_config_to_hf(cfg, family: str) -> dict:
    out = {"num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": 0.001, "output_router_logits": False}
    if family == "mixtral":
        return {**out, "num_local_experts": cfg.num_experts, "intermediate_size": cfg.moe_intermediate_size,
                "router_jitter_noise": 0.0}
    out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
               norm_topk_prob=bool(cfg.moe_layer_kwargs.get("normalize_expert_weights", True)),
               decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=True)
    return out


def hf_moe_names(name: str, family: str, num_experts: int) -> list[str] | None:
    """transformers' names of evo's MoE parameter ``name`` in ``family``: one per expert for the 3-D expert
    weights, one for the router and the shared experts; None for a parameter outside a MoE block."""
    m = re.match(r"layers\.(\d+)\.feed_forward\.(gate\.weight|experts\.(w[123])|shared_experts\.(w[123])\.weight|"
                 r"shared_expert_gate\.weight)$", name)
    if m is None:
        return None
    layer, part, expert, shared = m.groups()
    block = f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}"
    if expert:
        proj = expert if family == "mixtral" else _EXPERT_NAMES[expert]
        return [f"{block}.experts.{e}.{proj}.weight" for e in range(num_experts)]
    if shared:
        return [f"{block}.shared_expert.{_EXPERT_NAMES[shared]}.weight"]
    return [f"{block}.{part}"]


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (or a bias) of a q or k projection for GPT-J pairs (rotary on dims 2i, 2i+1: evo's
    ``qk_interleaved=True``) reordered for GPT-NeoX halves (i, i + d/2: transformers' layout), head by head."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows = weight.reshape(-1, head_dim, *weight.shape[1:])
    return rows[:, order].reshape(weight.shape)


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_halves``: rows for GPT-NeoX halves reordered for GPT-J pairs."""
    order = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2, head_dim)], dim=1).flatten()
    rows = weight.reshape(-1, head_dim, *weight.shape[1:])
    return rows[:, order].reshape(weight.shape)


# InternLM2's own layout (InternLM's Hugging Face repos, remote code): the names are evo's under "model." (the
# head is "output"), and each layer's q, k and v projections are one "attention.wqkv": for every kv head, the
# rows of its query heads, then its key head, then its value head ("(h gs d)", gs = heads / kv heads + 2).
INTERNLM2 = "internlm2"


def internlm2_config_from_model(cfg, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """InternLM2's ``config.json`` (InternLM2Config's fields) for evo's model config ``cfg``, or ValueError."""
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError(f"InternLM2 has head_dim = hidden_size / heads; this model's head_dim is {cfg.head_dim}")
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias or cfg.qk_norm or cfg.sliding_window:
        raise ValueError("InternLM2 has one bias switch for wqkv and wo, and no MLP bias, q/k norms or window")
    scaling = cfg.rope_scaling
    if scaling and scaling.get("rope_type") not in ("linear", "dynamic"):
        raise ValueError(f"InternLM2 scales rotary as linear or dynamic only, not {scaling.get('rope_type')!r}")
    dtype = str(cfg.torch_dtype).replace("torch.", "")
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": INTERNLM2,
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": float(cfg.layer_norm_epsilon),
        "bias": bool(cfg.qkv_bias), "rope_theta": float(cfg.rope_base),
        "rope_scaling": {"type": scaling["rope_type"], "factor": scaling["factor"]} if scaling else None,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings), "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "attn_implementation": "eager",
        "torch_dtype": dtype,
    }


def model_config_from_internlm2(config) -> dict:
    """evo's ``model`` section for an InternLM2 ``config.json``."""
    heads, hidden = _get(config, "num_attention_heads"), _get(config, "hidden_size")
    scaling = _get(config, "rope_scaling")
    bias = bool(_get(config, "bias", True))
    return dict(
        num_layers=_get(config, "num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_kv_attention_heads=_get(config, "num_key_value_heads") or heads, head_dim=hidden // heads,
        vocab_size=_get(config, "vocab_size"), intermediate_size=_get(config, "intermediate_size"),
        layer_norm_epsilon=float(_get(config, "rms_norm_eps", 1e-6)), rope_base=float(_get(config, "rope_theta", 1e4)),
        rope_scaling={"rope_type": scaling["type"], "factor": scaling["factor"]} if scaling else None,
        qk_interleaved=False, max_position_embeddings=_get(config, "max_position_embeddings", 2048),
        qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=False, sliding_window=None,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
    )


def internlm2_name(evo_name: str) -> str:
    """InternLM2's name of an evo tensor other than wq, wk, wv (those are packed: ``pack_wqkv``)."""
    return evo_name if evo_name.startswith("output.") else f"model.{evo_name}"


def pack_wqkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One layer's wqkv rows (or bias) from its q, k, v projections: per kv head, its query heads, key, value."""
    q, k, v = (w.reshape(kv_heads, -1, *w.shape[1:]) for w in (wq, wk, wv))
    return torch.cat([q, k, v], dim=1).reshape(-1, *wq.shape[1:])


def unpack_wqkv(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """(wq, wk, wv) from one layer's wqkv rows (or bias), the inverse of ``pack_wqkv``."""
    groups = wqkv.reshape(kv_heads, heads // kv_heads + 2, head_dim, *wqkv.shape[1:])
    rest = wqkv.shape[1:]
    return (groups[:, :-2].reshape(-1, *rest), groups[:, -2].reshape(-1, *rest), groups[:, -1].reshape(-1, *rest))
