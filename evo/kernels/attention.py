"""FlashAttention-style attention in Triton: forward and backward, causal, GQA, packed varlen, KV cache.

Math, per sequence and query head h (kv head h // (heads_q / heads_kv)), scale c:
    s_ij = c * q_i . k_j;   with softcap: s_ij = cap * tanh(s_ij / cap)
    key j is allowed for query i when, with shift = seqlen_k - seqlen_q (bottom-right alignment):
        j <= i + shift + right  (when right >= 0)   and   j >= i + shift - left   (when left >= 0)
    (left, right) is flash-attn's window after its normalization (reference.attention_window: causal forces
    right = 0, a side >= seqlen_k is unbounded, ...), done once per call with the call's seqlen_q / seqlen_k.
    lse_i = log sum_j exp(s_ij),   p_ij = exp(s_ij - lse_i),   o_i = sum_j p_ij v_j
A query with no allowed key outputs zeros and gets lse = +inf (so its backward p is 0), as flash-attn.

Forward (``_attn_fwd``): a program owns BLOCK_M queries of one head of one sequence, streams the key
blocks that can be allowed, and keeps the online-softmax state (running max m, sum l, accumulator)
in fp32 registers, in base 2 (exp2, with log2(e) folded into the scale). The scale is folded as the Triton
tutorial does: the row max is taken on raw scores and p = exp2(qk * scale2 - m) is one fused multiply-add per
score. Key blocks are split into masked ones (the diagonal, the window's edges, the sequence's end: one compare
per score, the sequence end and the window's right side making one bound per query) and unmasked ones in
between. Nothing of size seqlen x seqlen is ever stored. Saved: q, k, v, out and lse (fp32).

Backward recomputes p from q, k and lse. With delta_i = sum_d do_id * o_id (``_attn_bwd_delta``):
    dv_j = sum_i p_ij do_i,   dp_ij = do_i . v_j,   ds_ij = p_ij (dp_ij - delta_i) [* (1 - tanh^2) with softcap]
    dq_i = c * sum_j ds_ij k_j,   dk_j = c * sum_i ds_ij q_i
``_attn_bwd_dkdv`` owns a key block of one kv head and loops over every query head of its group and
every query block that can see it, so dK and dV are summed over the group in registers and written
once. It works key-major: its tile is s^T = k q^T (BLOCK_N keys x BLOCK_M queries), so all four of its dots
have M = BLOCK_N and run on Hopper's warpgroup MMA (which needs M >= 64), with small query blocks.
``_attn_bwd_dq`` owns a query block and loops over key blocks. No atomics anywhere: the same inputs give
bit-identical gradients.

Layout: q (total_q, heads_q, d), k and v (total_k, heads_kv, d) with int32 cu_seqlens (batch + 1,);
the batched API is reshaped onto this one. ``flash_attn_with_kvcache`` (forward only, as flash-attn) runs the
same forward kernel with KV_CACHE: batch row b's keys are read in place from its cache row, from element offsets
and a key count the launcher computes from cache_batch_idx, cache_leftpad and cache_seqlens (no host sync, no
copy of the cache); the cache update and rotary happen before it (reference.prepare_kvcache, shared by both
backends, with evo's rotary kernel here). Head dims that are not powers of two are padded to
BLOCK_D inside the kernel (masked loads). Under Triton's interpreter the tiles are cast to fp32 before
``tl.dot`` (its bf16 dot is wrong); fp32 inputs use exact ("ieee") dots.

TMA (the forward's default on Hopper and newer; ``EVO_ATTN_TMA=0`` turns it off): q, k, v and out are seen by
descriptors built once on the host as (total, heads * head_dim) matrices (head_dim a power of two, each row's
heads side by side), and whole tiles move through the tensor memory accelerator. A key tile that runs past its
sequence holds the next sequence's rows, masked out of the scores (p = 0 there, so only a value that is not
finite there would show); a query tile's output goes through TMA only when the tile lies wholly inside its
sequence, since a store past the end would overwrite the next sequence's rows: the last, partial tile stores with
masks (FA3 turns its TMA store off for varlen for the same reason). The tiles were chosen from what the compiler
makes for sm_90a (bench/kernel_report.py); where a TMA compile fails (Triton 3.6's ptxas has crashed on TMA
tiles) the autotuner drops that candidate, and a fixed tile (``EVO_AUTOTUNE=0``, the interpreter) falls back to
the copy path, logged once.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from evo.kernels.reference import attention_window, prepare_kvcache
from evo.kernels.rotary import apply_rotary_emb
from evo.kernels.triton_utils import OpaqueOp, interpreting

log = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
TMA_DEFAULT = True  # the forward on Hopper when EVO_ATTN_TMA is not set: 1 TMA, 0 per-thread copies


@triton.jit
def _seq(CU, b):
    """(start row, length) of packed sequence b."""
    start = tl.load(CU + b).to(tl.int64)
    return start, (tl.load(CU + b + 1) - start).to(tl.int32)


@triton.jit
def _dot_qk(q, k, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Raw scores q . k of a (BM, D) query tile against a (BN, D) key tile, fp32."""
    if DOT_FP32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _capped(qk, scale2, softcap):
    """Softcapped base-2 scores cap * tanh(c * qk / cap) * log2(e) (scale2 = c * log2(e)), and the tanh for
    backward."""
    t = 2.0 * tl.sigmoid(2.0 * (qk * (scale2 / 1.4426950408889634) / softcap)) - 1.0
    return softcap * t * 1.4426950408889634, t


