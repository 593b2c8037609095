"""Triton FlashAttention (through the interpreter on CPU) and the reference twin against an independent fp64
attention built here from flash-attn's documented rules, forward and backward, with the flash-attention oracle.
Shapes stay at 256 tokens or less: the interpreter runs tl.dot at about 1 GFLOP/s."""

import math

import pytest
import torch

from evo import kernels
from evo.kernels import attention as tri
from evo.kernels import reference as ref
from tests.kernels.oracle import assert_oracle, run_with_grads


def flash_window(causal, window, seqlen_q, seqlen_k):
    """flash-attn 2.8's window normalization, restated from csrc/flash_attn/flash_api.cpp (mha_fwd,
    mha_varlen_fwd, mha_fwd_kvcache, then set_params_fprop); seqlen_q, seqlen_k: the batch's (varlen: the
    max_seqlen arguments; kvcache: the cache length). Returns (left, right), None for an absent bound."""
    left, right = int(window[0]), int(window[1])
    if seqlen_q == 1:
        causal = False  # "causal=true is the same as causal=false in this case"
    if causal:
        right = 0
    left = None if left < 0 or left >= seqlen_k else left
    right = None if right < 0 or right >= seqlen_k else right
    if left is not None and right is None:
        right = seqlen_k  # set_params_fprop: "window_size_right = seqlen_k"
    if right is not None and left is None:
        left = seqlen_k  # likewise for the left side
    return left, right


def allowed_keys(sq, sk, left, right):
    """(sq, sk) bool from positions: query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if right is not None:
        ok &= j <= i + sk - sq + right
    if left is not None:
        ok &= j >= i + sk - sq - left
    return ok


def plain_attention(q, k, v, allowed, softcap=0.0, scale=None):
    """One sequence, every op in q's dtype (fp64 makes the exact reference): q (sq, hq, d), k and v (sk, hkv, d),
    allowed (sq, sk). Returns (out (sq, hq, d), lse (hq, sq)); a query without keys: zeros and lse +inf."""
    sq, hq, d = q.shape
    group = hq // k.shape[1]
    qt = q.transpose(0, 1)
    kt, vt = (t.transpose(0, 1).repeat_interleave(group, 0) for t in (k, v))
    s = qt @ kt.transpose(1, 2) * (scale if scale is not None else 1 / math.sqrt(d))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = allowed.to(q.device)
    has_key = allowed.any(-1, keepdim=True)
    s = torch.where(has_key, s.masked_fill(~allowed, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, -1) * allowed  # queries without keys: all zero
    lse = torch.where(has_key[..., 0], torch.logsumexp(s, -1), torch.full_like(s[..., 0], float("inf")))
    return (p @ vt).transpose(0, 1), lse


def plain_varlen(q, k, v, cu_q, cu_k, causal, window, softcap, max_q=None, max_k=None):
    """Packed sequences, the window normalized with the batch's max lengths (flash-attn's varlen rule)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    max_q = max_q or max(b - a for a, b in zip(bq, bq[1:]))
    max_k = max_k or max(b - a for a, b in zip(bk, bk[1:]))
    left, right = flash_window(causal, window, max_q, max_k)
    outs = [plain_attention(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]],
                            allowed_keys(bq[i + 1] - bq[i], bk[i + 1] - bk[i], left, right), softcap)
            for i in range(len(bq) - 1)]
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs], dim=1)


def check(lens_q, lens_k, hq, hkv, d, dtype, causal=False, window=(-1, -1), softcap=0.0, seed=0, twin=True):
    """The Triton kernel (and, with ``twin``, the reference twin) against the independent fp64 attention."""
    torch.manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d).to(dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d).to(dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d).to(dtype)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    mq, mk = max(lens_q), max(lens_k)
    p_out, p_grad = run_with_grads(lambda *t: plain_varlen(*t, cu_q, cu_k, causal, window, softcap)[0], [q, k, v])
    e_out, e_grad = run_with_grads(lambda *t: plain_varlen(*t, cu_q, cu_k, causal, window, softcap)[0],
                                   [q.double(), k.double(), v.double()])
    impls = {"triton": tri.flash_attn_varlen_func}
    if twin:
        impls["reference"] = ref.flash_attn_varlen_func
    for impl, fn in impls.items():
        k_out, k_grad = run_with_grads(lambda *t: fn(*t, cu_q, cu_k, mq, mk, **kw), [q, k, v])
        assert_oracle(f"{impl} out", k_out[0], p_out[0], e_out[0], dtype)
        for name, kg, pg, eg in zip(("dq", "dk", "dv"), k_grad, p_grad, e_grad):
            assert_oracle(f"{impl} {name}", kg, pg, eg, dtype, grad=True)
        _, lse, _ = fn(q, k, v, cu_q, cu_k, mq, mk, return_attn_probs=True, **kw)
        ref_lse = plain_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal, window, softcap)[1]
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


