"""The model families evo builds, each against transformers' own model of that family on the same
weights (small random models built here; nothing downloaded): logits of batched and packed inputs,
the rotary scalings, and generation with the KV cache."""

import pytest
import torch
import transformers

from evo import kernels
from evo.config import config_from_dict
from evo.generate import generate_ids
from evo.model import build_model
from evo.model.hf import model_config_from_hf, state_dict_from_hf, state_dict_to_hf

VOCAB = 101
HF_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
              # the mixtures of experts (tests/test_moe_hf.py)
              "qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig,
              "qwen2_moe": transformers.Qwen2MoeConfig}

# name -> (family, transformers config fields, an evo model override that removes the feature under test:
# with it the logits must differ, which shows the comparison can see that feature)
CASES = {
    "llama2": ("llama", dict(num_key_value_heads=4), dict(qk_interleaved=True)),
    "llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=16)), dict(rope_scaling=None)),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
                     dict(rope_scaling=None)),
    "llama-dynamic": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
                                    max_position_embeddings=16), dict(rope_scaling=None)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True), None),
    "mistral": ("mistral", dict(sliding_window=7), dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True), None),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True), None),
}


def hf_model(family, dtype=torch.float64, **fields):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    config = HF_CONFIGS[family](**dict(base, **fields))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too, so each one matters
            p.normal_(0.0, 0.3)
    return model


def evo_twin(hf, dtype="torch.float32", **override):
    """evo's model of hf's config with hf's weights (fp64 when dtype is fp32, for a tight comparison)."""
    fields = dict(model_config_from_hf(hf.config), dtype=dtype, **override)
    cfg = config_from_dict({"model": fields}).model
    model = build_model(cfg, "cpu", seed=0)
    if dtype == "torch.float32":
        model = model.double()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg.tie_word_embeddings), strict=True)
    return model.eval()


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_family_logits_match_transformers(name):
    family, fields, knockout = CASES[name]
    hf = hf_model(family, **fields)
    model = evo_twin(hf)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        batched = model(ids)
        # packed: the two rows and a short third document in one row, attention and positions per document
        short = ids[1, :11]
        packed = model(torch.cat([ids[0], ids[1], short]), torch.tensor([0, 40, 80, 91], dtype=torch.int32))
        expected_short = hf(short[None]).logits[0]
    assert batched.shape == (2, 40, VOCAB)
    # fp64 on both sides; what is left is transformers' fp32 rotary angles
    assert max_diff(batched, expected) < 1e-5
    assert max_diff(packed[:80], expected.reshape(80, VOCAB)) < 1e-5
    if name != "llama-dynamic":  # dynamic scaling uses the longest document's table for the whole row, as a
        assert max_diff(packed[80:], expected_short) < 1e-5  # transformers batch uses its longest row's
    if knockout is not None:
        with torch.no_grad():
            assert max_diff(evo_twin(hf, **knockout)(ids), expected) > 1e-2


def test_dynamic_ntk_tables_follow_the_sequence_length():
    """Dynamic scaling builds its tables per length (past max_position_embeddings = 16): 40, 10 (unscaled),
    30 and 40 again each match a fresh transformers model of that length."""
    family, fields, _ = CASES["llama-dynamic"]
    model = evo_twin(hf_model(family, **fields))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    for length in (40, 10, 30, 40):
        with torch.no_grad():  # transformers keeps the longest length's frequencies: a fresh model per length
            expected = hf_model(family, **fields)(ids[:, :length]).logits
            assert max_diff(model(ids[:, :length]), expected) < 1e-5, length


# transformers' name -> evo's, written out by hand (evo/model's modules; Qwen3: q and k norms), for layer 1
HF_TO_EVO = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.1.{theirs}.weight": f"layers.1.{ours}.weight" for theirs, ours in (
        ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
        ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
        ("self_attn.q_norm", "attention.q_norm"), ("self_attn.k_norm", "attention.k_norm"),
        ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
        ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"))},
}


def test_hf_names_map_as_written_out_and_round_trip():
    hf = hf_model("qwen3", head_dim=24)
    state = hf.state_dict()
    ours = state_dict_from_hf(state)
    for theirs, name in HF_TO_EVO.items():
        assert ours[name] is state[theirs], (theirs, name)
    assert set(ours) == set(evo_twin(hf).state_dict())  # every name one evo's model has
    back = state_dict_to_hf(ours)
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("name", ["mistral", "qwen3", "llama-dynamic"])
def test_greedy_generation_matches_transformers(name):
    """Prompt 9 tokens, 24 new (past the window of 7, past dynamic scaling's 16 positions): the same tokens as
    transformers' generate with its own KV cache."""
    family, fields, _ = CASES[name]
    hf = hf_model(family, **fields)
    model = evo_twin(hf)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                           pad_token_id=0)[0, 9:].tolist()
    assert generate_ids(model, prompt[0].tolist(), 24, temperature=0.0) == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_cache_steps_match_the_full_forward(backend):
    """Prefill two rows of 9 tokens, then decode one token at a time: each step's logits equal the last
    position of a full forward over the sequence so far (window, GQA, qk_norm, biases: Qwen3-like)."""
    hf = hf_model("qwen3", head_dim=24, use_sliding_window=True, sliding_window=5, layer_types=None,
                  max_window_layers=0)
    model = evo_twin(hf, dtype="torch.float32").float()
    total = 15 if backend == "torch" else 12  # the interpreter runs a decode step in about a second
    seq = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(4))
    cache = model.new_kv_cache(2, total)
    with torch.no_grad(), kernels.use_backend(backend):
        steps = [model(seq[:, :9], kv_cache=cache)]
        for t in range(9, total):
            steps.append(model(seq[:, t:t + 1], kv_cache=cache))
        full = model(seq)
    assert cache.length == total and cache.seqlens.tolist() == [total, total]
    torch.testing.assert_close(steps[0], full[:, :9], rtol=1e-4, atol=1e-4)
    for i, step in enumerate(steps[1:]):
        torch.testing.assert_close(step[:, 0], full[:, 9 + i], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=f"KV cache holds {total} positions"):
        model(seq[:, :1], kv_cache=cache)


def test_sampling_keeps_what_top_k_and_top_p_allow():
    from evo.generate import sample_next

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    gen = torch.Generator().manual_seed(0)

    def support(**kw):
        return {int(sample_next(logits, generator=gen, **kw)[0]) for _ in range(400)}

    assert int(sample_next(logits, temperature=0.0)[0]) == 1
    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {1, 3}
    assert support(top_p=0.8) == {1, 3}  # 0.5 + 0.3 reach 0.8: the rest is cut
    assert support(top_p=0.81) == {1, 2, 3}
    assert support(top_p=0.01) == {1}  # the most likely token always stays


def test_hf_configs_evo_cannot_compute_are_refused():
    """What evo's decoder cannot compute is an error, not a silently different model."""
    qwen = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=1)  # a window on the second layer only
    for config in (qwen, {k: v for k, v in qwen.to_dict().items() if k != "layer_types"}):
        with pytest.raises(ValueError, match="a window on some layers only"):
            model_config_from_hf(config)
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        model_config_from_hf(transformers.LlamaConfig(num_hidden_layers=1, partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        model_config_from_hf(transformers.GPT2Config())
