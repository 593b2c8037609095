"""Triton rotary against fp64 math written here, batched and varlen, both layouts, partial rotary dim, in place
(leaves included, as flash-attn allows), and flash-attn's packed in-place variants (qkv, GQA qkv, kv)."""

import pytest
import torch

from evo.kernels import reference as ref
from evo.kernels import rotary as tri
from tests.kernels.oracle import assert_oracle, run_with_grads


def tables(length, rot, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def plain(x, cos, sin, interleaved, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None):
    """The rotation from its definition, every op in x's dtype (cos/sin rounded to it): the same-dtype PyTorch
    implementation for 16-bit x, the exact one for fp64 x and tables."""
    rot = cos.shape[-1] * 2
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        pos = torch.arange(x.shape[0]) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
        offs = torch.repeat_interleave(seqlen_offsets, lengths) if torch.is_tensor(seqlen_offsets) else seqlen_offsets
        c, s = c[pos + offs][:, None], s[pos + offs][:, None]
    else:
        pos = torch.arange(x.shape[1])[None] + (seqlen_offsets[:, None] if torch.is_tensor(seqlen_offsets) else seqlen_offsets)
        c, s = c[pos][:, :, None], s[pos][:, :, None]
    xr = x[..., :rot]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
    else:
        a, b = xr.chunk(2, -1)
        out = torch.cat((a * c - b * s, a * s + b * c), -1)
    return torch.cat((out, x[..., rot:]), -1)


CASES = [  # (shape, rotary_dim, cu_seqlens, offsets)
    ((2, 37, 3, 64), 64, None, 0),
    ((2, 37, 3, 64), 32, None, 5),
    ((3, 20, 2, 40), 40, None, "tensor"),
    ((108, 2, 64), 64, [0, 1, 8, 108], 0),
    ((108, 2, 64), 48, [0, 1, 8, 108], 3),
    ((108, 2, 32), 32, [0, 1, 8, 108], "tensor"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape, rot, cu, offsets", CASES)
def test_rotary(shape, rot, cu, offsets, interleaved, dtype):
    torch.manual_seed(rot + len(shape))
    x = torch.randn(shape).to(dtype)
    cos, sin = tables(140, rot)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    nseq = len(cu) - 1 if cu is not None else shape[0]
    offs = torch.arange(nseq, dtype=torch.int32) * 2 if offsets == "tensor" else offsets
    max_len = 100 if cu is not None else None
    fn = lambda fn_: lambda x_: fn_(x_, cos, sin, interleaved, seqlen_offsets=offs, cu_seqlens=cu_t,  # noqa: E731
                                    max_seqlen=max_len)
    k_out, k_grad = run_with_grads(fn(tri.apply_rotary_emb), [x])
    p_out, p_grad = run_with_grads(lambda x_: plain(x_, cos, sin, interleaved, offs, cu_t, max_len), [x])
    e_out, e_grad = run_with_grads(lambda x_: plain(x_, cos.double(), sin.double(), interleaved, offs, cu_t, max_len),
                                   [x.double()])
    assert_oracle("out", k_out[0], p_out[0], e_out[0], dtype)
    assert_oracle("dx", k_grad[0], p_grad[0], e_grad[0], dtype, grad=True)


IMPLS = {"triton": tri, "reference": ref}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("leaf", [False, True])
def test_inplace_writes_into_x_and_backprops(leaf, impl):
    """flash-attn's inplace=True: x holds the rotated values and is returned; the gradient reaches x's producer,
    also when x is a leaf that requires grad (which a PyTorch in-place op refuses)."""
    cos, sin = tables(64, 16)
    x0 = torch.randn(2, 10, 2, 24)
    base = x0.clone().requires_grad_()
    x = base if leaf else base * 1.0  # a leaf, or a non-leaf
    out = IMPLS[impl].apply_rotary_emb(x, cos, sin, inplace=True, seqlen_offsets=3)
    expected = plain(x0.double(), cos.double(), sin.double(), False, 3)
    fp32 = dict(rtol=1e-6, atol=1e-6)  # fp32 results against fp64 math
    torch.testing.assert_close(out.double(), expected, **fp32)
    torch.testing.assert_close(x.detach().double(), expected, **fp32)  # rotated in place
    if impl == "triton":
        assert out.data_ptr() == x.data_ptr()
    g = torch.randn(out.shape)
    out.backward(g)
    x64 = x0.double().requires_grad_()
    plain(x64, cos.double(), sin.double(), False, 3).backward(g.double())
    torch.testing.assert_close(base.grad.double(), x64.grad, **fp32)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_inplace_on_a_view_of_a_leaf(impl):
    """flash-attn rotates q = qkv[:, :, 0] of a leaf qkv in place; the untouched parts keep their gradient."""
    cos, sin = tables(64, 8)
    qkv0 = torch.randn(2, 5, 3, 2, 16)
    qkv = qkv0.clone().requires_grad_()
    out = IMPLS[impl].apply_rotary_emb(qkv[:, :, 0], cos, sin, inplace=True)
    expected = plain(qkv0[:, :, 0].double(), cos.double(), sin.double(), False)
    fp32 = dict(rtol=1e-6, atol=1e-6)  # fp32 results against fp64 math
    torch.testing.assert_close(qkv.detach()[:, :, 0].double(), expected, **fp32)
    torch.testing.assert_close(qkv.detach()[:, :, 1:], qkv0[:, :, 1:], rtol=0, atol=0)
    (out.sum() + qkv.sum()).backward()
    q64 = qkv0[:, :, 0].double().requires_grad_()
    plain(q64, cos.double(), sin.double(), False).sum().backward()
    torch.testing.assert_close(qkv.grad[:, :, 0].double(), q64.grad + 1, **fp32)
    assert torch.all(qkv.grad[:, :, 1:] == 1)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_inplace_on_a_leaf_made_from_a_view(impl):
    """flash-attn's own rotary test builds x as a slice that is then made a leaf (its base needs no grad):
    x is rotated in place, returned, and its gradient is the rotation's."""
    cos, sin = tables(64, 8)
    x0 = torch.randn(3, 8, 2, 16)
    x = x0.clone()[:2]
    x.requires_grad_()
    out = IMPLS[impl].apply_rotary_emb(x, cos, sin, inplace=True)
    expected = plain(x0[:2].double(), cos.double(), sin.double(), False)
    fp32 = dict(rtol=1e-6, atol=1e-6)  # fp32 results against fp64 math
    torch.testing.assert_close(x.detach().double(), expected, **fp32)  # rotated in place
    torch.testing.assert_close(out.double(), expected, **fp32)
    g = torch.randn(out.shape)
    out.backward(g)
    x64 = x0[:2].double().requires_grad_()
    plain(x64, cos.double(), sin.double(), False).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, **fp32)


def plain_packed(packed, cos, sin, cos_k, sin_k, interleaved, offsets, num_heads_q, kv):
    """flash-attn's packed rotary from the definition (``plain``): q and k rotated, v untouched; functional."""
    def rot(t, c, s):
        return plain(t, c, s, interleaved, offsets)

    if kv:
        return torch.stack((rot(packed[:, :, 0], cos, sin), packed[:, :, 1]), dim=2)
    if packed.dim() == 5:
        return torch.stack((rot(packed[:, :, 0], cos, sin), rot(packed[:, :, 1], cos_k, sin_k), packed[:, :, 2]), 2)
    hk = (packed.shape[2] - num_heads_q) // 2
    q, k, v = packed.split([num_heads_q, hk, hk], dim=2)
    return torch.cat((rot(q, cos, sin), rot(k, cos_k, sin_k), v), dim=2)


PACKED = [  # (kind, shape, num_heads_q, rotary_dim, separate k tables, offsets, interleaved)
    ("qkv", (2, 19, 3, 2, 32), None, 32, False, 0, False),
    ("qkv", (2, 19, 3, 2, 32), None, 16, True, "tensor", True),
    ("qkv", (2, 19, 4 + 2 * 1, 32), 4, 32, False, 5, True),  # GQA: heads_q + 2 * heads_k
    ("qkv", (1, 7, 2 + 2 * 2, 24), 2, 24, True, "tensor", False),
    ("kv", (2, 19, 2, 3, 32), None, 32, False, 0, True),
    ("kv", (2, 19, 2, 3, 32), None, 16, False, "tensor", False),
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, shape, num_heads_q, rot, own_k, offsets, interleaved", PACKED)
def test_packed_in_place(kind, shape, num_heads_q, rot, own_k, offsets, interleaved, dtype, impl):
    torch.manual_seed(rot + shape[2])
    packed0 = torch.randn(shape).to(dtype)
    cos, sin = tables(40, rot)
    cos_k, sin_k = (c.flip(0).contiguous() for c in tables(40, rot)) if own_k else (cos, sin)
    offs = torch.tensor([3, 0], dtype=torch.int32)[:shape[0]] if offsets == "tensor" else offsets
    mod = IMPLS[impl]

    def kernel(p):
        if kind == "kv":
            return mod.apply_rotary_emb_kv_(p, cos, sin, interleaved=interleaved, seqlen_offsets=offs)
        return mod.apply_rotary_emb_qkv_(p, cos, sin, cos_k if own_k else None, sin_k if own_k else None,
                                         interleaved=interleaved, seqlen_offsets=offs, num_heads_q=num_heads_q)

    args = (interleaved, offs, num_heads_q, kind == "kv")
    packed = packed0.clone().requires_grad_()
    out = kernel(packed)  # on a leaf that requires grad, as flash-attn's tests call it
    assert out.dtype == dtype and out.shape == packed0.shape
    torch.testing.assert_close(packed.detach(), out.detach(), rtol=0, atol=0)  # rotated in place
    if impl == "triton":
        assert out.data_ptr() == packed.data_ptr()
    k_out, k_grad = run_with_grads(kernel, [packed0])
    p_out, p_grad = run_with_grads(lambda p: plain_packed(p, cos, sin, cos_k, sin_k, *args), [packed0])
    e_out, e_grad = run_with_grads(lambda p: plain_packed(p, cos.double(), sin.double(), cos_k.double(),
                                                          sin_k.double(), *args), [packed0.double()])
    assert_oracle("out", k_out[0], p_out[0], e_out[0], dtype)
    assert_oracle("dpacked", k_grad[0], p_grad[0], e_grad[0], dtype, grad=True)
    untouched = (slice(None), slice(None), -1) if packed0.dim() == 5 else (slice(None), slice(None), slice(-1, None))
    assert torch.equal(k_out[0][untouched], packed0[untouched])  # v is left bit for bit
    assert torch.equal(k_grad[0][untouched], p_grad[0][untouched])  # and its gradient passes through


def test_packed_shape_errors():
    cos, sin = tables(8, 8)
    with pytest.raises(ValueError, match="num_heads_q"):
        tri.apply_rotary_emb_qkv_(torch.randn(1, 4, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="kv must be"):
        tri.apply_rotary_emb_kv_(torch.randn(1, 4, 3, 2, 8), cos, sin)
