"""Triton cross-entropy and fused linear cross-entropy (and the reference twins) against fp64 math written
here: flash-attn's cross_entropy_loss with CrossEntropyLoss's reductions, logit_scale, z-loss (returned
too), precomputed_lse, and the label range check."""

import pytest
import torch
import torch.nn.functional as F

from evo.kernels import loss as tri
from evo.kernels import reference as ref
from tests.kernels.oracle import assert_oracle, run_with_grads

IMPLS = {"triton": tri, "reference": ref}


def exact_ce(logits, labels, ignore_index=-100, smoothing=0.0, z_loss=0.0, reduction="mean", logit_scale=1.0,
             lse=None):
    """The definition (fp64 logits give the exact value): per token, with x = logit_scale * logits,
    (1 - s) * (lse - x[y]) + s * (lse - mean(x)) + z * lse^2, 0 where y == ignore_index, then reduced (mean over
    labelled tokens). Returns (loss, z-loss part). ``lse`` (given) stands in for log(sum(exp(x))) in value, and
    in the gradient as exp(x - lse) (flash-attn's precomputed_lse)."""
    x = logits * logit_scale
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)
    if lse is None:
        m = x.max(-1, keepdim=True).values.detach()
        lse = (m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))).squeeze(-1)
    else:
        p_sum = torch.exp(x - lse[:, None]).sum(-1)
        lse = lse + (p_sum - p_sum.detach())
    x_y = x.gather(-1, y[:, None]).squeeze(-1)
    per_token = (1 - smoothing) * (lse - x_y) + smoothing * (lse - x.sum(-1) / x.shape[-1]) + z_loss * lse * lse
    per_token = torch.where(valid, per_token, 0)
    z_part = torch.where(valid, z_loss * lse * lse, 0).detach()
    count = valid.sum().clamp(min=1)
    reduce = {"none": lambda t: t, "sum": lambda t: t.sum(), "mean": lambda t: t.sum() / count}[reduction]
    return reduce(per_token), reduce(z_part)