@triton.jit
def _scores(q, k, scale2, softcap, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of a (BM, D) query tile against a (BN, D) key tile; also tanh(s / cap) for backward."""
    qk = _dot_qk(q, k, DOT_FP32, PRECISION)
    if SOFTCAP:
        return _capped(qk, scale2, softcap)
    return qk * scale2, qk


@triton.jit
def _mask(offs_m, offs_n, seqlen_q, seqlen_k, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
          KEY_MAJOR: tl.constexpr = False):
    """Allowed (query, key) pairs of a tile, bottom-right aligned: (BM, BN), or (BN, BM) when KEY_MAJOR. The
    sequence's end and the window's right side make one bound per query (one compare per score); queries past
    seqlen_q are not checked: their output is never stored, and in backward their lse of +inf makes p zero."""
    diag = offs_m + (seqlen_k - seqlen_q)
    last = tl.minimum(diag + right, seqlen_k - 1)  # per query: the last key it may see
    first = diag - left  # and the first
    if KEY_MAJOR:  # keys down the tile, queries across
        keys, last, first = offs_n[:, None], last[None, :], first[None, :]
    else:
        keys, last, first = offs_n[None, :], last[:, None], first[:, None]
    if CAUSAL:
        allowed = keys <= last
    else:
        allowed = keys < seqlen_k
    if LOCAL:
        allowed = allowed & (keys >= first)
    return allowed


@triton.jit
def _key_ranges(m0, seqlen_q, seqlen_k, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block starts for query rows [m0, m0 + BLOCK_M): [lo, full_lo) and [full_hi, hi) hold blocks that
    need the mask (diagonal, window edge, sequence end); [full_lo, full_hi) blocks are allowed whole."""
    shift = seqlen_k - seqlen_q
    hi = seqlen_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(hi, m0 + BLOCK_M + shift + right), 0)
    lo = 0
    full_lo = 0
    if LOCAL:
        lo = (tl.maximum(0, m0 + shift - left) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(0, m0 + BLOCK_M - 1 + shift - left), BLOCK_N) * BLOCK_N
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, (tl.maximum(0, m0 + shift + right + 1) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, seqlen_q, seqlen_k, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block starts for key rows [n0, n0 + BLOCK_N), split like ``_key_ranges``."""
    shift = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = (tl.maximum(0, n0 - shift - right) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(0, n0 + BLOCK_N - 1 - shift - right), BLOCK_M) * BLOCK_M
    hi = seqlen_q
    full_hi = seqlen_q
    if LOCAL:
        hi = tl.maximum(tl.minimum(hi, n0 + BLOCK_N - shift + left), 0)
        full_hi = (tl.maximum(0, n0 + left - shift + 1) // BLOCK_M) * BLOCK_M
    if n0 + BLOCK_N > seqlen_k:  # a partial key block is masked throughout
        full_lo = hi
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, kv_row, kv_col, stride_km, stride_vm, start_n, offs_m, offs_d, d_ok, seqlen_q,
              seqlen_k, scale2, softcap, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
              SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """One key block of the online softmax. K and V point at this sequence's kv head; with TMA they are the
    whole tensors' descriptors, and this sequence's head starts at row kv_row, column kv_col (rows past the
    sequence are the next sequence's: masked out of the scores, their p is 0).
    The scale is folded as in the Triton tutorial: the row max is taken on raw scores (scale2 > 0 keeps the
    order) and p = exp2(qk * scale2 - m) is one fused multiply-add per score."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    else:
        kv_ok = d_ok[None, :]
    if TMA:
        k = K.load([kv_row + start_n, kv_col])
    else:
        k = tl.load(K + offs_n[:, None] * stride_km + offs_d[None, :], mask=kv_ok, other=0.0)
    qk = _dot_qk(q, k, DOT_FP32, PRECISION)
    fold = scale2
    if SOFTCAP:  # capped scores are already base 2
        qk, _ = _capped(qk, scale2, softcap)
        fold = 1.0
    if MASKED:
        qk = tl.where(_mask(offs_m, offs_n, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * fold)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * fold)
        m_safe = m_new
    p = tl.exp2(qk * fold - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TMA:
        v = V.load([kv_row + start_n, kv_col])
    else:
        v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


# grid: (cdiv(max_seqlen_q, BLOCK_M), batch, heads_q); one query block of one head of one sequence,
# streaming only the key blocks it can see: masked blocks at the window's edges and the diagonal,
# unmasked ones in between. KV_CACHE: sequence b's keys are not a cu_seqlens span but CU_K's (3, batch)
# int64 columns: element offsets of its first key in K and in V, and its key count (flash_attn_with_kvcache).
# TMA: Q, K, V and O_DESC are host-built descriptors of the (total, heads * head_dim) tensors (head_dim ==
# BLOCK_D), loading whole tiles through Hopper's tensor memory accelerator; O (a pointer) stores the last,
# partial tile of a sequence, whose rows past the end belong to the next sequence
@triton.jit
def _attn_fwd(Q, K, V, O, O_DESC, LSE, CU_Q, CU_K, stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
              stride_om, stride_oh, stride_lse_h, scale2, softcap, left, right, group, head_dim, seqlen_bucket,
              CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              TMA: tl.constexpr, KV_CACHE: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q = _seq(CU_Q, b)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < seqlen_q
    kv_row = 0
    if KV_CACHE:
        batch = tl.num_programs(1)
        seqlen_k = tl.load(CU_K + 2 * batch + b).to(tl.int32)
        Kh = K + tl.load(CU_K + b) + hk * stride_kh
        Vh = V + tl.load(CU_K + batch + b) + hk * stride_vh
    else:
        k_start, seqlen_k = _seq(CU_K, b)
        if TMA:
            Kh = K
            Vh = V
            kv_row = k_start.to(tl.int32)
        else:
            Kh = K + k_start * stride_km + hk * stride_kh
            Vh = V + k_start * stride_vm + hk * stride_vh
    if TMA:
        q = Q.load([(q_start + m0).to(tl.int32), h * BLOCK_D])
    else:
        q = tl.load(Q + (q_start + offs_m[:, None]) * stride_qm + h * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kv_col = hk * BLOCK_D
    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kh, Vh, kv_row, kv_col, stride_km, stride_vm, start_n, offs_m,
                                  offs_d, d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL,
                                  SOFTCAP, DOT_FP32, PRECISION, True, BLOCK_N, TMA)
    # the main loop counts the descriptors' rows (with TMA; kv_row = 0 otherwise): row - kv_row + kv_row folds
    # away, and no coordinate is recomputed per block
    for row in range(kv_row + full_lo, kv_row + full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kh, Vh, kv_row, kv_col, stride_km, stride_vm, row - kv_row,
                                  offs_m, offs_d, d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL,
                                  LOCAL, SOFTCAP, DOT_FP32, PRECISION, False, BLOCK_N, TMA)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kh, Vh, kv_row, kv_col, stride_km, stride_vm, start_n, offs_m,
                                  offs_d, d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL,
                                  SOFTCAP, DOT_FP32, PRECISION, True, BLOCK_N, TMA)
    empty = l_i == 0.0
    out = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    if TMA and m0 + BLOCK_M <= seqlen_q:
        O_DESC.store([(q_start + m0).to(tl.int32), h * BLOCK_D], out)
    else:
        tl.store(O + (q_start + offs_m[:, None]) * stride_om + h * stride_oh + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * stride_lse_h + q_start + offs_m, lse, mask=row_ok)


@triton.jit
def _ds(q, k, v, do, lse2, delta, offs_m, offs_n, seqlen_q, seqlen_k, scale2, softcap, left, right,
        CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Recompute p and return (p, ds) for a (BM, BN) tile; ds is d(loss)/d(c * q.k), fp32."""
    s, t = _scores(q, k, scale2, softcap, SOFTCAP, DOT_FP32, PRECISION)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_mask(offs_m, offs_n, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL), p, 0.0)
    if DOT_FP32:
        dp = tl.dot(do.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision=PRECISION)
    else:
        dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom, start_m, offs_n, offs_d, d_ok, seqlen_q,
               seqlen_k, scale2, softcap, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """One query block's contribution to a key block's dk, dv; Q, DO, LSE, DELTA point at this head. Key-major:
    the tile is s^T = k q^T (BLOCK_N keys x BLOCK_M queries), so each of its four dots has M = BLOCK_N (Hopper's
    warpgroup MMA needs M >= 64) and p^T, ds^T feed dV and dK without a transpose."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    q_t = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    if DOT_FP32:
        s_t = tl.dot(k.to(tl.float32), q_t.to(tl.float32), input_precision=PRECISION)
    else:
        s_t = tl.dot(k, q_t)
    if SOFTCAP:
        s_t, t = _capped(s_t, scale2, softcap)
        p_t = tl.exp2(s_t - lse2[None, :])
    else:
        p_t = tl.exp2(s_t * scale2 - lse2[None, :])
    if MASKED:
        p_t = tl.where(_mask(offs_m, offs_n, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL, True), p_t, 0.0)
    if DOT_FP32:
        dv = tl.dot(p_t, do.to(tl.float32), dv, input_precision=PRECISION)
        dp_t = tl.dot(v.to(tl.float32), tl.trans(do.to(tl.float32)), input_precision=PRECISION)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t * t)
    if DOT_FP32:
        dk = tl.dot(ds_t, tl.trans(q_t.to(tl.float32)), dk, input_precision=PRECISION)
    else:
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


# grid: (cdiv(max_seqlen_k, BLOCK_N), batch, heads_kv); one key block of one kv head: loops over the
# group's query heads and the query blocks that can see it, accumulating dk, dv in registers
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, stride_qm, stride_qh, stride_km, stride_kh,
                   stride_vm, stride_vh, stride_dom, stride_doh, stride_dkm, stride_dkh, stride_dvm, stride_dvh,
                   stride_lse_h, scale2, softcap, left, right, group, head_dim, seqlen_bucket,
                   CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, b, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_start, seqlen_k = _seq(CU_K, b)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    q_start, seqlen_q = _seq(CU_Q, b)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    k = tl.load(K + (k_start + offs_n[:, None]) * stride_km + hk * stride_kh + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + (k_start + offs_n[:, None]) * stride_vm + hk * stride_vh + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        h = hk * group + g
        Qh = Q + q_start * stride_qm + h * stride_qh
        DOh = DO + q_start * stride_dom + h * stride_doh
        LSEh = LSE + h * stride_lse_h + q_start
        DELTAh = DELTA + h * stride_lse_h + q_start
        for start_m in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom, start_m, offs_n, offs_d,
                                d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP,
                                DOT_FP32, PRECISION, True, BLOCK_M)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom, start_m, offs_n, offs_d,
                                d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP,
                                DOT_FP32, PRECISION, False, BLOCK_M)
        for start_m in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_dom, start_m, offs_n, offs_d,
                                d_ok, seqlen_q, seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP,
                                DOT_FP32, PRECISION, True, BLOCK_M)
    dk = dk * (scale2 / 1.4426950408889634)
    tl.store(DK + (k_start + offs_n[:, None]) * stride_dkm + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + (k_start + offs_n[:, None]) * stride_dvm + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


# grid: (cdiv(total_q, BLOCK_M), heads_q); delta = rowsum(dout * out) of BLOCK_M rows of one head, in fp32
@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_om, stride_oh, stride_dom, stride_doh, stride_delta_h, total_q, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < total_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + offs_m[:, None].to(tl.int64) * stride_om + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + offs_m[:, None].to(tl.int64) * stride_dom + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + h * stride_delta_h + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, stride_km, stride_vm, start_n, offs_m, offs_d, d_ok, seqlen_q, seqlen_k,
             scale2, softcap, left, right, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's contribution to a query block's dq; K and V point at this sequence's kv head."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    else:
        kv_ok = d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_km + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=kv_ok, other=0.0)
    _, ds = _ds(q, k, v, do, lse2, delta, offs_m, offs_n, seqlen_q, seqlen_k, scale2, softcap, left, right,
                CAUSAL, LOCAL, SOFTCAP, DOT_FP32, PRECISION, MASKED)
    if DOT_FP32:
        dq += tl.dot(ds, k.to(tl.float32), input_precision=PRECISION)
    else:
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


# grid: (cdiv(max_seqlen_q, BLOCK_M), batch, heads_q); one query block: loops over its key blocks
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, stride_qm, stride_qh, stride_km, stride_kh,
                 stride_vm, stride_vh, stride_dom, stride_doh, stride_dqm, stride_dqh, stride_lse_h, scale2, softcap,
                 left, right, group, head_dim, seqlen_bucket,
                 CAUSAL: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q = _seq(CU_Q, b)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    k_start, seqlen_k = _seq(CU_K, b)
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < seqlen_q
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + (q_start + offs_m[:, None]) * stride_qm + h * stride_qh + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + (q_start + offs_m[:, None]) * stride_dom + h * stride_doh + offs_d[None, :], mask=q_ok, other=0.0)
    lse2 = tl.load(LSE + h * stride_lse_h + q_start + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lse_h + q_start + offs_m, mask=row_ok, other=0.0)
    Kh = K + k_start * stride_km + hk * stride_kh
    Vh = V + k_start * stride_vm + hk * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, seqlen_q, seqlen_k, left, right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, Kh, Vh, stride_km, stride_vm, start_n, offs_m, offs_d, d_ok, seqlen_q,
                      seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP, DOT_FP32, PRECISION, True, BLOCK_N)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, Kh, Vh, stride_km, stride_vm, start_n, offs_m, offs_d, d_ok, seqlen_q,
                      seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP, DOT_FP32, PRECISION, False,
                      BLOCK_N)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, Kh, Vh, stride_km, stride_vm, start_n, offs_m, offs_d, d_ok, seqlen_q,
                      seqlen_k, scale2, softcap, left, right, CAUSAL, LOCAL, SOFTCAP, DOT_FP32, PRECISION, True, BLOCK_N)
    dq = dq * (scale2 / 1.4426950408889634)
    tl.store(DQ + (q_start + offs_m[:, None]) * stride_dqm + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_ok)