def test_causal_window_keeps_right_side_zero_varlen_qkvpacked():
    """Issue 9's case: under causal flash-attn forces the window's right side to 0 (evo used to let queries see
    `right` future keys: max error 3.7). Varlen qkv-packed, seqlen 97, head dim 59, fp16, a random window given as
    a tensor (as flash-attn's tests do), through evo.kernels on both backends, forward and backward."""
    gen = torch.Generator().manual_seed(9)
    s, d = 97, 59
    window = torch.randint(1, s, (2,), generator=gen)
    assert window[1] > 0
    qkv = torch.randn(s, 3, 2, d, generator=gen).half()
    cu = torch.tensor([0, s], dtype=torch.int32)

    def plain(t):
        return plain_varlen(t[:, 0], t[:, 1], t[:, 2], cu, cu, True, window, 0.0)[0]

    p_out, (p_grad,) = run_with_grads(plain, [qkv])
    e_out, (e_grad,) = run_with_grads(plain, [qkv.double()])
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            out, (grad,) = run_with_grads(
                lambda t: kernels.flash_attn_varlen_qkvpacked_func(t, cu, s, causal=True, window_size=window), [qkv])
        assert_oracle(f"{backend} out", out[0], p_out[0], e_out[0], torch.float16)
        assert_oracle(f"{backend} dqkv", grad, p_grad, e_grad, torch.float16, grad=True)


@pytest.mark.parametrize("lens_q, lens_k, causal, window", [
    ([40], [9], False, (3, -1)),  # left bounded: right becomes seqlen_k, so the first queries see no key
    ([40], [9], False, (-1, 12)),  # right >= seqlen_k: unbounded (all keys), not "j <= i + sk - sq + 12"
    ([9], [30], False, (50, 2)),  # left >= seqlen_k: unbounded
    ([1], [30], True, (2, 5)),  # one query: causal is off, the window stays
    ([30, 4], [6, 25], False, (7, -1)),  # varlen: right becomes max_seqlen_k (25), not the sequence's 6
    ([30, 4], [6, 25], False, (-1, 10)),  # varlen: 10 < max_seqlen_k stays bounded for the 6-key sequence
    ([30, 4], [6, 25], True, (30, 3)),  # causal: right 0; left >= max_seqlen_k: unbounded
])
def test_window_normalization_follows_flash_api(lens_q, lens_k, causal, window):
    """flash_api.cpp's rules on window_size (a side >= seqlen_k is unbounded; a bounded left bounds right at
    seqlen_k; varlen uses max_seqlen_k), both backends, forward, backward and lse."""
    check(lens_q, lens_k, 2, 1, 24, torch.float32, causal=causal, window=window)


