"""One bf16 ulp of slack on the max-error bound for kernels run through Triton's interpreter, and only there.

Triton 3.9's interpreter rounds fp32 to bf16 toward zero, where a GPU (and PyTorch, whose bf16 results
set the oracle's bound) rounds to nearest; so under the interpreter a kernel's bf16 output can sit one
ulp further from the exact value than the same kernel on a GPU. ``interpreter_max_slack`` is that ulp at
the largest magnitude of the result, added to the oracle's max bound only (``assert_oracle(max_slack=...)``),
as oracle.py's rule says a widening must be: under the interpreter, for bf16, the mean bound unwidened.
fp16 and fp32 are rounded to nearest by the interpreter and get none, as does everything on a GPU (flash-attn's
bounds hold there).
"""

import torch

from evo.kernels.triton_utils import interpreting


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |t| (8 significant bits): 2^(exponent - 8) with |t| in [2^(e-1), 2^e)."""
    _, exponent = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - 8)


def interpreter_max_slack(kernel: torch.Tensor, exact: torch.Tensor) -> float:
    """One bf16 ulp at the largest magnitude of ``kernel`` and ``exact`` under the interpreter; 0 otherwise."""
    if kernel.dtype != torch.bfloat16 or not interpreting() or not kernel.numel():
        return 0.0
    return bf16_ulp(torch.maximum(kernel.double().abs().max(), exact.double().abs().max())).item()


def round_as_interpreter(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` as a kernel's store rounds it here: bf16 under the interpreter toward zero (the low
    16 bits of the fp32 value dropped), everything else to nearest as PyTorch rounds. The same-dtype reference of a
    kernel whose only error is its output's rounding: there the interpreter's rule doubles the mean error, which the
    oracle's factor of 2 does not leave room for."""
    if dtype != torch.bfloat16 or not interpreting():
        return t.to(dtype)
    bits = t.float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero
