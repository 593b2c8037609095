"""Rotary position embedding in Triton, with flash-attn's interface.

For a token at position p and channel pair i (0 <= i < rotary_dim / 2), with c = cos[p, i] and
s = sin[p, i], the pair (a, b) becomes (a * c - b * s, a * s + b * c), in fp32. The pair is
(x[i], x[i + rotary_dim / 2]) in the GPT-NeoX layout (``interleaved=False``) and (x[2i], x[2i + 1])
in the GPT-J layout. Channels past rotary_dim pass through. p is the token's index inside its
sequence (restarting at each ``cu_seqlens`` boundary) plus ``seqlen_offsets``.

Backward is the conjugate rotation (s -> -s) of the incoming gradient; nothing is saved but cos,
sin and the offsets.

Shapes: x (batch, seqlen, heads, headdim), or (total_tokens, heads, headdim) with int32
cu_seqlens (batch + 1,); cos and sin (table_len, rotary_dim / 2); seqlen_offsets an int or a
(batch,) int tensor. Positions past the table's end are left unrotated (flash-attn requires the
table to cover seqlen + offset; checking it would need a host sync).

In place (``inplace=True``, and always for ``apply_rotary_emb_qkv_`` / ``apply_rotary_emb_kv_``, which
rotate the q and k parts of a packed tensor and leave v alone), as flash-attn: x holds the result
afterwards and is returned, and the gradient still reaches x's producer through the rotation, even
where x is a leaf that requires grad (or a view of one), which a PyTorch in-place op refuses. There
the returned tensor is an alias of x carrying the rotation's graph (flash-attn's ``ApplyRotaryEmb``
returns x without marking it dirty); anywhere else x is marked dirty, so autograd tracks the change
as for any in-place op. The backward writes a fresh gradient (flash-attn rotates the incoming one in
place). Inside torch.compile the in-place forms rotate out of place and write x back by the reference's
rule (``reference.write_in_place``): a compiled graph holds no in-place kernels of its own, and
AOTAutograd mishandles a Function that marks a graph input dirty (torch 2.13: the gradient came back
unrotated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo.kernels.reference import write_in_place, autograd_refuses_in_place  # the reference's in-place rules
from evo.kernels.triton_utils import OpaqueOp

BLOCK_M = 16


# grid: (cdiv(max_seqlen, BLOCK_M), batch, heads); a program rotates BLOCK_M tokens of one head of
# one sequence, all rotary_dim / 2 channel pairs at once
@triton.jit
def _rotary_kernel(X, OUT, COS, SIN, CU_SEQLENS, OFFSETS, seqlen, table_len, half,
                   stride_xb, stride_xm, stride_xh, stride_ob, stride_om, stride_oh, stride_cos, offset_int,
                   IS_VARLEN: tl.constexpr, OFFSET_TENSOR: tl.constexpr, INTERLEAVED: tl.constexpr,
                   CONJUGATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen = tl.load(CU_SEQLENS + b + 1).to(tl.int64) - start
        x_base = X + start * stride_xm + h * stride_xh
        o_base = OUT + start * stride_om + h * stride_oh
    else:
        x_base = X + b.to(tl.int64) * stride_xb + h * stride_xh
        o_base = OUT + b.to(tl.int64) * stride_ob + h * stride_oh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    if OFFSET_TENSOR:
        pos = offs_m + tl.load(OFFSETS + b)
    else:
        pos = offs_m + offset_int
    row_ok = offs_m < seqlen
    mask = row_ok[:, None] & (offs_k[None, :] < half)
    in_table = mask & (pos[:, None] < table_len)
    c = tl.load(COS + pos[:, None] * stride_cos + offs_k[None, :], mask=in_table, other=1.0).to(tl.float32)
    s = tl.load(SIN + pos[:, None] * stride_cos + offs_k[None, :], mask=in_table, other=0.0).to(tl.float32)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        k1, k2 = 2 * offs_k, 2 * offs_k + 1
    else:
        k1, k2 = offs_k, offs_k + half
    rows_x = offs_m[:, None].to(tl.int64) * stride_xm
    rows_o = offs_m[:, None].to(tl.int64) * stride_om
    a = tl.load(x_base + rows_x + k1[None, :], mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(x_base + rows_x + k2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_base + rows_o + k1[None, :], (a * c - bb * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + rows_o + k2[None, :], (a * s + bb * c).to(OUT.dtype.element_ty), mask=mask)


def _launch(x, out, cos, sin, interleaved, conjugate, offsets, offset, cu_seqlens, max_seqlen):
    """Rotate x into out (which may be x); ``offsets`` a (batch,) int tensor or None, then ``offset`` is used."""
    half = cos.shape[-1]
    if cu_seqlens is not None:
        batch, heads = cu_seqlens.shape[0] - 1, x.shape[1]
        seqlen = max_seqlen if max_seqlen is not None else x.shape[0]  # an upper bound; no host sync
        strides = (0, x.stride(0), x.stride(1), 0, out.stride(0), out.stride(1))
    else:
        batch, seqlen, heads = x.shape[0], x.shape[1], x.shape[2]
        strides = (x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2))
    if x.numel() == 0 or batch == 0:
        return out
    placeholder = cos  # pointer for the arguments a specialization does not read
    grid = (triton.cdiv(seqlen, BLOCK_M), batch, heads)
    _rotary_kernel[grid](x, out, cos, sin, placeholder if cu_seqlens is None else cu_seqlens,
                         placeholder if offsets is None else offsets, seqlen, cos.shape[0], half, *strides,
                         cos.stride(0), offset, IS_VARLEN=cu_seqlens is not None, OFFSET_TENSOR=offsets is not None,
                         INTERLEAVED=interleaved, CONJUGATE=conjugate, BLOCK_M=BLOCK_M,
                         BLOCK_K=triton.next_power_of_2(max(half, 1)))
    return out


def _rotated(x, cos, sin, interleaved, conjugate, offsets, offset, cu_seqlens, max_seqlen):
    """A rotated copy of x (channels past rotary_dim copied through)."""
    out = torch.empty_like(x)
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        out[..., rot:].copy_(x[..., rot:])
    return _launch(x, out, cos, sin, interleaved, conjugate, offsets, offset, cu_seqlens, max_seqlen)


_rotated_op = OpaqueOp("rotary", "(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool conjugate, "
                       "Tensor? offsets, int offset, Tensor? cu_seqlens, int? max_seqlen) -> Tensor", _rotated,
                       lambda x, *args: torch.empty_like(x))


def _prepare(x, cos, sin, seqlen_offsets):
    """Checks; returns (cos, sin, offsets tensor or None, int offset)."""
    if cos.shape != sin.shape or 2 * cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"cos and sin must be (seqlen, rotary_dim / 2) with rotary_dim <= headdim; got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)} for headdim {x.shape[-1]}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("apply_rotary_emb needs unit stride along headdim (x, cos and sin)")
    if sin.stride(0) != cos.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    if torch.is_tensor(seqlen_offsets):
        return cos, sin, seqlen_offsets.to(torch.int32), 0
    return cos, sin, None, int(seqlen_offsets)


def _returned_in_place(ctx, x):
    """flash-attn's contract for an in-place rotation: return x, which the kernel has just rewritten. Marked dirty
    where autograd allows it; a leaf that requires grad, or a view of one, is returned unmarked (autograd then
    hands back an alias of x carrying this Function's graph, as flash-attn's ApplyRotaryEmb does), its version
    bumped so that any graph that saved x's old values fails loudly instead of reading the rotated ones."""
    if autograd_refuses_in_place(x):
        torch.autograd.graph.increment_version(x)
    else:
        ctx.mark_dirty(x)
    return x


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        cos, sin, offsets, offset = _prepare(x, cos, sin, seqlen_offsets)
        ctx.save_for_backward(cos, sin, offsets, cu_seqlens)
        ctx.interleaved, ctx.offset, ctx.max_seqlen = interleaved, offset, max_seqlen
        if inplace:  # eager only (compiled: see the module docstring)
            _launch(x, x, cos, sin, interleaved, False, offsets, offset, cu_seqlens, max_seqlen)
            return _returned_in_place(ctx, x)
        return _rotated_op(x, cos, sin, interleaved, False, offsets, offset, cu_seqlens, max_seqlen)

    @staticmethod
    def backward(ctx, dout):
        cos, sin, offsets, cu_seqlens = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dx = _rotated_op(dout, cos, sin, ctx.interleaved, True, offsets, ctx.offset, cu_seqlens, ctx.max_seqlen)
        return dx, None, None, None, None, None, None, None