def test_window_as_tensor_every_variant():
    """window_size as a pair of 0-d int64 tensors (flash-attn's tests: torch.randint(0, s, (2,))) in every
    public variant, both backends, against the independent attention."""
    torch.manual_seed(3)
    b, s, h, d = 2, 21, 2, 16
    window = torch.tensor([6, 2])
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    left, right = flash_window(False, window, s, s)
    expected = torch.stack([plain_attention(q[i].double(), k[i].double(), v[i].double(),
                                            allowed_keys(s, s, left, right))[0] for i in range(b)]).float()
    flat = [t.reshape(b * s, h, d) for t in (q, k, v)]
    calls = {
        "func": lambda: kernels.flash_attn_func(q, k, v, window_size=window),
        "kvpacked": lambda: kernels.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), window_size=window),
        "qkvpacked": lambda: kernels.flash_attn_qkvpacked_func(torch.stack((q, k, v), 2), window_size=window),
        "varlen": lambda: kernels.flash_attn_varlen_func(*flat, cu, cu, s, s, window_size=window),
        "varlen_kvpacked": lambda: kernels.flash_attn_varlen_kvpacked_func(flat[0], torch.stack(flat[1:], 1), cu, cu,
                                                                           s, s, window_size=window),
        "varlen_qkvpacked": lambda: kernels.flash_attn_varlen_qkvpacked_func(torch.stack(flat, 1), cu, s,
                                                                             window_size=window),
    }
    for backend in ("triton", "torch"):
        with kernels.use_backend(backend):
            for name, call in calls.items():
                torch.testing.assert_close(call().reshape(b, s, h, d), expected, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{backend} {name}: {m}")


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
    """On a GPU each kernel is autotuned over its own candidate tiles; EVO_AUTOTUNE=0 (the GPU tests) takes the
    first candidate instead. Checked without a GPU: only the launch plan is built."""
    import triton

    from evo.kernels import attention

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("EVO_AUTOTUNE", raising=False)  # bench/gpu_check.sh sets it for the test run
    for kernel in (attention._attn_fwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq):
        monkeypatch.delenv("EVO_AUTOTUNE", raising=False)
        tuned, opts = attention._launcher(kernel, 128)
        assert isinstance(tuned, triton.runtime.Autotuner) and opts == {} and tuned.fn is kernel
        assert [c.all_kwargs() for c in tuned.configs] == [c.all_kwargs() for c in attention.gpu_configs(kernel, 128)]
        assert len(tuned.configs) > 1
        monkeypatch.setenv("EVO_AUTOTUNE", "0")
        plain, opts = attention._launcher(kernel, 128)
        first = attention.gpu_configs(kernel, 128)[0]
        assert plain is kernel and opts == dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    # head-dim tiles map onto the lists by the smallest list that holds them
    tiles = lambda d: [c.all_kwargs() for c in attention.gpu_configs(attention._attn_fwd, d)]  # noqa: E731
    assert tiles(16) == tiles(64) and tiles(96) == tiles(128) != tiles(256)


def test_attention_kernels_use_no_atomics():
    """The determinism argument, checked where no GPU is needed: no kernel in attention.py uses an atomic
    operation, so every output tile is written by one program in a fixed loop order (the GPU test above
    then shows the bits)."""
    import inspect

    from evo.kernels import attention

    source = inspect.getsource(attention)
    assert "atomic" not in source.replace("No atomics", "").replace("no atomics", "")


@pytest.mark.parametrize("d, causal, window, softcap", [(64, True, (-1, -1), 0.0), (32, False, (20, 5), 3.0)])
def test_tma_forward_matches(monkeypatch, d, causal, window, softcap):
    """The Hopper path (TMA: host-built descriptors of q, k, v and out as (total, heads * head_dim); rows past a
    sequence are the next one's, masked out of the scores; the last, partial tile of a sequence stored through
    masks, whole tiles through TMA), through the interpreter, on varlen GQA batches whose lengths make both kinds
    of tile and tiles that run past the tensor's end."""
    from evo.kernels import attention

    monkeypatch.setenv("EVO_ATTN_TMA", "1")
    probe = torch.randn(8, 2, d, dtype=torch.bfloat16)
    assert attention._use_tma(probe, probe, probe, probe)
    check([1, 7, 100, 33], [1, 7, 100, 33], 4, 2, d, torch.bfloat16, causal=causal, window=window, softcap=softcap)
    check([32, 5, 48], [40, 17, 48], 4, 1, d, torch.float32, causal=causal, window=window, softcap=softcap,
          twin=False)
    odd = torch.randn(8, 2, 40, dtype=torch.bfloat16)  # a tile of 64 columns would read the next head's
    assert not attention._use_tma(odd, odd, odd, odd)
    rows_apart = torch.randn(8, 3, d, dtype=torch.bfloat16)[:, :2]  # rows 3 heads apart: a descriptor's stride
    assert attention._use_tma(probe, rows_apart, rows_apart, probe)
    heads_apart = torch.randn(8, 2, 2 * d, dtype=torch.bfloat16)[..., :d]  # heads not side by side in a row
    assert not attention._use_tma(probe, heads_apart, heads_apart, probe)
    monkeypatch.setenv("EVO_ATTN_TMA", "0")
    assert not attention._use_tma(probe, probe, probe, probe)


def test_tma_compile_failure_falls_back_to_the_copy_path(monkeypatch):
    """Triton 3.6's ptxas has crashed on TMA tiles: a fixed tile whose TMA forward fails to compile runs the copy
    path instead, says so once, and later calls go straight to the copy path. Any other error is raised."""
    from evo.kernels import attention

    monkeypatch.setenv("EVO_ATTN_TMA", "1")
    real = attention._launcher
    launches = []

    class CrashingTMA:  # the kernel as a launcher returns it, whose TMA specialization does not compile
        def __init__(self, kernel, error):
            self.kernel, self.error = kernel, error

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["TMA"])
                if kwargs["TMA"]:
                    raise self.error
                return self.kernel[grid](*args, **kwargs)
            return launch

    error = RuntimeError("PTXASError: `ptxas` raised SIGSEGV")
    monkeypatch.setattr(attention, "_launcher", lambda k, d: (CrashingTMA(real(k, d)[0], error), real(k, d)[1]))
    monkeypatch.setattr(attention, "_TUNED", {})
    warned = []  # the logger itself, whatever handlers an earlier test gave the "evo" logger
    monkeypatch.setattr(attention.log, "warning", lambda msg, *args: warned.append(msg % args))
    q = torch.randn(48, 2, 32, dtype=torch.bfloat16)
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    out = attention.flash_attn_varlen_func(q, q, q, cu, cu, 28, 28, causal=True)
    again = attention.flash_attn_varlen_func(q, q, q, cu, cu, 28, 28, causal=True)
    assert launches == [True, False, False]  # tried once, then the copy path only
    assert len(warned) == 1 and "did not compile for head_dim 32" in warned[0] and "SIGSEGV" in warned[0]
    expected = ref.flash_attn_varlen_func(q.float(), q.float(), q.float(), cu, cu, 28, 28, causal=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(out, again)
    monkeypatch.setattr(attention, "_TUNED", {})
    error = RuntimeError("an unrelated failure")
    with pytest.raises(RuntimeError, match="unrelated"):
        attention.flash_attn_varlen_func(q, q, q, cu, cu, 28, 28, causal=True)