def plain_ce(logits, labels, ignore_index, smoothing, z_loss, reduction, logit_scale=1.0):
    """The same-dtype PyTorch path: F.cross_entropy on the given logits, z-loss in their dtype."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
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
    e_out, e_grad = run_with_grads(lambda x: exact_ce(x, labels, *args)[0], [logits.double()])
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


CE_OPTION_CASES = [  # (smoothing, z_loss, logit_scale, reduction)
    (0.0, 0.0, 0.7, "mean"),
    (0.1, 1e-3, 0.7, "sum"),
    (0.0, 1e-2, 1.0, "none"),
    (0.1, 1e-3, 1.7, "mean"),
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing, z_loss, logit_scale, reduction", CE_OPTION_CASES)
def test_cross_entropy_logit_scale_and_returned_z_loss(smoothing, z_loss, logit_scale, reduction, dtype, impl):
    """flash-attn's logit_scale (the loss of logit_scale * logits, gradient times logit_scale) and return_z_loss
    ((loss, z-loss part) reduced alike; the part is for logging and has no gradient)."""
    rows, vocab = 20, 2500  # two BLOCK_V tiles per row
    torch.manual_seed(7)
    logits = (2 * torch.randn(rows, vocab)).to(dtype)
    labels = make_labels(rows, vocab, -100, seed=3)
    opts = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction, logit_scale=logit_scale)
    fn = IMPLS[impl].cross_entropy
    k_out, k_grad = run_with_grads(lambda x: fn(x, labels, **opts, return_z_loss=True)[0], [logits])
    p_out, p_grad = run_with_grads(lambda x: plain_ce(x, labels, -100, smoothing, z_loss, reduction, logit_scale),
                                   [logits])
    exact = lambda x: exact_ce(x, labels, -100, smoothing, z_loss, reduction, logit_scale)  # noqa: E731
    e_out, e_grad = run_with_grads(lambda x: exact(x)[0], [logits.double()])
    assert_oracle("loss", k_out[0], p_out[0].float(), e_out[0], dtype)
    assert_oracle("dlogits", k_grad[0], p_grad[0], e_grad[0], dtype, grad=True)
    x = logits.clone().requires_grad_()
    loss, z_part = fn(x, labels, **opts, return_z_loss=True)
    assert z_part.dtype == torch.float32 and z_part.shape == loss.shape and not z_part.requires_grad
    torch.testing.assert_close(z_part.double(), exact(logits.double())[1], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(fn(logits, labels, **opts), loss.detach())  # return_z_loss changes nothing else


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_entropy_loss_has_flash_attns_functional_signature(backend):
    """evo.kernels.cross_entropy_loss is flash-attn's: positional (logits, labels, precomputed_lse,
    label_smoothing, logit_scale, lse_square_scale, ignore_index, inplace_backward, process_group), returning
    per-token (losses incl. z-loss, z_losses), 0 where ignored."""
    from evo import kernels

    torch.manual_seed(8)
    logits, labels = 2 * torch.randn(12, 600), make_labels(12, 600, -1, seed=4)
    x = logits.clone().requires_grad_()
    with kernels.use_backend(backend):
        losses, z_losses = kernels.cross_entropy_loss(x, labels, None, 0.1, 0.8, 1e-2, -1, True, None)
    x64 = logits.double().requires_grad_()
    e_loss, e_z = exact_ce(x64, labels, ignore_index=-1, smoothing=0.1, z_loss=1e-2, reduction="none",
                           logit_scale=0.8)
    assert losses.shape == z_losses.shape == (12,) and bool((losses[labels == -1] == 0).all())
    torch.testing.assert_close(losses.double(), e_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_losses.double(), e_z, rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    e_loss.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_returned_z_loss_of_all_ignored_is_zero():
    for fn in (tri.cross_entropy, ref.cross_entropy):
        loss, z_part = fn(torch.randn(3, 50), torch.full((3,), -100), z_loss=1e-2, return_z_loss=True)
        assert loss.item() == 0 and z_part.item() == 0


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_precomputed_lse_stands_in_for_lse(z_loss, impl):
    """With label_smoothing 0 and logit_scale 1, flash-attn takes precomputed_lse as the lse without computing it:
    the loss is lse_given - x[y] (+ z lse_given^2), the gradient exp(x - lse_given)(1 + 2 z lse_given) - onehot,
    and precomputed_lse itself gets no gradient. A shifted lse tells using it from ignoring it."""
    rows, vocab = 37, 2500
    torch.manual_seed(11)
    logits = 2 * torch.randn(rows, vocab)
    labels = make_labels(rows, vocab, -100, seed=5)
    true_lse = torch.logsumexp(logits.double(), -1)
    fn = IMPLS[impl].cross_entropy
    for shift in (0.0, 0.25):
        given = (true_lse + shift).float().requires_grad_()
        x = logits.clone().requires_grad_()
        loss, z_part = fn(x, labels, z_loss=z_loss, reduction="none", return_z_loss=True, precomputed_lse=given)
        g = torch.randn(rows)
        loss.backward(g)
        x64 = logits.double().requires_grad_()
        e_loss, e_z = exact_ce(x64, labels, z_loss=z_loss, reduction="none", lse=given.detach().double())
        e_loss.backward(g.double())
        torch.testing.assert_close(loss.double(), e_loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_part.double(), e_z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        assert given.grad is None


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("smoothing, logit_scale", [(0.1, 1.0), (0.0, 0.7)])
def test_precomputed_lse_ignored_with_smoothing_or_logit_scale(smoothing, logit_scale, impl):
    """flash-attn uses precomputed_lse only with label_smoothing 0 and logit_scale 1; otherwise it computes lse."""
    torch.manual_seed(12)
    logits, labels = torch.randn(20, 700), make_labels(20, 700, -100, seed=6)
    fn = IMPLS[impl].cross_entropy
    wrong = torch.full((20,), 123.0)
    got = fn(logits, labels, label_smoothing=smoothing, logit_scale=logit_scale, precomputed_lse=wrong)
    expected = exact_ce(logits.double(), labels, smoothing=smoothing, logit_scale=logit_scale)[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [1000, 5000, -1])
def test_label_outside_vocab_raises_on_the_reference_path(bad):
    labels = torch.tensor([3, -100, bad, 7])
    with pytest.raises(ValueError, match=rf"label {bad} \(token 2\) is outside the vocabulary of size 1000"):
        ref.cross_entropy(torch.randn(4, 1000), labels)
    with pytest.raises(ValueError, match=rf"label {bad} .* vocabulary of size 1000"):
        ref.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(1000, 8), labels)
    ref.cross_entropy(torch.randn(4, 1000), torch.tensor([3, -100, 999, 0]))  # the edges are fine


def test_label_outside_vocab_raises_on_the_triton_path_with_evo_debug(monkeypatch):
    logits, h, w = torch.randn(4, 1000), torch.randn(4, 8), torch.randn(1000, 8)
    labels = torch.tensor([3, -100, 1000, 7])
    monkeypatch.delenv("EVO_DEBUG", raising=False)
    tri.cross_entropy(logits, labels)  # unchecked without EVO_DEBUG: no host sync
    monkeypatch.setenv("EVO_DEBUG", "1")
    with pytest.raises(ValueError, match=r"label 1000 \(token 2\) is outside the vocabulary of size 1000"):
        tri.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=r"label -3 .* vocabulary of size 1000"):
        tri.fused_linear_cross_entropy(h, w, torch.tensor([3, -3, 0, 1]), vocab_chunk=300)
    tri.cross_entropy(logits, torch.tensor([3, -100, 999, 0]))


def plain_flce(h, w, labels, b, smoothing, z_loss, reduction, logit_scale=1.0):
    return plain_ce(F.linear(h, w, b), labels, -100, smoothing, z_loss, reduction, logit_scale)


FLCE_CASES = [  # (rows, hidden, vocab, bias, chunk, reduction, smoothing, z_loss, logit_scale)
    (100, 32, 1000, False, None, "mean", 0.0, 0.0, 1.0),
    (37, 64, 1000, True, 300, "none", 0.1, 0.0, 1.0),
    (9, 48, 50257, False, None, "mean", 0.0, 0.0, 1.0),
    (64, 32, 5000, True, 2048, "none", 0.1, 0.0, 1.0),
    # z-loss, with smoothing, bias and each reduction (the reviewed gap), and logit_scale
    (37, 64, 1000, True, 300, "mean", 0.1, 1e-3, 1.0),
    (64, 32, 5000, True, 2048, "sum", 0.0, 1e-3, 1.0),
    (50, 32, 3000, False, 1024, "none", 0.1, 1e-3, 0.7),
    (29, 48, 2000, True, 512, "mean", 0.0, 1e-2, 1.7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, vocab, bias, chunk, reduction, smoothing, z_loss, logit_scale", FLCE_CASES)
def test_fused_linear_cross_entropy(rows, hidden, vocab, bias, chunk, reduction, smoothing, z_loss, logit_scale,
                                    dtype):
    torch.manual_seed(rows * vocab)
    h = torch.randn(rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    b = (0.1 * torch.randn(vocab)).to(dtype) if bias else None
    labels = make_labels(rows, vocab, -100, seed=rows)
    inputs = [h, w] + ([b] if bias else [])
    args = (smoothing, z_loss, reduction)

    def kernel(h_, w_, b_=None):
        return tri.fused_linear_cross_entropy(h_, w_, labels, bias=b_, label_smoothing=smoothing, z_loss=z_loss,
                                              reduction=reduction, vocab_chunk=chunk, logit_scale=logit_scale)

    k_out, k_grad = run_with_grads(kernel, inputs)
    p_out, p_grad = run_with_grads(lambda h_, w_, b_=None: plain_flce(h_, w_, labels, b_, *args, logit_scale), inputs)
    e_out, e_grad = run_with_grads(lambda h_, w_, b_=None: exact_ce(F.linear(h_, w_, b_), labels, -100, *args,
                                                                    logit_scale=logit_scale)[0],
                                   [t.double() for t in inputs])
    assert_oracle("loss", k_out[0], p_out[0].float(), e_out[0], dtype)
    for name, k, p, e in zip(("dhidden", "dweight", "dbias"), k_grad, p_grad, e_grad):
        assert k.dtype == dtype
        assert_oracle(name, k, p, e, dtype, grad=True)
    # the reference twin (the CPU path) against the same math
    r_out, r_grad = run_with_grads(lambda h_, w_, b_=None: ref.fused_linear_cross_entropy(
        h_, w_, labels, bias=b_, label_smoothing=smoothing, z_loss=z_loss, reduction=reduction,
        logit_scale=logit_scale), inputs)
    assert_oracle("reference loss", r_out[0], p_out[0].float(), e_out[0], dtype)
    for name, r, p, e in zip(("reference dhidden", "dweight", "dbias"), r_grad, p_grad, e_grad):
        assert_oracle(name, r, p, e, dtype, grad=True)


def test_fused_linear_accuracy_counts_argmax_hits():
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(300, 16)
    best = (h @ w.T).argmax(-1)
    labels = best.clone()
    labels[:10] = (best[:10] + 1 + torch.randint(0, 299, (10,))) % 300  # ten wrong
    labels[10:13] = -100  # three ignored: 27 hits
    loss, correct = tri.fused_linear_cross_entropy(h, w, labels, return_accuracy=True, vocab_chunk=128)
    assert int(correct) == 27
