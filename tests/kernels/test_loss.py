"""Triton cross-entropy and fused linear cross-entropy against the fp64 reference."""

import pytest
import torch
import torch.nn.functional as F

from evo.kernels import loss as tri
from evo.kernels import reference as ref
from oracle import assert_oracle, run_with_grads


def plain_ce(logits, labels, ignore_index, smoothing, z_loss, reduction):
    """The same-dtype PyTorch path: F.cross_entropy on the given logits, z-loss in their dtype."""
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    if z_loss:
        loss = loss + torch.where(labels != ignore_index, z_loss * torch.logsumexp(logits, -1) ** 2, 0)
    valid = labels != ignore_index
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / valid.sum().clamp(min=1)}[reduction]


def make_labels(rows, vocab, ignore_index, frac_ignored=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device="cpu")
    labels[torch.rand(rows, generator=gen, device="cpu") < frac_ignored] = ignore_index
    return labels.to(torch.get_default_device())


def check_ce(rows, vocab, dtype, ignore_index=-100, smoothing=0.0, z_loss=0.0, reduction="mean", labels=None):
    torch.manual_seed(rows + vocab)
    logits = (2 * torch.randn(rows, vocab)).to(dtype)
    labels = make_labels(rows, vocab, ignore_index) if labels is None else labels
    args = (ignore_index, smoothing, z_loss, reduction)
    k_out, k_grad = run_with_grads(lambda x: tri.cross_entropy(x, labels, *args), [logits])
    p_out, p_grad = run_with_grads(lambda x: plain_ce(x, labels, *args), [logits])
    e_out, e_grad = run_with_grads(lambda x: ref.cross_entropy(x, labels, *args), [logits.double()])
    assert k_out[0].dtype == torch.float32
    assert_oracle("loss", k_out[0], p_out[0].float(), e_out[0], dtype)
    assert_oracle("dlogits", k_grad[0], p_grad[0], e_grad[0], dtype, grad=True)
    return k_out[0], k_grad[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, vocab", [(423, 1000), (3, 50257), (1, 128256)])
def test_cross_entropy_shapes(rows, vocab, dtype):
    check_ce(rows, vocab, dtype)


def test_cross_entropy_gemma_vocab():
    """vocab 256000 (Gemma's), the largest the issue names, in bf16 with label smoothing and z-loss."""
    check_ce(2, 256000, torch.bfloat16, smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, z_loss", [(0.1, 0.0), (0.0, 1e-4), (0.1, 1e-4)])
def test_cross_entropy_smoothing_z_loss_reductions(smoothing, z_loss, reduction, dtype):
    check_ce(64, 1000, dtype, smoothing=smoothing, z_loss=z_loss, reduction=reduction)


def test_cross_entropy_other_ignore_index():
    check_ce(50, 333, torch.float32, ignore_index=-1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    labels = torch.full((5,), -100)
    loss, grad = check_ce(5, 100, torch.float32, reduction=reduction, labels=labels)
    assert torch.all(loss == 0) and torch.count_nonzero(grad) == 0


def plain_flce(h, w, labels, b, smoothing, reduction):
    return plain_ce(F.linear(h, w, b), labels, -100, smoothing, 0.0, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, vocab, bias, chunk", [
    (100, 32, 1000, False, None), (37, 64, 1000, True, 300), (9, 48, 50257, False, None), (64, 32, 5000, True, 2048)])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("none", 0.1)])
def test_fused_linear_cross_entropy(rows, hidden, vocab, bias, chunk, reduction, smoothing, dtype):
    torch.manual_seed(rows * vocab)
    h = torch.randn(rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    b = (0.1 * torch.randn(vocab)).to(dtype) if bias else None
    labels = make_labels(rows, vocab, -100, seed=rows)
    inputs = [h, w] + ([b] if bias else [])

    def kernel(h_, w_, b_=None):
        return tri.fused_linear_cross_entropy(h_, w_, labels, bias=b_, label_smoothing=smoothing, reduction=reduction,
                                              vocab_chunk=chunk)

    k_out, k_grad = run_with_grads(kernel, inputs)
    p_out, p_grad = run_with_grads(lambda h_, w_, b_=None: plain_flce(h_, w_, labels, b_, smoothing, reduction), inputs)
    e_out, e_grad = run_with_grads(
        lambda h_, w_, b_=None: ref.fused_linear_cross_entropy(h_, w_, labels, bias=b_, label_smoothing=smoothing,
                                                               reduction=reduction), [t.double() for t in inputs])
    assert_oracle("loss", k_out[0], p_out[0].float(), e_out[0], dtype)
    for name, k, p, e in zip(("dhidden", "dweight", "dbias"), k_grad, p_grad, e_grad):
        assert k.dtype == dtype
        assert_oracle(name, k, p, e, dtype, grad=True)


def test_fused_linear_accuracy_counts_argmax_hits():
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(300, 16)
    labels = (h @ w.T).argmax(-1)
    labels[:10] = torch.randint(0, 300, (10,))  # some wrong
    labels[10:13] = -100
    loss, correct = tri.fused_linear_cross_entropy(h, w, labels, return_accuracy=True, vocab_chunk=128)
    _, expected = ref.fused_linear_cross_entropy(h, w, labels, return_accuracy=True)
    assert int(correct) == int(expected) and int(correct) >= 27