def _configs(tiles, pre_hook=None) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st, pre_hook=pre_hook)
            for m, n, w, st in tiles]


# Tile candidates (BLOCK_M, BLOCK_N, warps, stages) by head-dim tile (larger heads, smaller tiles). At head_dim 128
# they were chosen from what the compiler makes for sm_90a (bench/kernel_report.py): no spills, warpgroup MMA
# (wgmma) in every dot, and the fewest SASS instructions per score; the first of each list is the EVO_AUTOTUNE=0
# tile. In the backward the tile of the key-major dK/dV kernel is BLOCK_N keys x BLOCK_M queries: BLOCK_N 128
# needs 8 warps for its two fp32 BLOCK_N x head_dim accumulators, 64 works with 4, and 32 cannot use wgmma.
FWD_TILES = {64: [(128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2)],
             128: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2)],
             256: [(64, 64, 8, 2), (64, 32, 8, 1), (64, 64, 8, 1), (64, 32, 4, 2)]}
DKDV_TILES = {64: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
              128: [(32, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 1), (32, 64, 4, 2), (64, 64, 8, 2)],
              256: [(32, 64, 4, 1), (32, 64, 8, 1), (16, 64, 4, 1)]}
DQ_TILES = {64: [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
            128: [(128, 64, 8, 2), (128, 64, 8, 1), (64, 64, 4, 1), (64, 64, 4, 2)],
            256: [(64, 32, 4, 1), (64, 64, 8, 1), (64, 32, 8, 2)]}


# flash_attn_with_kvcache's forward: a few new queries against a long cache, so small query tiles (64, the least
# warpgroup MMA takes)
DECODE_TILES = {64: [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2)],
                128: [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2)],
                256: [(64, 32, 4, 1), (64, 64, 8, 1), (64, 32, 4, 2)]}


