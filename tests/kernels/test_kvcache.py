"""flash_attn_with_kvcache on both backends (Triton through the interpreter, and the reference) against an
independent fp64 model of flash-attn 2.8's documented semantics, built here from positions: the in-place cache
update, rotary as a complex rotation, the mask from cache_seqlens / cache_leftpad / the window, cache_batch_idx.
Small shapes (at most 96 cache rows)."""

import math

import pytest
import torch

from evo import kernels
from tests.kernels.oracle import assert_oracle
from tests.kernels.test_attention import allowed_keys, flash_window, plain_attention

BACKENDS = ("triton", "torch")
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def rotate(x, angle, interleaved):
    """x (..., d) with its first 2 * angle.shape[-1] channels rotated in fp64: each channel pair (a, b) as the
    complex a + ib times e^(i angle); pairs are (2i, 2i + 1) interleaved, else (i, i + rotary_dim / 2)."""
    half = angle.shape[-1]
    x = x.double()
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    else:
        a, b = x[..., :half], x[..., half:2 * half]
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angle), angle)
    rotated = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((rotated, x[..., 2 * half:]), -1)


def expected(q, k_cache, v_cache, k, v, angle, cache_seqlens, batch_idx, leftpad, causal, window, softcap,
             interleaved, dtype):
    """flash-attn's documented semantics, per batch row. Returns (caches after the update, exact out and lse in
    fp64, the same-dtype out: rotation rounded to dtype, attention in dtype)."""
    batch, sq = q.shape[:2]
    cache_len = k_cache.shape[1]
    k_after, v_after = k_cache.clone(), v_cache.clone()
    left, right = flash_window(causal, window, sq, cache_len)
    rows = batch_idx if batch_idx is not None else list(range(batch))
    exact_out, exact_lse, plain_out = [], [], []
    for b in range(batch):
        start = 0 if leftpad is None else leftpad[b]
        seqlen_cache = cache_len if cache_seqlens is None else cache_seqlens[b]
        keys, values = k_cache[rows[b]].double(), v_cache[rows[b]].double()
        new = 0
        if k is not None:
            new = k.shape[1]
            pos = torch.arange(seqlen_cache, seqlen_cache + new)
            k_new = rotate(k[b], angle[pos][:, None], interleaved) if angle is not None else k[b].double()
            keys[seqlen_cache:seqlen_cache + new], values[seqlen_cache:seqlen_cache + new] = k_new, v[b].double()
            k_after[rows[b], seqlen_cache:seqlen_cache + new] = k_new.to(dtype)
            v_after[rows[b], seqlen_cache:seqlen_cache + new] = v[b]
        qb = q[b].double()
        if angle is not None:  # causal or local: query i at cache_seqlens + i; else every query at cache_seqlens
            steps = torch.arange(sq) if (left is not None or right is not None) else torch.zeros(sq, dtype=torch.long)
            qb = rotate(q[b], angle[seqlen_cache + steps][:, None], interleaved)
        keys, values = keys[start:seqlen_cache + new], values[start:seqlen_cache + new]
        allowed = allowed_keys(sq, keys.shape[0], left, right)
        out, lse = plain_attention(qb, keys, values, allowed, softcap)
        exact_out.append(out)
        exact_lse.append(lse)
        plain_out.append(plain_attention(qb.to(dtype), keys.to(dtype), values.to(dtype), allowed, softcap)[0])
    return k_after, v_after, torch.stack(exact_out), torch.stack(exact_lse), torch.stack(plain_out)


