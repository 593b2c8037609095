"""Triton FlashAttention (through the interpreter on CPU) against the fp64 reference, forward and
backward, with the flash-attention oracle. Shapes stay at 256 tokens or less: the interpreter runs
tl.dot at about 1 GFLOP/s."""

import math

import pytest
import torch

from evo.kernels import attention as tri
from evo.kernels import reference as ref
from oracle import assert_oracle, run_with_grads


def plain_attention(q, k, v, causal, window, softcap):
    """The same-dtype PyTorch implementation, one sequence: every op in the input dtype."""
    sq, hq, d = q.shape
    group = hq // k.shape[1]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(group, 0), v.transpose(0, 1).repeat_interleave(group, 0)
    s = qt @ kt.transpose(1, 2) / math.sqrt(d)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = ref._attention_mask(sq, k.shape[0], causal, window, q.device)
    if mask is None:
        return (torch.softmax(s, -1) @ vt).transpose(0, 1)
    has_key = mask.any(-1, keepdim=True)
    s = torch.where(has_key, s.masked_fill(~mask, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, -1) * mask  # queries without keys: all zero
    return (p @ vt).transpose(0, 1)


def plain_varlen(q, k, v, cu_q, cu_k, causal, window, softcap):
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return torch.cat([plain_attention(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]], causal, window, softcap)
                      for i in range(len(bq) - 1)])


