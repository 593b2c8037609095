"""Triton RMSNorm (through the interpreter on CPU) against fp64 math written here, forward and backward.

Rows come in two scales: unit variance, and std 1e-2 where eps (1e-4) is as large as mean(x^2), so a
kernel that drops eps, or adds it in the wrong place, fails on those rows. (Smaller rows, std 1e-3 with
eps 1e-5, would do as well but give gradients of ~300, whose fp32 rounding exceeds the oracle's 1e-5 floor.)
"""

import pytest
import torch

from evo.kernels import reference as ref
from evo.kernels import rmsnorm as tri
from evo.kernels.triton_utils import interpreting
from tests.kernels.interpreter_bf16 import interpreter_max_slack
from tests.kernels.oracle import assert_oracle, run_with_grads

EPS = 1e-4


def exact_rms_norm(x, w, eps):
    """The definition, in whatever (fp64) dtype it is given: x / sqrt(mean(x^2) + eps) * w."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


def exact_fused(x, r, w, eps):
    """flash-attn's prenorm rms_norm_fn: the norm of the exact sum, and the sum."""
    s = x + r
    return exact_rms_norm(s, w, eps), s


def plain_rms_norm(x, w, eps):
    """The same-dtype PyTorch implementation: every op in the input dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def plain_fused(x, r, w, eps):
    """Same-dtype PyTorch: x + r in PyTorch's promoted dtype (fp32 for bf16 + fp32), the norm in that dtype."""
    s = x + r
    return plain_rms_norm(s, w, eps).to(x.dtype), s.to(r.dtype)


def rows_of_two_scales(shape, dtype, seed):
    """Standard normal rows, every other row scaled to std 1e-2 (where eps weighs as much as the variance)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, device="cpu")
    rows = x.view(-1, shape[-1])
    rows[1::2] *= 1e-2
    return x.to(torch.get_default_device(), dtype)


def check(fn_kernel, fn_plain, fn_exact, inputs, out_dtypes):
    k_out, k_grad = run_with_grads(fn_kernel, inputs)
    p_out, p_grad = run_with_grads(fn_plain, inputs)
    e_out, e_grad = run_with_grads(fn_exact, [t.double() for t in inputs])
    for i, (k, p, e, dtype) in enumerate(zip(k_out, p_out, e_out, out_dtypes)):
        assert k.dtype == dtype, (i, k.dtype, dtype)
        # bf16 under the interpreter: one ulp on the max bound for its rounding toward zero (see there)
        assert_oracle(f"out{i}", k, p, e, dtype, max_slack=interpreter_max_slack(k, e))
    for i, (k, p, e, t) in enumerate(zip(k_grad, p_grad, e_grad, inputs)):
        assert k.dtype == t.dtype, (i, k.dtype, t.dtype)  # each gradient in its input's dtype
        # fp16 PyTorch's backward can overflow on the small rows (the variance's gradient passes 65504): as in
        # flash-attn's test_layer_norm, elements where the same-dtype implementation is NaN set no bound
        p = torch.where(torch.isnan(p), e.to(p.dtype), p)
        assert_oracle(f"grad{i}", k, p, e, t.dtype, grad=True, max_slack=interpreter_max_slack(k, e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 123), (7, 1000), (16, 4096), (3, 5)])
def test_rms_norm(rows, hidden, dtype):
    x = rows_of_two_scales((rows, hidden), dtype, rows * hidden)
    if rows == 1:
        x = x * 1e-2  # the single row small too
    w = (1 + 0.1 * rows_of_two_scales((2, hidden), torch.float32, hidden)[0]).to(dtype)
    check(lambda x_, w_: tri.rms_norm(x_, w_, EPS), lambda x_, w_: plain_rms_norm(x_, w_, EPS),
          lambda x_, w_: exact_rms_norm(x_, w_, EPS), [x, w], [dtype])


FUSED_DTYPES = [  # (x, residual, weight): same dtype, and flash-attn's residual_in_fp32 stream
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float16, torch.float32, torch.float32),
]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("x_dtype, r_dtype, w_dtype", FUSED_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 123), (16, 1000), (1, 4096)])
def test_fused_add_rms_norm(shape, x_dtype, r_dtype, w_dtype, impl):
    seed = sum(shape)
    x, r = rows_of_two_scales(shape, x_dtype, seed), rows_of_two_scales(shape, r_dtype, seed + 1)
    if shape[0] == 1:
        x, r = x * 1e-2, r * 1e-2
    w = (1 + 0.1 * rows_of_two_scales((2, shape[-1]), torch.float32, seed + 2)[0]).to(w_dtype)
    fn = tri.fused_add_rms_norm if impl == "triton" else ref.fused_add_rms_norm
    check(lambda x_, r_, w_: fn(x_, r_, w_, EPS), lambda x_, r_, w_: plain_fused(x_, r_, w_, EPS),
          lambda x_, r_, w_: exact_fused(x_, r_, w_, EPS), [x, r, w], [x_dtype, r_dtype])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_fused_add_normalizes_the_unrounded_sum(impl):
    """flash-attn normalizes the fp32 sum and rounds only the returned residual: with bf16 x and residual the
    output is rms_norm of the fp32 sum (rounded once, to bf16), not of the bf16-rounded sum."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 256, generator=gen, device="cpu").to(torch.get_default_device(), torch.bfloat16)
    r = (torch.randn(4, 256, generator=gen, device="cpu") / 3).to(torch.get_default_device(), torch.bfloat16)
    w = torch.ones(256, dtype=torch.bfloat16)
    fn = tri.fused_add_rms_norm if impl == "triton" else ref.fused_add_rms_norm
    y, s = fn(x, r, w, EPS)
    s32 = x.float() + r.float()
    nearest = s32.to(torch.bfloat16)
    if impl == "triton" and interpreting():
        # Triton 3.9's interpreter rounds fp32 to bf16 toward zero (a GPU, and PyTorch, round to nearest)
        toward_zero = (s32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
        assert torch.all((s == nearest) | (s == toward_zero))
    else:
        assert torch.equal(s, nearest)
    from_fp32 = exact_rms_norm(s32.double(), w.double(), EPS)
    from_rounded = exact_rms_norm(s32.to(torch.bfloat16).double(), w.double(), EPS)
    assert (from_fp32.to(torch.bfloat16) != from_rounded.to(torch.bfloat16)).any()  # the two choices differ here
    # one bf16 ulp: the Triton interpreter rounds fp32 to bf16 toward zero (PyTorch and GPUs: to nearest)
    torch.testing.assert_close(y.double(), from_fp32, rtol=2**-7 if interpreting() else 2**-8, atol=0)
    err_fp32 = (y.double() - from_fp32).abs().mean()
    err_rounded = (y.double() - from_rounded).abs().mean()
    assert err_fp32 < err_rounded


def test_non_contiguous_rows_and_empty_input():
    x = torch.randn(8, 2, 64)[:, 0]  # rows strided by 128
    w = torch.randn(64)
    torch.testing.assert_close(tri.rms_norm(x, w), ref.rms_norm(x, w))
    empty = torch.randn(0, 64, requires_grad=True)
    out = tri.rms_norm(empty, w)
    out.sum().backward()
    assert out.shape == (0, 64) and empty.grad.shape == (0, 64)


def test_hidden_size_limit():
    with pytest.raises(ValueError, match="up to 65536"):
        tri.rms_norm(torch.randn(1, 65537), torch.ones(65537))


@pytest.mark.parametrize("fn", [tri.fused_add_rms_norm, ref.fused_add_rms_norm])
def test_residual_shape_must_match(fn):
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fn(torch.randn(2, 8), torch.randn(1, 8), torch.ones(8))
