"""Triton rotary against the fp64 reference, batched and varlen, both layouts, partial rotary dim."""

import pytest
import torch

from evo.kernels import reference as ref
from evo.kernels import rotary as tri
from oracle import assert_oracle, run_with_grads


def tables(length, rot, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def plain(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen):
    """The same-dtype PyTorch implementation: the reference's math with cos/sin rounded to x's dtype."""
    if x.dtype == torch.float64:
        return ref.apply_rotary_emb(x, cos, sin, interleaved, False, seqlen_offsets, cu_seqlens, max_seqlen)
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


def test_inplace_writes_into_x_and_backprops():
    cos, sin = tables(64, 16)
    base = torch.randn(2, 10, 2, 16, requires_grad=True)
    expected = ref.apply_rotary_emb(base.detach(), cos, sin)
    x = base * 1.0  # a non-leaf, so it may be modified in place
    out = tri.apply_rotary_emb(x, cos, sin, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected_grad = torch.autograd.grad(ref.apply_rotary_emb(base, cos, sin).sum(), base)[0]
    torch.testing.assert_close(base.grad, expected_grad)
