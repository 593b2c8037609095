"""One bf16 ulp of slack for kernels run through Triton's interpreter, and only there.

Triton 3.9's interpreter rounds fp32 to bf16 toward zero, where a GPU (and PyTorch, whose bf16 results
set the oracle's bound) rounds to nearest; so under the interpreter a kernel's bf16 output can sit one
ulp further from the exact value than the same kernel on a GPU. ``forgive_one_ulp`` moves each bf16
element of a kernel's result one ulp (of its magnitude) toward the exact value before the oracle
compares, which widens the bound by exactly that ulp per element. fp16 and fp32 are rounded to
nearest by the interpreter and are left alone, as is everything on a GPU (flash-attn's bounds hold there).
"""

import torch

from evo.kernels.triton_utils import interpreting


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |t| (8 significant bits): 2^(exponent - 8) with |t| in [2^(e-1), 2^e)."""
    _, exponent = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - 8)


def forgive_one_ulp(kernel: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """kernel (bf16) moved up to one bf16 ulp toward exact under the interpreter (fp64); unchanged otherwise."""
    if kernel.dtype != torch.bfloat16 or not interpreting():
        return kernel
    k, e = kernel.double(), exact.double()
    ulp = bf16_ulp(torch.maximum(k.abs(), e.abs()))
    diff = k - e
    return e + diff.sign() * (diff.abs() - ulp).clamp(min=0)
