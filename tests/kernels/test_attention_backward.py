"""``evo.kernels.flash_attn_varlen_backward`` (issue 27's building block for a context-parallel ring): on both
backends, (dq, dk, dv) from the forward's out and lse equal autograd through the reference attention (the explicit
softmax, differentiated by torch), over packed sequences with GQA, causal masks, windows and softcap; and the
gradients of attention over two key blocks, each block's backward taking the merged out and lse, add up to the
whole attention's."""

import pytest
import torch

import evo.kernels as K
from evo.kernels import reference as ref

# (query lengths, key lengths, heads q, heads kv, causal, window, softcap)
CASES = {
    "causal gqa": ([5, 11, 1], [5, 11, 1], 4, 2, True, (-1, -1), 0.0),
    "window softcap": ([9, 7], [9, 7], 2, 2, True, (3, 0), 5.0),
    "cross lengths": ([3, 8], [10, 5], 2, 1, False, (-1, -1), 0.0),
    "causal, fewer keys": ([6, 4], [4, 4], 2, 2, True, (-1, -1), 0.0),  # bottom-right: early queries see none
}


def packed(lengths_q, lengths_k, hq, hkv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = 16
    q = torch.randn(sum(lengths_q), hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), hkv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, *lengths_q], dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths_k], dtype=torch.int32).cumsum(0).to(torch.int32)
    device = torch.get_default_device()
    return [t.to(device, dtype) for t in (q, k, v, dout)] + [cu_q.to(device), cu_k.to(device)]


def autograd_reference(q, k, v, dout, cu_q, cu_k, causal, window, softcap):
    """(out, lse, dq, dk, dv): reference.attention per sequence, differentiated by torch."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        o, lse = ref.attention(leaves[0][bq[i]:bq[i + 1]], leaves[1][bk[i]:bk[i + 1]], leaves[2][bk[i]:bk[i + 1]],
                               causal=causal, window_size=window, softcap=softcap)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs)
    out.backward(dout)
    return (out.detach(), torch.cat(lses, dim=1).detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_backward_from_out_and_lse_equals_autograd(case, backend):
    lengths_q, lengths_k, hq, hkv, causal, window, softcap = case
    dtype = torch.float64 if backend == "torch" else torch.float32  # Triton: fp32 (IEEE dots), the interpreter's
    q, k, v, dout, cu_q, cu_k = packed(lengths_q, lengths_k, hq, hkv, dtype)
    out, lse, *want = autograd_reference(*(t.double() for t in (q, k, v, dout)), cu_q, cu_k, causal, window, softcap)
    with K.use_backend(backend):
        got = K.flash_attn_varlen_backward(dout, q, k, v, out.to(dtype), lse.to(dtype), cu_q, cu_k, max(lengths_q),
                                           max(lengths_k), causal=causal, window_size=window, softcap=softcap)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_key_blocks_with_the_merged_lse_add_up_to_the_whole(backend):
    """The ring's step: each rank's queries against one key block at a time (non-causal), forward outputs merged by
    their lse, then each block's backward from the merged out and lse; dq summed over blocks and each block's dk,
    dv are the whole attention's."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    lengths_q, lengths_k = [6, 9], [8, 10]
    q, k, v, dout, cu_q, cu_k = packed(lengths_q, lengths_k, 4, 2, dtype, seed=3)
    _, _, *want = autograd_reference(*(t.double() for t in (q, k, v, dout)), cu_q, cu_k, False, (-1, -1), 0.0)
    bk = cu_k.tolist()
    halves = [[slice(bk[i], bk[i] + (bk[i + 1] - bk[i]) // 2) for i in range(2)],
              [slice(bk[i] + (bk[i + 1] - bk[i]) // 2, bk[i + 1]) for i in range(2)]]
    blocks = []
    with K.use_backend(backend):
        for rows in halves:
            kb, vb = torch.cat([k[r] for r in rows]), torch.cat([v[r] for r in rows])
            cu_b = torch.tensor([0, *[r.stop - r.start for r in rows]]).cumsum(0).to(torch.int32)
            o, lse, _ = K.flash_attn_varlen_func(q, kb, vb, cu_q, cu_b, max(lengths_q), int(cu_b.diff().max()),
                                                 return_attn_probs=True)
            blocks.append((rows, kb, vb, cu_b, o, lse))
        lse = torch.logaddexp(blocks[0][5], blocks[1][5])  # (heads, tokens)
        out = sum(torch.exp(b[5] - lse).transpose(0, 1)[..., None] * b[4].double() for b in blocks).to(dtype)
        dq = torch.zeros_like(q, dtype=torch.float64)
        dk, dv = torch.zeros_like(k, dtype=torch.float64), torch.zeros_like(v, dtype=torch.float64)
        for rows, kb, vb, cu_b, _, _ in blocks:
            g = K.flash_attn_varlen_backward(dout, q, kb, vb, out, lse, cu_q, cu_b, max(lengths_q),
                                             int(cu_b.diff().max()))
            dq += g[0].double()
            start = 0
            for r in rows:
                n = r.stop - r.start
                dk[r], dv[r] = g[1][start:start + n].double(), g[2][start:start + n].double()
                start += n
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, g, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)


def test_bad_lse_shape_is_refused():
    q, k, v, dout, cu_q, cu_k = packed([4], [4], 2, 2, torch.float32)
    with pytest.raises(ValueError, match=r"softmax_lse \(heads_q, total_q\) = \(2, 4\)"):
        K.flash_attn_varlen_backward(dout, q, k, v, q, torch.zeros(4, 2), cu_q, cu_k, 4, 4)
