import pytest
import torch

from helpers import ROOT, small_sections
from evo.config import config_from_dict, load_config
from evo.model import build_model, count_parameters


@pytest.mark.parametrize("name, published", [
    ("internlm2_7b.py", 7_737_708_544),  # InternLM2-7B as published on its model card
    ("llama2_7b.py", 6_738_415_616),  # Llama-2-7B as published by Meta
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
    labels = torch.randint(0, cfg.vocab_size, (10,))
    labels[3] = -100
    token_loss, correct = model(x, labels=labels, return_accuracy=True)
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(token_loss, expected)
    assert token_loss[3] == 0
    assert int(correct) == int(((logits.argmax(-1) == labels) & (labels != -100)).sum())


def test_activation_checkpointing_gives_the_same_gradients():
    plain, cfg = tiny_model()
    ckpt, _ = tiny_model(checkpoint=1.0)
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
    from evo.model.decoder import RotaryEmbedding

    rope = RotaryEmbedding(8, 10000.0, interleaved=False)
    n = 2100
    x = torch.randn(n, 1, 8, dtype=torch.float64).float()
    cu = torch.tensor([0, n], dtype=torch.int32)
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    angles = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x1, x2 = x.double()[..., :4], x.double()[..., 4:]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    traced = RotaryEmbedding(8, 10000.0, interleaved=False)
    compiled = torch.compile(lambda t: traced(t, cu, n), backend="aot_eager", fullgraph=True)
    for out in (compiled(x), rope(x, cu, n)):
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert rope._cos.shape[0] >= n and traced._cos.shape[0] == 2048  # the compiled graph builds its own