def run(backend, dtype, batch, seqlen_q, seqlen_new, cache_len, heads, heads_kv, d, rotary_dim=0, interleaved=True,
        causal=False, window=(-1, -1), softcap=0.0, seqlens="tensor", batch_cache=None, leftpad=False, seed=0):
    """One call of evo.kernels.flash_attn_with_kvcache checked against ``expected``: output (the oracle), lse, and
    the cache: new rows written (k rotated), every other entry untouched."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, d, generator=gen).to(dtype)
    batch_cache = batch_cache or batch
    k_cache = torch.randn(batch_cache, cache_len, heads_kv, d, generator=gen).to(dtype)
    v_cache = torch.randn(batch_cache, cache_len, heads_kv, d, generator=gen).to(dtype)
    k = v = None
    if seqlen_new:
        k = torch.randn(batch, seqlen_new, heads_kv, d, generator=gen).to(dtype)
        v = torch.randn(batch, seqlen_new, heads_kv, d, generator=gen).to(dtype)
    lengths = None  # python ints per batch row, for the expectation
    if seqlens == "tensor":
        lengths = torch.randint(0, cache_len - max(seqlen_new, seqlen_q) + 1, (batch,), generator=gen).tolist()
        cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    elif seqlens == "none":
        cache_seqlens = None
    elif isinstance(seqlens, list):
        lengths = seqlens
        cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    else:
        cache_seqlens = int(seqlens)
        lengths = [cache_seqlens] * batch
    pad = None
    if leftpad:
        pad = [int(torch.randint(0, max(n, 1), (1,), generator=gen)) for n in lengths or [cache_len] * batch]
    batch_idx = None
    if batch_cache != batch:
        batch_idx = torch.randperm(batch_cache, generator=gen)[:batch].tolist()
    angle = cos = sin = None
    if rotary_dim:
        angle = torch.rand(cache_len, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
        cos, sin = angle.cos().float(), angle.sin().float()  # fp32 tables whatever the dtype, as the model passes
    k_after, v_after, exact_out, exact_lse, plain_out = expected(
        q, k_cache, v_cache, k, v, angle, lengths, batch_idx, pad, causal, window, softcap, interleaved, dtype)
    k_cache_in, v_cache_in = k_cache.clone(), v_cache.clone()
    with kernels.use_backend(backend):
        out, lse = kernels.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
            cache_batch_idx=None if batch_idx is None else torch.tensor(batch_idx, dtype=torch.int32),
            cache_leftpad=None if pad is None else torch.tensor(pad, dtype=torch.int32), causal=causal,
            window_size=window, softcap=softcap, rotary_interleaved=interleaved, return_softmax_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, heads, seqlen_q)
    assert_oracle(f"{backend} out", out, plain_out, exact_out, dtype)
    torch.testing.assert_close(lse.double(), exact_lse, atol=LSE_TOL[dtype], rtol=0)
    written = (k_after != k_cache_in) | (v_after != v_cache_in)
    assert torch.equal(v_cache, v_after), "v_cache: new rows written as given, nothing else changed"
    assert torch.equal(k_cache[~written], k_cache_in[~written]), "k_cache changed outside the new rows"
    # the new k rows hold the rotation rounded to dtype; the interpreter rounds bf16 toward zero: one ulp
    torch.testing.assert_close(k_cache, k_after, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_gqa_rotary(backend):
    """One token per sequence appended at per-row cache_seqlens (a tensor), rotary interleaved, causal."""
    run(backend, torch.float16, batch=3, seqlen_q=1, seqlen_new=1, cache_len=80, heads=4, heads_kv=2, d=32,
        rotary_dim=32, interleaved=True, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_long_cache_bf16(backend):
    """A bf16 decode step over ~900 cached keys (cheap: one query per sequence). Here a kernel that drops one
    key (the newest) shifts every output by ~1/900 of a value: inside the max bound's bf16 floor (1e-2), but
    about twice the mean bound, which this test exists to exercise."""
    run(backend, torch.bfloat16, batch=2, seqlen_q=1, seqlen_new=1, cache_len=1024, heads=4, heads_kv=1, d=64,
        rotary_dim=64, interleaved=False, causal=True, seqlens=[1000, 771], seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, window, softcap, interleaved", [(torch.bfloat16, (7, 0), 5.0, False),
                                                                 (torch.float32, (-1, -1), 0.0, True),
                                                                 (torch.float16, (-1, -1), 0.0, False)])
def test_prefill_as_the_generation_path_calls_it(backend, dtype, window, softcap, interleaved):
    """The model's call: a prompt longer than one token into an empty cache (int cache_seqlens 0), fp32 rotary
    tables over the full head dim, causal with a sliding window or none, softcap, MQA."""
    run(backend, dtype, batch=2, seqlen_q=13, seqlen_new=13, cache_len=48, heads=4, heads_kv=1, d=32,
        rotary_dim=32, interleaved=interleaved, causal=True, window=window, softcap=softcap, seqlens=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_window_leftpad_batch_idx_partial_rotary(backend):
    """A chunk of 6 queries with 4 new keys (seqlen_new != seqlen_q), a window given as a tensor, not causal;
    cache_leftpad, cache_batch_idx into a larger cache, rotary over half the head dim."""
    run(backend, torch.float16, batch=2, seqlen_q=6, seqlen_new=4, cache_len=96, heads=2, heads_kv=2, d=32,
        rotary_dim=16, interleaved=False, window=torch.tensor([20, 3]), batch_cache=4, leftpad=True, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_causal_rotates_every_query_at_cache_seqlens(backend):
    """Neither causal nor local: all of q sits at position cache_seqlens (flash-attn's docstring)."""
    run(backend, torch.float32, batch=2, seqlen_q=5, seqlen_new=5, cache_len=40, heads=4, heads_kv=2, d=24,
        rotary_dim=24, interleaved=True, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_new_keys(backend):
    """Without k and v: the whole cache (cache_seqlens None), or per-row lengths with leftpad; nothing written."""
    run(backend, torch.float16, batch=2, seqlen_q=3, seqlen_new=0, cache_len=50, heads=2, heads_kv=1, d=40,
        causal=True, seqlens="none", seed=3)
    run(backend, torch.bfloat16, batch=2, seqlen_q=1, seqlen_new=0, cache_len=50, heads=2, heads_kv=1, d=40,
        causal=True, window=(9, 0), leftpad=True, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_queries_than_keys_leaves_first_queries_empty(backend):
    """cache_seqlens 0, 2 new keys, 5 causal queries: bottom-right alignment leaves queries 0-2 without a key
    (zeros, lse +inf)."""
    run(backend, torch.float32, batch=1, seqlen_q=5, seqlen_new=2, cache_len=8, heads=2, heads_kv=2, d=16,
        causal=True, seqlens=0)


def test_unsupported_and_invalid_arguments_raise():
    q, cache = torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16)
    new = torch.randn(1, 1, 2, 16)
    for backend in BACKENDS:
        with kernels.use_backend(backend):
            with pytest.raises(NotImplementedError, match="block_table"):
                kernels.flash_attn_with_kvcache(q, cache, cache, block_table=torch.zeros(1, 1, dtype=torch.int32))
            with pytest.raises(NotImplementedError, match="alibi_slopes"):
                kernels.flash_attn_with_kvcache(q, cache, cache, alibi_slopes=torch.ones(2))
            with pytest.raises(ValueError, match="cache_seqlens"):
                kernels.flash_attn_with_kvcache(q, cache, cache, new, new)
            with pytest.raises(ValueError, match="need new k"):
                kernels.flash_attn_with_kvcache(q, cache, cache, rotary_cos=torch.ones(8, 4),
                                                rotary_sin=torch.zeros(8, 4), cache_seqlens=1)
            with pytest.raises(ValueError, match="cover 4 positions"):
                kernels.flash_attn_with_kvcache(q, cache, cache, new, new, rotary_cos=torch.ones(4, 4),
                                                rotary_sin=torch.zeros(4, 4), cache_seqlens=1)