def _packed_parts(packed, num_heads_q, kv):
    """(q, k, v) views of qkv (batch, seqlen, 3, heads, d) or (batch, seqlen, heads_q + 2 * heads_k, d), each
    (batch, seqlen, heads, d); (None, k, v) for kv (batch, seqlen, 2, heads, d)."""
    if kv:
        if packed.dim() != 5 or packed.shape[2] != 2:
            raise ValueError(f"kv must be (batch, seqlen, 2, heads, headdim), got {tuple(packed.shape)}")
        return None, packed[:, :, 0], packed[:, :, 1]
    if packed.dim() == 5:
        if packed.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, heads, headdim), got {tuple(packed.shape)}")
        return packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    if packed.dim() != 4 or num_heads_q is None:
        raise ValueError("qkv must be (batch, seqlen, 3, heads, headdim), or (batch, seqlen, heads_q + 2 * heads_k, "
                         f"headdim) with num_heads_q; got {tuple(packed.shape)} and num_heads_q={num_heads_q}")
    heads_k = (packed.shape[2] - num_heads_q) // 2
    if num_heads_q <= 0 or heads_k <= 0 or packed.shape[2] != num_heads_q + 2 * heads_k:
        raise ValueError(f"qkv's {packed.shape[2]} heads are not num_heads_q={num_heads_q} + 2 * heads_k")
    return (packed[:, :, :num_heads_q], packed[:, :, num_heads_q:num_heads_q + heads_k],
            packed[:, :, num_heads_q + heads_k:])