def check(lens_q, lens_k, hq, hkv, d, dtype, causal=False, window=(-1, -1), softcap=0.0, seed=0):
    torch.manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d).to(dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d).to(dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d).to(dtype)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    mq, mk = max(lens_q), max(lens_k)
    k_out, k_grad = run_with_grads(lambda *t: tri.flash_attn_varlen_func(*t, cu_q, cu_k, mq, mk, **kw), [q, k, v])
    p_out, p_grad = run_with_grads(lambda *t: plain_varlen(*t, cu_q, cu_k, causal, window, softcap), [q, k, v])
    e_out, e_grad = run_with_grads(lambda *t: ref.flash_attn_varlen_func(*t, cu_q, cu_k, mq, mk, **kw),
                                   [q.double(), k.double(), v.double()])
    assert_oracle("out", k_out[0], p_out[0], e_out[0], dtype)
    for name, kg, pg, eg in zip(("dq", "dk", "dv"), k_grad, p_grad, e_grad):
        assert_oracle(name, kg, pg, eg, dtype, grad=True)
    _, lse, _ = tri.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, return_attn_probs=True, **kw)
    _, ref_lse, _ = ref.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk,
                                               return_attn_probs=True, **kw)
    assert lse.dtype == torch.float32 and lse.shape == (hq, int(cu_q[-1]))
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("d", [32, 40, 64, 80, 111, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(d, causal):
    check([97], [97], 4, 2, d, torch.bfloat16, causal=causal, seed=d)


@pytest.mark.parametrize("seqlen", [1, 33, 128, 255])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens_mha_fp16(seqlen, causal):
    check([seqlen], [seqlen], 2, 2, 64, torch.float16, causal=causal, seed=seqlen)


@pytest.mark.parametrize("causal", [False, True])
def test_mqa_fp32(causal):
    check([70], [70], 4, 1, 40, torch.float32, causal=causal)


@pytest.mark.parametrize("sq, sk", [(33, 97), (97, 33)])
def test_causal_bottom_right_with_unequal_lengths(sq, sk):
    check([sq], [sk], 2, 1, 32, torch.float32, causal=True)  # with sq > sk the first queries see no key


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed(causal):
    check([1, 7, 100, 33], [1, 7, 100, 33], 4, 2, 64, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("window, causal", [((16, 0), True), ((40, 0), True), ((8, 8), False), ((5, -1), False)])
def test_sliding_window(window, causal):
    check([7, 90], [7, 90], 2, 1, 32, torch.float32, causal=causal, window=window)


def test_softcap():
    check([60, 5], [60, 5], 2, 2, 32, torch.bfloat16, causal=True, softcap=5.0)
    check([40], [40], 2, 1, 32, torch.float32, softcap=2.0)


def test_batched_api_and_lse_layout():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 19, 4, 32), torch.randn(2, 23, 2, 32), torch.randn(2, 23, 2, 32)
    out, lse, _ = tri.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_out, ref_lse, _ = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 4, 19)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_deterministic_backward_bit_identical():
    # the interpreter runs programs one at a time, so it cannot show races; the GPU test below can
    torch.manual_seed(1)
    q, k, v = torch.randn(50, 4, 32), torch.randn(50, 2, 32), torch.randn(50, 2, 32)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    _, g1 = run_with_grads(lambda *t: tri.flash_attn_varlen_func(*t, cu, cu, 30, 30, causal=True), [q, k, v])
    _, g2 = run_with_grads(lambda *t: tri.flash_attn_varlen_func(*t, cu, cu, 30, 30, causal=True), [q, k, v])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_unsupported_arguments_raise_clearly():
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(NotImplementedError, match="dropout"):
        tri.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        tri.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="heads_q a multiple of heads_kv"):
        tri.flash_attn_func(torch.randn(1, 4, 3, 32), q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (races only show there)")
def test_gpu_backward_is_bit_identical_across_runs():
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(4, 2048, 16, 128, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn(4, 2048, 4, 128, device=dev, dtype=torch.bfloat16), torch.randn(4, 2048, 4, 128, device=dev,
                                                                                          dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        _, g = run_with_grads(lambda *t: tri.flash_attn_func(*t, causal=True), [q, k, v])
        grads.append(g)
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(g, grads[0]))


def test_gpu_launcher_autotunes_unless_told_not_to(monkeypatch):
    """On a GPU the kernels are autotuned over the candidate tiles; EVO_AUTOTUNE=0 (the GPU tests) takes
    the smallest candidate instead. Checked without a GPU: only the launch plan is built."""
    import triton

    from evo.kernels import attention

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("EVO_AUTOTUNE", raising=False)  # bench/gpu_check.sh sets it for the test run
    tuned, opts = attention._launcher(attention._attn_fwd, 128)
    assert isinstance(tuned, triton.runtime.Autotuner) and opts == {}
    assert len(tuned.configs) == len(attention._gpu_configs(128)) > 1
    monkeypatch.setenv("EVO_AUTOTUNE", "0")
    kernel, opts = attention._launcher(attention._attn_fwd, 128)
    assert kernel is attention._attn_fwd
    sizes = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages for c in attention._gpu_configs(128)]
    assert opts["BLOCK_M"] * opts["BLOCK_N"] * opts["num_stages"] == min(sizes)


def test_attention_kernels_use_no_atomics():
    """The determinism argument, checked where no GPU is needed: no kernel in attention.py uses an atomic
    operation, so every output tile is written by one program in a fixed loop order (the GPU test above
    then shows the bits)."""
    import inspect

    from evo.kernels import attention

    source = inspect.getsource(attention)
    assert "atomic" not in source.replace("No atomics", "").replace("no atomics", "")


@pytest.mark.parametrize("d, causal, window, softcap", [(64, True, (-1, -1), 0.0), (40, False, (20, 5), 3.0)])
def test_tma_forward_matches(monkeypatch, d, causal, window, softcap):
    """The opt-in Hopper path (EVO_ATTN_TMA=1: K and V through tensor descriptors, zero-filled past each
    sequence and past head_dim), through the interpreter, on a varlen GQA batch."""
    from evo.kernels import attention

    monkeypatch.setenv("EVO_ATTN_TMA", "1")
    probe = torch.randn(8, 2, d, dtype=torch.bfloat16)
    assert attention._use_tma(probe, probe, probe)
    check([1, 7, 100, 33], [1, 7, 100, 33], 4, 2, d, torch.bfloat16, causal=causal, window=window, softcap=softcap)
    odd = torch.randn(8, 2, 111, dtype=torch.bfloat16)  # rows of 222 bytes: TMA cannot, the pointer path does
    assert not attention._use_tma(odd, odd, odd)