def gpu_configs(kernel, block_d: int, decode: bool = False) -> list:
    """Autotune candidates of an attention kernel for a head-dim tile (16 to 256); ``decode``: the forward's
    KV-cache launches."""
    if decode:
        tiles = DECODE_TILES
    else:
        tiles = {_attn_fwd: FWD_TILES, _attn_bwd_dkdv: DKDV_TILES, _attn_bwd_dq: DQ_TILES}[kernel]
    return _configs(tiles[min(d for d in tiles if d >= block_d)], _tma_tiles if kernel is _attn_fwd else None)


_TUNED: dict = {}
_TUNE_KEY = ["head_dim", "group", "seqlen_bucket", "CAUSAL", "LOCAL", "SOFTCAP", "DOT_FP32"]


def untuned_config(kernel, block_d: int, decode: bool = False):
    """The candidate ``EVO_AUTOTUNE=0`` takes: the first of the kernel's list."""
    return gpu_configs(kernel, block_d, decode)[0]


def _launcher(kernel, block_d: int, decode: bool = False):
    """(kernel, fixed launch options): on a GPU the kernel autotuned over tile sizes and cached per shape
    key (head dim, group, seqlen bucket, mask kind); under the interpreter one small tile (it runs tl.dot
    at about 1 GFLOP/s and cannot autotune). ``EVO_AUTOTUNE=0`` takes ``untuned_config`` without tuning:
    the GPU tests, where tuning every shape of the sweep would cost minutes of compiling."""
    if interpreting():
        return kernel, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if os.environ.get("EVO_AUTOTUNE", "1") == "0":
        first = untuned_config(kernel, block_d, decode)
        return kernel, dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    key = (kernel, block_d, decode)
    if key not in _TUNED:
        tune_key = _TUNE_KEY + (["TMA", "KV_CACHE"] if kernel is _attn_fwd else [])
        _TUNED[key] = triton.autotune(configs=gpu_configs(kernel, block_d, decode), key=tune_key)(kernel)
    return _TUNED[key], {}


