"""The kernel oracle (flash-attention's test criterion), written once.

Against an fp32 (or fp64) reference, the kernel's max abs error may be at most ``factor`` times the
max abs error of the plain PyTorch implementation run in the input dtype, plus a floor: factor 2 for
outputs, 3 for gradients; floor 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16).
"""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_oracle(name: str, kernel: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype,
                  grad: bool = False) -> None:
    assert kernel.shape == exact.shape, (name, kernel.shape, exact.shape)
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    bound = (3 if grad else 2) * max_err(same_dtype, exact) + FLOOR[dtype]
    err = max_err(kernel, exact)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (torch {dtype} error {max_err(same_dtype, exact):.3g})"


def run_with_grads(fn, inputs, grad_out_seed=0):
    """Run fn(*inputs) (leaf copies requiring grad for float inputs), backprop a fixed random cotangent;
    returns (outputs tuple, grads tuple)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    cots = [torch.randn(o.shape, generator=gen, device="cpu").to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    grads = tuple(t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad)
    return tuple(o.detach() for o in outs), grads
