"""SwiGLU in Triton: y = silu(gate) * up, elementwise, computed in fp32.

Forward saves nothing but the inputs; backward recomputes sigmoid(gate):
    s = sigmoid(gate),  silu = gate * s
    d_up   = dy * silu
    d_gate = dy * up * s * (1 + gate * (1 - s))
Shapes: gate and up of one shape and dtype (any; flattened), int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo.kernels.triton_utils import OpaqueOp

BLOCK = 1024


# grid: (cdiv(n, BLOCK),); each program one contiguous BLOCK of elements
@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# grid: (cdiv(n, BLOCK),); recompute sigmoid(gate), write both gradients
@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _forward(gate, up):
    y = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


def _backward(gate, up, dy):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](gate, up, dy, dg, du, n, BLOCK=BLOCK)
    return dg, du


_forward_op = OpaqueOp("swiglu_fwd", "(Tensor gate, Tensor up) -> Tensor", _forward,
                       lambda gate, up: torch.empty_like(gate))
_backward_op = OpaqueOp("swiglu_bwd", "(Tensor gate, Tensor up, Tensor dy) -> (Tensor, Tensor)", _backward,
                        lambda gate, up, dy: (torch.empty_like(gate), torch.empty_like(up)))


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                             f"and {tuple(up.shape)} {up.dtype}")
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _forward_op(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _backward_op(gate, up, dy.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate and up of one shape and dtype."""
    return SwiGLUFunction.apply(gate, up)