def _bucket(seqlen: int) -> int:
    """The autotuning key's sequence-length bucket (next power of two)."""
    return triton.next_power_of_2(max(int(seqlen), 1))


def _flags(q, left, right, softcap):
    """Kernel specialization for a window normalized by ``attention_window`` (-1: no bound on that side):
    CAUSAL is the right bound (plain causal: right = 0), LOCAL the left one."""
    fp32 = q.dtype == torch.float32
    return dict(CAUSAL=right >= 0, LOCAL=left >= 0, SOFTCAP=softcap > 0, DOT_FP32=interpreting() or fp32,
                PRECISION="ieee" if fp32 else "tf32"), max(left, 0), max(right, 0)


def _check(q, k, v, dropout_p, alibi_slopes):
    if dropout_p > 0:
        raise NotImplementedError("attention dropout (dropout_p > 0) is not implemented in evo")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not implemented in evo")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need one head dim, "
                         "k and v alike, and heads_q a multiple of heads_kv")


def _unit_last(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _use_tma(q, k, v, out) -> bool:
    """Whether the forward takes its TMA path: by default on Hopper or newer (``EVO_ATTN_TMA=0`` turns it off;
    under the interpreter, tests turn it on with ``EVO_ATTN_TMA=1``), for a head_dim that is a power of two (a
    tile's columns are one head), and where memory is as TMA needs it: 16-byte aligned base addresses and row
    strides, and each row's heads side by side (the descriptors see (total, heads * head_dim))."""
    setting = os.environ.get("EVO_ATTN_TMA", "1" if TMA_DEFAULT and not interpreting() else "0")
    if setting != "1":
        return False
    if not interpreting() and (not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    head_dim = q.shape[2]
    return head_dim == max(16, triton.next_power_of_2(head_dim)) and all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == head_dim
        for t in (q, k, v, out))


def _descriptors(q, k, v, out, block_m: int, block_n: int) -> tuple:
    """Host-built TMA descriptors of q, k, v and out as (total, heads * head_dim): tiles of BLOCK_M (q, out) or
    BLOCK_N (k, v) rows by one head."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t, rows):
        return TensorDescriptor(t, [t.shape[0], t.shape[1] * t.shape[2]], [t.stride(0), 1], [rows, t.shape[2]])

    return desc(q, block_m), desc(k, block_n), desc(v, block_n), desc(out, block_m)


def _tma_tiles(nargs):
    """Autotune pre-hook: the descriptors' tiles follow each candidate's BLOCK_M / BLOCK_N."""
    if nargs.get("TMA"):
        for name, rows in (("Q", "BLOCK_M"), ("K", "BLOCK_N"), ("V", "BLOCK_N"), ("O_DESC", "BLOCK_M")):
            nargs[name].block_shape = [nargs[rows], nargs["BLOCK_D"]]


def _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap):
    """(out (total_q, heads_q, d), lse (heads_q, total_q) fp32) for unit-stride q, k, v; a normalized window."""
    total_q, heads_q, head_dim = q.shape
    batch = cu_q.shape[0] - 1
    out = torch.empty_like(q)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    flags, left, right = _flags(q, left, right, softcap)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not (total_q and batch):
        return out, lse
    kernel, opts = _launcher(_attn_fwd, block_d)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch, heads_q)  # noqa: E731
    rest = (lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), scale * LOG2E, float(softcap), left, right,
            heads_q // k.shape[1], head_dim, _bucket(max_q))
    tma = _use_tma(q, k, v, out) and ("tma-failed", block_d) not in _TUNED
    if tma:
        # tiles: the autotuner's pre-hook sets them per candidate; a fixed tile sets them here
        qd, kd, vd, od = _descriptors(q, k, v, out, opts.get("BLOCK_M", 64), opts.get("BLOCK_N", 64))
        try:
            kernel[grid](qd, kd, vd, out, od, *rest, **flags, BLOCK_D=block_d, TMA=True, KV_CACHE=False, **opts)
            return out, lse
        except Exception as exc:  # noqa: BLE001 - Triton 3.6's ptxas crashes on some TMA tiles; the copy path works
            if "ptxas" not in f"{type(exc).__name__} {exc}".lower():
                raise
            _TUNED[("tma-failed", block_d)] = True
            log.warning("attention: the TMA forward did not compile for head_dim %d (%s); the copy path is used "
                        "instead", head_dim, str(exc).splitlines()[0][:200])
    kernel[grid](q, k, v, out, out, *rest, **flags, BLOCK_D=block_d, TMA=False, KV_CACHE=False, **opts)
    return out, lse


def _forward_fake(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, softcap):
    """(dq, dk, dv) for unit-stride inputs."""
    total_q, heads_q, head_dim = q.shape
    heads_kv, batch = k.shape[1], cu_q.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags, left, right = _flags(q, left, right, softcap)
    block_d = max(16, triton.next_power_of_2(head_dim))
    delta = torch.empty_like(lse)  # (heads_q, total_q)
    if total_q:
        _attn_bwd_delta[(triton.cdiv(total_q, 64), heads_q)](out, dout, delta, out.stride(0), out.stride(1),
                                                          dout.stride(0), dout.stride(1), delta.stride(0), total_q,
                                                          head_dim, BLOCK_M=64, BLOCK_D=block_d)
    group = heads_q // heads_kv
    common = (scale * LOG2E, float(softcap), left, right, group, head_dim)
    if k.shape[0] and batch:
        kernel, opts = _launcher(_attn_bwd_dkdv, block_d)
        grid = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), batch, heads_kv)  # noqa: E731
        kernel[grid](q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0),
                     k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0),
                     dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *common, _bucket(max_k), **flags,
                     BLOCK_D=block_d, **opts)
    else:
        dk.zero_()
        dv.zero_()
    if total_q and batch:
        kernel, opts = _launcher(_attn_bwd_dq, block_d)
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), batch, heads_q)  # noqa: E731
        kernel[grid](q, k, v, dout, lse, delta, dq, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0),
                     k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0),
                     dq.stride(1), lse.stride(0), *common, _bucket(max_q), **flags, BLOCK_D=block_d, **opts)
    return dq, dk, dv


_SIGNATURE = "int max_q, int max_k, float scale, int left, int right, float softcap"
_forward_op = OpaqueOp("flash_attn_fwd", f"(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, {_SIGNATURE})"
                       " -> (Tensor, Tensor)", _forward, _forward_fake)
_backward_op = OpaqueOp("flash_attn_bwd", "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                        f"Tensor cu_q, Tensor cu_k, {_SIGNATURE}) -> (Tensor, Tensor, Tensor)", _backward,
                        lambda dout, q, k, v, *args: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))


def _kvcache_forward(q, k_cache, v_cache, spans, scale, left, right, softcap):
    """(out (batch, seqlen_q, heads_q, d), lse (batch, heads_q, seqlen_q) fp32) of q (batch, seqlen_q, heads_q, d)
    against the caches (batch_cache, seqlen_cache, heads_kv, d): batch row b sees spans[2, b] keys starting at
    element offset spans[0, b] of k_cache and spans[1, b] of v_cache (int64 (3, batch)); a normalized window."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    q = q.reshape(batch * seqlen_q, heads_q, head_dim)  # a view unless q was not row-major in its first two dims
    out = q.new_empty(q.shape)  # contiguous, as the fake's
    lse = torch.empty((heads_q, batch * seqlen_q), dtype=torch.float32, device=q.device)
    flags, left, right = _flags(q, left, right, softcap)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if q.shape[0]:
        cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        kernel, opts = _launcher(_attn_fwd, block_d, decode=True)
        grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch, heads_q)  # noqa: E731
        # a cache row's keys may start anywhere (leftpad), so not TMA's 16-byte aligned descriptors
        kernel[grid](q, k_cache, v_cache, out, out, lse, cu_q, spans, q.stride(0), q.stride(1), k_cache.stride(1),
                     k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
                     lse.stride(0), scale * LOG2E, float(softcap), left, right, heads_q // k_cache.shape[2], head_dim,
                     _bucket(seqlen_q), **flags, BLOCK_D=block_d, TMA=False, KV_CACHE=True, **opts)
    return (out.view(batch, seqlen_q, heads_q, head_dim),
            lse.view(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous())


_kvcache_op = OpaqueOp("flash_attn_kvcache_fwd", "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor spans, "
                       "float scale, int left, int right, float softcap) -> (Tensor, Tensor)", _kvcache_forward,
                       lambda q, *args: (q.new_empty(q.shape),
                                         q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)))


class FlashAttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap):
        if cu_k is None:  # self-attention layouts pass one cu_seqlens (Dynamo refuses one tensor given twice)
            cu_k = cu_q
        q, k, v = _unit_last(q, k, v)
        options = (max_q, max_k, scale, left, right, softcap)
        out, lse = _forward_op(q, k, v, cu_q, cu_k, *options)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        (dout,) = _unit_last(dout)
        dq, dk, dv = _backward_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    """flash-attn 2's varlen attention (see the module docstring). The backward is deterministic
    whatever ``deterministic`` says. window_size: any pair of integers, tensors included."""
    _check(q, k, v, dropout_p, alibi_slopes)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu_q = cu_seqlens_q.to(torch.int32)
    cu_k = None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.to(torch.int32)
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    left, right = attention_window(causal, window_size, max_q, max_k)
    out, lse = FlashAttnVarlenFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, float(softcap))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False):
    """(dq, dk, dv) of ``flash_attn_varlen_func`` from its out and lse, through the backward kernels (checked by
    the caller, evo.kernels.flash_attn_varlen_backward)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    left, right = attention_window(causal, window_size, max_q, max_k)
    dout, q, k, v, out = _unit_last(dout, q, k, v, out)
    return _backward_op(dout, q, k, v, out, softmax_lse.float().contiguous(), cu_seqlens_q.to(torch.int32),
                        cu_seqlens_k.to(torch.int32), max_q, max_k, scale, left, right, float(softcap))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's batched attention: q (batch, seqlen_q, heads_q, d), k and v (batch, seqlen_k, heads_kv, d).
    Runs the varlen kernel on the flattened batch; lse comes back as (batch, heads_q, seqlen_q)."""
    _check(q, k, v, dropout_p, alibi_slopes)
    batch, sq, hq, d = q.shape
    sk = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * sk, sk, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.reshape(batch * sq, hq, d), k.reshape(batch * sk, -1, d),
                                 v.reshape(batch * sk, -1, d), cu_q, cu_k, sq, sk, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    if return_attn_probs:
        o, lse, _ = out
        return o.view(batch, sq, hq, d), lse.view(hq, batch, sq).permute(1, 0, 2), None
    return out.view(batch, sq, hq, d)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """flash-attn 2's decoding attention (forward only, as flash-attn): q (batch, seqlen_q, heads_q, d); k_cache,
    v_cache (batch_cache, seqlen_cache, heads_kv, d), updated in place with k, v (batch, seqlen_new, heads_kv, d) at
    cache_seqlens (an int or an int32 (batch,) tensor; None: the whole cache is valid). Rotary, cache_batch_idx,
    cache_leftpad, causal / window / softcap as flash-attn (reference.prepare_kvcache has the rules); the cache
    update and rotary run as torch ops and evo's rotary kernel, the attention in ``_attn_fwd`` reading the cache
    rows in place. ``num_splits`` is accepted and ignored (a flash-attn performance knob). Returns out (batch,
    seqlen_q, heads_q, d), or (out, softmax_lse (batch, heads_q, seqlen_q) fp32) with return_softmax_lse."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attn_with_kvcache: q must be fp16, bf16 or fp32; got {q.dtype}")
    q, cache_row, leftpad, seqlen_k, left, right = prepare_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
        causal, window_size, rotary_interleaved, alibi_slopes, apply_rotary_emb)
    spans = torch.stack((cache_row * k_cache.stride(0) + leftpad * k_cache.stride(1),
                         cache_row * v_cache.stride(0) + leftpad * v_cache.stride(1), seqlen_k))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    (q,) = _unit_last(q)
    out, lse = _kvcache_op(q, k_cache, v_cache, spans, scale, left, right, float(softcap))
    return (out, lse) if return_softmax_lse else out
