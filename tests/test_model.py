import pytest
import torch

from tests.helpers import ROOT, small_sections
from evo.config import config_from_dict, load_config
from evo.model import build_model, count_parameters
from evo.parallel import ParallelContext, build_parallel_model


@pytest.mark.parametrize("name, published", [
    ("internlm2_7b.py", 7_737_708_544),  # InternLM2-7B as published on its model card
    ("llama2_7b.py", 6_738_415_616),  # Llama-2-7B as published by Meta
    ("llama3_8b.py", 8_030_261_248),  # Meta-Llama-3-8B as published on its model card
    ("mistral_7b.py", 7_241_732_096),  # Mistral-7B-v0.1 as published
    ("qwen2_7b.py", 7_615_616_512),  # Qwen2-7B as published
    ("qwen3_8b.py", 8_190_735_360),  # Qwen3-8B as published
    ("qwen3_30b_a3b.py", 30_532_122_624),  # Qwen3-30B-A3B as published (every expert)
    ("mixtral_8x7b.py", 46_702_792_704),  # Mixtral-8x7B-v0.1 as published (every expert)
])
def test_real_configs_have_published_parameter_counts(name, published):
    cfg = load_config(ROOT / "configs" / name)
    model = build_model(cfg.model, "meta")
    assert count_parameters(model) == published
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def tiny_model(**model_overrides):
    cfg = config_from_dict(small_sections(model=model_overrides)).model
    return build_model(cfg, "cpu", seed=0), cfg


def test_packed_documents_do_not_see_each_other():
    model, cfg = tiny_model()
    a, b = torch.randint(0, cfg.vocab_size, (7,)), torch.randint(0, cfg.vocab_size, (12,))
    packed = model(torch.cat([a, b]), torch.tensor([0, 7, 19], dtype=torch.int32))
    alone_a, alone_b = model(a), model(b)
    # attention stays inside each document and rotary positions restart at 0 for b
    torch.testing.assert_close(packed[:7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[7:], alone_b, rtol=1e-5, atol=1e-5)


def test_causal_prefix_is_unaffected_by_later_tokens():
    model, cfg = tiny_model()
    x = torch.randint(0, cfg.vocab_size, (16,))
    y = x.clone()
    y[10:] = (y[10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(x)[:10], model(y)[:10])


def test_loss_path_matches_logits_and_ignores_minus_100():
    model, cfg = tiny_model()
    x = torch.randint(0, cfg.vocab_size, (10,))
    logits = model(x)
    best = logits.argmax(-1)
    labels = (best + 1) % cfg.vocab_size  # wrong everywhere but at 0, 5, 8; ignored at 3
    labels[[0, 5, 8]] = best[[0, 5, 8]]
    labels[3] = -100
    token_loss, correct = model(x, labels=labels, return_accuracy=True)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(token_loss, expected)
    assert token_loss[3] == 0
    assert int(correct) == 3


def test_activation_checkpointing_gives_the_same_gradients():
    plain, cfg = tiny_model()
    ckpt_cfg = config_from_dict(small_sections(model=dict(checkpoint=1.0))).model
    ckpt = build_parallel_model(ckpt_cfg, ParallelContext(), seed=0)  # parallelize sets the checkpointed layers
    assert all(layer.checkpointed for layer in ckpt.layers)
    x = torch.randint(0, cfg.vocab_size, (12,))
    labels = torch.roll(x, -1)
    for m in (plain, ckpt):
        m(x, labels=labels).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_same_seed_same_weights_across_dtypes_and_tied_embeddings():
    m32, _ = tiny_model()
    m16, _ = tiny_model(dtype="torch.bfloat16")
    torch.testing.assert_close(m16.layers[0].attention.wq.weight.float(), m32.layers[0].attention.wq.weight,
                               rtol=1e-2, atol=1e-3)
    assert m16.rotary._cos.dtype == torch.float32  # a dtype cast of the model leaves the rotary tables fp32
    tied, cfg = tiny_model(tie_word_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert count_parameters(tied) == count_parameters(m32) - cfg.vocab_size * cfg.hidden_size


def test_init_uses_the_config_std():
    model, _ = tiny_model(embedding_init_std=0.5, ffn_other_init_std=0.0)
    assert 0.45 < model.tok_embeddings.weight.std().item() < 0.55
    assert torch.count_nonzero(model.layers[1].feed_forward.w2.weight) == 0


def test_rotary_tables_grow_past_2048_positions_eager_and_compiled():
    """Positions past the first table (2048) rotate with the exact angles, eagerly (table regrown in
    NumPy) and inside torch.compile (torch ops in the graph instead)."""
    from evo.model.rotary import RotaryEmbedding

    plain = dict(rope_type="default", base=10000.0, max_position_embeddings=2048)
    rope = RotaryEmbedding(8, plain, interleaved=False)
    n = 2100
    x = torch.randn(n, 1, 8, dtype=torch.float64).float()
    cu = torch.tensor([0, n], dtype=torch.int32)
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    angles = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x1, x2 = x.double()[..., :4], x.double()[..., 4:]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    traced = RotaryEmbedding(8, plain, interleaved=False)
    compiled = torch.compile(lambda t: traced(t, cu, n), backend="aot_eager", fullgraph=True)
    for out in (compiled(x), rope(x, cu, n)):
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert rope._cos.shape[0] >= n and traced._cos.shape[0] == 2048  # the compiled graph builds its own


@pytest.mark.parametrize("override, message", [
    (dict(num_attention_heads=3), "'model.hidden_size' (64) must be divisible by 'model.num_attention_heads' (3), "
                                  "or 'model.head_dim' set"),
    (dict(head_dim=7), "'model.head_dim' must be even and >= 2 for rotary, got 7"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)),
     "'model.rope_scaling.rope_type' must be one of default, linear, dynamic, llama3; got 'yarn'"),
    (dict(rope_scaling=dict(type="linear")), "'model.rope_scaling.factor' is required with rope_type 'linear'"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                            original_max_position_embeddings=64)),
     "'model.rope_scaling.high_freq_factor' must be greater than 'low_freq_factor'"),
    (dict(use_dynamic_ntk_rope=True, rope_scaling=dict(rope_type="linear", factor=2.0)),
     "'model.use_dynamic_ntk_rope' is True but 'model.rope_scaling.rope_type' is 'linear': set one of them"),
    (dict(sliding_window=0), "'model.sliding_window' must be >= 1 or None, got 0"),
])
def test_bad_model_family_keys_are_one_line_errors(override, message):
    from evo.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(model=override))
    assert str(err.value) == message


def test_model_family_keys_shape_the_model():
    model, cfg = tiny_model(head_dim=24, intermediate_size=100, qkv_bias=True, qk_norm=True, sliding_window=9)
    a = model.layers[0].attention
    assert a.wq.weight.shape == (4 * 24, 64) and a.wk.weight.shape == (2 * 24, 64) and a.wo.weight.shape == (64, 96)
    assert a.wq.bias is not None and a.wo.bias is None and model.layers[0].feed_forward.w1.bias is None
    assert a.q_norm.weight.shape == (24,) and a.window == (8, 0)
    assert model.layers[0].feed_forward.w2.weight.shape == (64, 100)
    assert model(torch.randint(0, cfg.vocab_size, (3, 10))).shape == (3, 10, cfg.vocab_size)
    dynamic = config_from_dict(small_sections(model=dict(use_dynamic_ntk_rope=True))).model
    assert dynamic.rope["rope_type"] == "dynamic" and dynamic.rope["factor"] == 1.0  # InternEvo's switch
    assert config_from_dict(small_sections(model=dict(no_bias=False, o_bias=False))).model.qkv_bias is True


def test_derived_model_fields_follow_their_sources():
    """head_dim, intermediate_size, the biases and InternEvo's dynamic switch are derived where not given: a
    ModelConfig made directly works, and a saved config (to_dict) whose hidden_size is edited derives anew."""
    from evo.config import ModelConfig

    direct = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=50, dtype="torch.float32",
                         use_dynamic_ntk_rope=True, max_position_embeddings=8)
    assert direct.rope == dict(rope_type="dynamic", factor=1.0, base=10000.0, max_position_embeddings=8)
    assert build_model(direct, "cpu", seed=0)(torch.randint(0, 50, (1, 12))).shape == (1, 12, 50)  # past 8
    saved = config_from_dict(small_sections()).to_dict()
    assert saved["model"]["head_dim"] is None and saved["model"]["qkv_bias"] is None
    saved["model"]["hidden_size"] = 128
    again = config_from_dict(saved).model
    assert (again.head_dim, again.intermediate_size) == (32, 352)  # 128 / 4 heads; 128 * 8/3 up to 32s
    given = config_from_dict(small_sections(model=dict(head_dim=24))).to_dict()
    assert given["model"]["head_dim"] == 24  # what the config gave is kept


def test_model_compile_compiles_each_layer_and_matches_eager():
    """``model.compile=True``: parallelize compiles every decoder layer (inductor); loss and gradients match eager."""
    results = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        cfg = config_from_dict(small_sections(model=dict(compile=compile_, num_layers=1))).model
        model = build_parallel_model(cfg, ParallelContext(), seed=0)
        assert all((layer._compiled_call_impl is not None) == compile_ for layer in model.layers)
        ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
        loss = model(ids, torch.tensor([0, 9, 24], dtype=torch.int32), 15, labels=torch.roll(ids, -1))
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