def _rotate_packed(packed, tables, interleaved, conjugate, offsets, offset, num_heads_q, kv):
    """Rotate the q and k parts of ``packed`` in place, one launch each; tables = (cos, sin, cos_k, sin_k)."""
    q, k, _ = _packed_parts(packed, num_heads_q, kv)
    cos, sin, cos_k, sin_k = tables
    if q is not None:
        _launch(q, q, cos, sin, interleaved, conjugate, offsets, offset, None, None)
    _launch(k, k, cos_k, sin_k, interleaved, conjugate, offsets, offset, None, None)


class RotaryPackedFunction(torch.autograd.Function):
    """flash-attn's ApplyRotaryEmbQKV_ / ApplyRotaryEmbKV_ (eager): q and k rotated in place, packed returned."""

    @staticmethod
    def forward(ctx, packed, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, kv):
        _, k, _ = _packed_parts(packed, num_heads_q, kv)
        cos, sin, offsets, offset = _prepare(k, cos, sin, seqlen_offsets)
        cos_k, sin_k, _, _ = _prepare(k, cos_k, sin_k, 0)
        _rotate_packed(packed, (cos, sin, cos_k, sin_k), interleaved, False, offsets, offset, num_heads_q, kv)
        ctx.save_for_backward(cos, sin, cos_k, sin_k, offsets)
        ctx.args = (interleaved, offset, num_heads_q, kv)
        return _returned_in_place(ctx, packed)

    @staticmethod
    def backward(ctx, dpacked):
        cos, sin, cos_k, sin_k, offsets = ctx.saved_tensors
        interleaved, offset, num_heads_q, kv = ctx.args
        d = dpacked.clone(memory_format=torch.contiguous_format)  # v's part passes through unchanged
        _rotate_packed(d, (cos, sin, cos_k, sin_k), interleaved, True, offsets, offset, num_heads_q, kv)
        return d, None, None, None, None, None, None, None, None


def _packed_rotated_copy(packed, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, kv):
    """The packed tensor with q and k rotated, out of place (the compiled path)."""
    q, k, v = _packed_parts(packed, num_heads_q, kv)

    def rotate(t, c, s):
        return RotaryFunction.apply(t, c, s, interleaved, False, seqlen_offsets, None, None)

    k = rotate(k, cos_k, sin_k)
    if q is None:
        return torch.stack((k, v), dim=2)
    q = rotate(q, cos, sin)
    return torch.stack((q, k, v), dim=2) if packed.dim() == 5 else torch.cat((q, k, v), dim=2)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """x (batch, seqlen, heads, headdim), or (total_tokens, heads, headdim) with int32 cu_seqlens (batch + 1,);
    cos, sin (table_len, rotary_dim / 2); fp32/fp16/bf16. Returns the rotated tensor in x.dtype; with
    ``inplace=True`` x is rotated in place and returned (see the module docstring)."""
    if inplace and torch.compiler.is_compiling():
        return write_in_place(x, RotaryFunction.apply(x, cos, sin, interleaved, False, seqlen_offsets, cu_seqlens,
                                                       max_seqlen))
    return RotaryFunction.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """flash-attn's in-place rotary of packed q and k. qkv (batch, seqlen, 3, heads, headdim), or (batch, seqlen,
    heads_q + 2 * heads_k, headdim) with ``num_heads_q`` (GQA/MQA); cos, sin (table_len, rotary_dim / 2) for q,
    and for k unless cos_k, sin_k are given; seqlen_offsets an int or a (batch,) int tensor. Rotates q and k in
    place, leaves v, and returns qkv."""
    cos_k, sin_k = (cos, sin) if cos_k is None else (cos_k, sin_k)
    args = (cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, False)
    if torch.compiler.is_compiling():
        return write_in_place(qkv, _packed_rotated_copy(qkv, *args))
    return RotaryPackedFunction.apply(qkv, *args)


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """flash-attn's in-place rotary of packed k and v: kv (batch, seqlen, 2, heads, headdim), fp32/fp16/bf16;
    rotates k (kv[:, :, 0]) in place, leaves v, and returns kv."""
    args = (cos, sin, cos, sin, interleaved, seqlen_offsets, None, True)
    if torch.compiler.is_compiling():
        return write_in_place(kv, _packed_rotated_copy(kv, *args))
    return RotaryPackedFunction.apply(kv, *args)
