"""Plain-PyTorch twins of every evo kernel: the same math, written for clarity.

They serve as the oracle in the kernel tests and as the CPU path (``EVO_KERNEL_BACKEND=torch``, or
``auto`` with CPU tensors). Each computes in fp32 and returns the input dtype, as the kernels do.
Autograd differentiates them; none saves anything the math does not need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The compute dtype: fp32 for 16-bit inputs, the input's own for fp32 and fp64 (fp64 makes an oracle)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------------------------ RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; statistics in fp32."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * _acc(weight)).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(rms_norm(x + residual), x + residual); the sum is rounded to x.dtype before the norm."""
    summed = (_acc(x) + _acc(residual)).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


# ------------------------------------------------------------------------------------ rotary
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x (..., headdim); cos/sin broadcast as (..., rot/2)."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = _acc(x[..., :rot]), x[..., rot:]
    if interleaved:  # GPT-J: pairs (x0, x1), (x2, x3), ...
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:  # GPT-NeoX: halves (x0 .. x_{r/2-1}) with (x_{r/2} ..)
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out.to(x.dtype), x_pass), dim=-1)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """flash-attn's rotary: x (batch, seqlen, heads, headdim), or (total, heads, headdim) with cu_seqlens.

    cos, sin: (max_seqlen, rotary_dim / 2). Position of token t is its index within its sequence plus
    seqlen_offsets (an int, or a (batch,) tensor). Channels past rotary_dim pass through unchanged.
    """
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq_start = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long(), output_size=x.shape[0])
        pos = torch.arange(x.shape[0], device=x.device) - seq_start
        if torch.is_tensor(seqlen_offsets):
            pos = pos + torch.repeat_interleave(seqlen_offsets.long(), lengths.long(), output_size=x.shape[0])
        else:
            pos = pos + seqlen_offsets
        c, s = _acc(cos[pos][:, None, :]), _acc(sin[pos][:, None, :])  # (total, 1, rot/2)
    else:
        seqlen = x.shape[1]
        pos = torch.arange(seqlen, device=x.device)[None, :]
        offsets = seqlen_offsets.long()[:, None] if torch.is_tensor(seqlen_offsets) else seqlen_offsets
        pos = (pos + offsets).expand(x.shape[0], seqlen)
        c, s = _acc(cos[pos][:, :, None, :]), _acc(sin[pos][:, :, None, :])  # (batch, seqlen, 1, rot/2)
    out = _rotate(x, c, s, interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out


# ------------------------------------------------------------------------------------ SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32."""
    return (F.silu(_acc(gate)) * _acc(up)).to(gate.dtype)


# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None):
    """Per token: (1 - s) * (lse - x[label]) + s * (lse - mean(x)) + z_loss * lse^2, 0 where ignored.

    logits (tokens, vocab) in any float dtype (computed in fp32); labels (tokens,). ``mean`` divides by
    the number of non-ignored tokens (0 when there are none, not NaN).
    """
    if process_group is not None:
        raise NotImplementedError("cross_entropy with process_group (vocab-parallel) needs the Triton backend")
    _check_reduction(reduction)
    x = _acc(logits)
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, target[:, None]).squeeze(-1)
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid, reduction)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", process_group=None, return_accuracy=False):
    """cross_entropy(hidden @ weight.T + bias, labels); the reference materializes the logits.

    hidden (tokens, d), weight (vocab, d), bias (vocab,) or None. With return_accuracy, also returns
    the number of non-ignored tokens whose argmax logit is the label (an int64 tensor).
    """
    logits = F.linear(hidden, weight, bias)
    loss = cross_entropy(logits, labels, ignore_index, label_smoothing, z_loss, reduction, process_group)
    if not return_accuracy:
        return loss
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != ignore_index)).sum()
    return loss, correct


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _reduce(loss, valid, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------------ attention
def _check_attention_args(dropout_p, alibi_slopes):
    if dropout_p > 0:
        raise NotImplementedError("attention dropout (dropout_p > 0) is not implemented in evo")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not implemented in evo")


def _attention_mask(sq: int, sk: int, causal: bool, window_size, device) -> torch.Tensor | None:
    """Boolean (sq, sk) mask of allowed keys; causal and windows aligned to the bottom right, as flash-attn."""
    left, right = window_size
    if right < 0 and causal:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    return allowed


def attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """One sequence: q (sq, hq, d), k and v (sk, hkv, d) -> out (sq, hq, d), lse (hq, sq) in fp32.

    Scores s = q k^T * scale, soft-capped as softcap * tanh(s / softcap) when softcap > 0, masked, then
    softmax over keys. A query with no allowed key outputs zeros and has lse = +inf, as in flash-attn.
    """
    sq, hq, d = q.shape
    hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    group = hq // hkv
    qf = _acc(q).transpose(0, 1)  # (hq, sq, d)
    kf = _acc(k).transpose(0, 1).repeat_interleave(group, dim=0)  # (hq, sk, d)
    vf = _acc(v).transpose(0, 1).repeat_interleave(group, dim=0)
    s = qf @ kf.transpose(1, 2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = _attention_mask(sq, k.shape[0], causal, window_size, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (hq, sq)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # no allowed key: +inf, so p = 0 (flash-attn's)
    p = torch.exp(s - lse[..., None])
    out = (p @ vf).transpose(0, 1).to(q.dtype)
    return out, lse


def _fast_path(q, k, causal, window_size, softcap, return_lse) -> bool:
    # SDPA's causal mask is top-left aligned: only use it where that equals flash-attn's bottom-right
    return softcap == 0 and not return_lse and tuple(window_size) == (-1, -1) and (not causal or q.shape[0] == k.shape[0])


def _sdpa(q, k, v, scale, causal):
    """Same result as ``attention`` without lse, through PyTorch's fused CPU/GPU kernels (fp32 math)."""
    group = q.shape[1] // k.shape[1]
    qf = _acc(q).transpose(0, 1)
    kf = _acc(k).transpose(0, 1).repeat_interleave(group, dim=0)
    vf = _acc(v).transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Packed sequences: q (total_q, hq, d), k and v (total_k, hkv, d); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1] and attends only within itself. Returns out, or (out, lse (hq, total_q), None)."""
    _check_attention_args(dropout_p, alibi_slopes)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(bq) - 1):
        qi, ki, vi = q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]
        if _fast_path(qi, ki, causal, window_size, softcap, return_attn_probs):
            outs.append(_sdpa(qi, ki, vi, scale, causal))
        else:
            o, lse = attention(qi, ki, vi, scale, causal, window_size, softcap)
            outs.append(o)
            lses.append(lse)
    out = torch.cat(outs, dim=0)
    if return_attn_probs:
        return out, torch.cat(lses, dim=1), None
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Batched: q (batch, sq, hq, d), k and v (batch, sk, hkv, d). Returns out, or (out, lse (batch, hq, sq), None)."""
    _check_attention_args(dropout_p, alibi_slopes)
    outs, lses = [], []
    for b in range(q.shape[0]):
        if _fast_path(q[b], k[b], causal, window_size, softcap, return_attn_probs):
            scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
            outs.append(_sdpa(q[b], k[b], v[b], scale, causal))
        else:
            o, lse = attention(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap)
            outs.append(o)
            lses.append(lse)
    out = torch.stack(outs)
    if return_attn_probs:
        return out, torch.stack(lses), None
    return out
