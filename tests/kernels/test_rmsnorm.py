"""Triton RMSNorm (through the interpreter on CPU) against the fp32 reference, forward and backward."""

import pytest
import torch

from evo.kernels import reference as ref
from evo.kernels import rmsnorm as tri
from oracle import assert_oracle, run_with_grads


def plain_rms_norm(x, w, eps=1e-6):
    """The same-dtype PyTorch implementation: every op in the input dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def plain_fused(x, r, w, eps=1e-6):
    s = x + r
    return plain_rms_norm(s, w, eps), s


def check(fn_kernel, fn_plain, fn_exact, inputs, dtype):
    k_out, k_grad = run_with_grads(fn_kernel, inputs)
    p_out, p_grad = run_with_grads(fn_plain, inputs)
    e_out, e_grad = run_with_grads(fn_exact, [t.double() for t in inputs])
    for i, (k, p, e) in enumerate(zip(k_out, p_out, e_out)):
        assert k.dtype == dtype
        assert_oracle(f"out{i}", k, p, e, dtype)
    for i, (k, p, e) in enumerate(zip(k_grad, p_grad, e_grad)):
        assert_oracle(f"grad{i}", k, p, e, dtype, grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 123), (7, 1000), (16, 4096), (3, 5)])
def test_rms_norm(rows, hidden, dtype):
    torch.manual_seed(rows * hidden)
    x = torch.randn(rows, hidden).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    check(tri.rms_norm, plain_rms_norm, ref.rms_norm, [x, w], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 123), (16, 1000), (1, 4096)])
def test_fused_add_rms_norm(shape, dtype):
    torch.manual_seed(sum(shape))
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    check(tri.fused_add_rms_norm, plain_fused, ref.fused_add_rms_norm, [x, r, w], dtype)


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
