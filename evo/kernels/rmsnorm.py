"""RMSNorm and fused add + RMSNorm in Triton.

Forward, per row x of length N (statistics in fp32):
    rstd = 1 / sqrt(mean(x^2) + eps),   y = x * rstd * w   (y in x.dtype)
Fused add (flash-attn's ``rms_norm_fn(x, w, None, residual=r, prenorm=True)``): s = x + r in fp32;
y = rmsnorm(s) from that fp32 sum, and s is returned rounded to residual.dtype (the residual stream's
dtype: fp32 for flash-attn's ``residual_in_fp32``), so an fp32 stream keeps every bit of it.
Saved for backward: the normalized input (x, or s as returned) and rstd (rows,), fp32.

Backward, with g = dy * w and xhat = x * rstd:
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat
dw is reduced through fp32 partial sums: each program owns a contiguous band of rows and writes
one (N,) fp32 partial; the partials are summed afterwards (no atomics, so the result is
deterministic). For the fused add, d(x) = d(residual) = dx + d(s_out), summed in fp32 and stored
once in x.dtype and, where the residual's dtype differs, once more in residual.dtype (as flash-attn).

Shapes: x, residual (..., N) with N <= 65536; weight (N,). One program normalizes whole rows held
in registers (BLOCK_N = next power of two >= N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo.kernels.reference import check_residual  # the reference's rule, checked alike
from evo.kernels.triton_utils import OpaqueOp, num_programs_for_rows, warps_for_block

MAX_HIDDEN = 65536


# grid: (rows,); one program per row, the whole row in one BLOCK_N tile
@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x += r  # normalized unrounded, as flash-attn; only the returned sum is rounded (to residual.dtype)
        tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# grid: (programs,); program p handles rows [p * rows_per_program, ...) and writes one dw partial
@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DS, DX, DR, DW_PARTIAL, stride_dy, stride_x, stride_ds, stride_dx, stride_dr, M, N,
                  rows_per_program, HAS_DS: tl.constexpr, STORE_DR: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2^31
    for i in range(0, tl.minimum(rows_per_program, M - row_start)):
        row = row_start + i
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        if HAS_DS:  # the returned sum's gradient, added before any rounding
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_DR:  # residual in another dtype: its gradient rounded to that dtype, not through x's
            tl.store(DR + row * stride_dr + cols, dx.to(DR.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as (rows, N) with unit stride along N (copies only if the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2, residual2, weight, eps):
    """x2, residual2 (M, N) with unit stride along N -> (y in x2.dtype, x2 + residual2 in residual2.dtype
    (or an empty placeholder), rstd)."""
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    has_residual = residual2 is not None
    s = torch.empty((M, N) if has_residual else (0,), dtype=residual2.dtype if has_residual else x2.dtype,
                    device=x2.device)
    block = triton.next_power_of_2(N)
    if M > 0:
        r2 = residual2 if has_residual else x2  # unused placeholder
        _rms_norm_fwd[(M,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                            s.stride(0) if has_residual else 0, N, eps, HAS_RESIDUAL=has_residual, BLOCK_N=block,
                            num_warps=warps_for_block(block))
    return y, s, rstd


def _forward_fake(x2, residual2, weight, eps):
    M, N = x2.shape
    return (x2.new_empty((M, N)),
            x2.new_empty((M, N), dtype=residual2.dtype) if residual2 is not None else x2.new_empty((0,)),
            x2.new_empty((M,), dtype=torch.float32))


def _backward(dy2, normed_input, weight, rstd, ds2, dx_dtype, store_dr):
    """dy2, normed_input (M, N), ds2 (M, N) or None (the returned sum's gradient) -> (dx (M, N) in dx_dtype,
    the same gradient in normed_input.dtype if store_dr (else an empty placeholder), dw (N,))."""
    M, N = normed_input.shape
    dx = torch.empty((M, N), dtype=dx_dtype, device=dy2.device)
    dr = torch.empty((M, N) if store_dr else (0,), dtype=normed_input.dtype, device=dy2.device)
    programs = num_programs_for_rows(M, dy2.device)
    rows_per_program = triton.cdiv(M, programs) if M else 1
    partial = torch.empty((programs, N), dtype=torch.float32, device=dy2.device)
    block = triton.next_power_of_2(N)
    if M > 0:
        ds_arg = ds2 if ds2 is not None else dy2  # unused placeholder
        _rms_norm_bwd[(programs,)](dy2, normed_input, weight, rstd, ds_arg, dx, dr if store_dr else dx, partial,
                                   dy2.stride(0), normed_input.stride(0), ds_arg.stride(0), dx.stride(0),
                                   dr.stride(0) if store_dr else 0, M, N, rows_per_program, HAS_DS=ds2 is not None,
                                   STORE_DR=store_dr, BLOCK_N=block, num_warps=warps_for_block(block))
    dw = partial.sum(0).to(weight.dtype) if M > 0 else torch.zeros_like(weight)
    return dx, dr, dw


def _backward_fake(dy2, normed_input, weight, rstd, ds2, dx_dtype, store_dr):
    return (normed_input.new_empty(normed_input.shape, dtype=dx_dtype),
            normed_input.new_empty(normed_input.shape if store_dr else (0,)), torch.empty_like(weight))


_forward_op = OpaqueOp("rms_norm_fwd",
                       "(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
                       _forward, _forward_fake)
_backward_op = OpaqueOp("rms_norm_bwd", "(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? ds, "
                        "ScalarType dx_dtype, bool store_dr) -> (Tensor, Tensor, Tensor)", _backward, _backward_fake)


def _check(x, weight):
    N = x.shape[-1]
    if N > MAX_HIDDEN:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_HIDDEN}, got {N}")
    if weight.shape != (N,):
        raise ValueError(f"weight must have shape ({N},), got {tuple(weight.shape)}")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        _check(x, weight)
        x2 = _rows(x)
        y, _, rstd = _forward_op(x2, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = _backward_op(_rows(dy), x2, weight, rstd, None, x2.dtype, False)
        return dx.view(dy.shape), dw, None


class FusedAddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        _check(x, weight)
        check_residual(x, residual)
        y, s, rstd = _forward_op(_rows(x), _rows(residual), weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_dtype = x.dtype
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        store_dr = ctx.x_dtype != s.dtype
        dx, dr, dw = _backward_op(_rows(dy), s, weight, rstd, None if ds is None else _rows(ds), ctx.x_dtype, store_dr)
        dx = dx.view(dy.shape)
        return dx, dr.view(dy.shape) if store_dr else dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (..., N) fp32/fp16/bf16, weight (N,) -> (..., N) in x.dtype; N <= 65536."""
    return RMSNormFunction.apply(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """x, residual (..., N), each fp32/fp16/bf16 (they may differ, e.g. bf16 x with an fp32 residual stream).

    Returns (rms_norm(x + residual) in x.dtype, x + residual in residual.dtype), the sum taken in fp32 and
    normalized before it is rounded (flash-attn's ``rms_norm_fn(..., residual=residual, prenorm=True)``).
    Gradients reach x and residual in their own dtypes.
    """
    return FusedAddRMSNormFunction.apply(x, residual, weight, eps)
