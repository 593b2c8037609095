import pytest
import torch
import torch.nn.functional as F

from evo.kernels import activation as tri
from tests.kernels.oracle import assert_oracle, run_with_grads


def exact(g, u):
    """SwiGLU by its definition, silu(g) * u with silu(g) = g / (1 + e^-g): in fp64, the exact value here."""
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1000), (5, 7, 333), (2049,)])
def test_swiglu(shape, dtype):
    torch.manual_seed(len(shape))
    g, u = (2 * torch.randn(shape)).to(dtype), torch.randn(shape).to(dtype)
    k_out, k_grad = run_with_grads(tri.swiglu, [g, u])
    p_out, p_grad = run_with_grads(lambda a, b: F.silu(a) * b, [g, u])
    e_out, e_grad = run_with_grads(exact, [g.double(), u.double()])
    assert_oracle("y", k_out[0], p_out[0], e_out[0], dtype)
    for name, k, p, e in zip(("dgate", "dup"), k_grad, p_grad, e_grad):
        assert_oracle(name, k, p, e, dtype, grad=True)


@pytest.mark.parametrize("n", [1, 7])
def test_swiglu_tiny_sizes(n):
    # too few elements for the max-error oracle to be meaningful: compare at bf16 tolerance instead
    g, u = torch.randn(n, dtype=torch.bfloat16, requires_grad=True), torch.randn(n, dtype=torch.bfloat16)
    torch.testing.assert_close(tri.swiglu(g, u), exact(g.double(), u.double()).to(torch.bfloat16).detach())
    tri.swiglu(g, u).sum().backward()
    expected = torch.autograd.grad(exact(g.double(), u.double()).sum(), g)[0]
    torch.testing.assert_close(g.grad.double(), expected.double(), rtol=1.6e-2, atol=1e-2)


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        tri.swiglu(torch.randn(3), torch.randn(4))
