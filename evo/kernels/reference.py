"""Plain-PyTorch twins of every evo kernel: the same math, written for clarity.

They serve as the oracle in the kernel tests and as the CPU path (``EVO_KERNEL_BACKEND=torch``, or
``auto`` with CPU tensors). Each computes in fp32 and returns the input dtype, as the kernels do.
Autograd differentiates them; none saves anything the math does not need.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The compute dtype: fp32 for 16-bit inputs, the input's own for fp32 and fp64 (fp64 makes an oracle)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------------------------ RMSNorm
def _rms(xf: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _acc(weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; statistics in fp32."""
    return _rms(_acc(x), weight, eps).to(x.dtype)


def check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    """fused_add_rms_norm's residual has x's shape (its dtype may differ); both backends check it here."""
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(rms_norm(x + residual) in x.dtype, x + residual in residual.dtype), as flash-attn's prenorm rms_norm_fn:
    the sum is taken in fp32 and normalized unrounded; only the returned sum is rounded, to residual.dtype."""
    check_residual(x, residual)
    summed = _acc(x) + _acc(residual)
    return _rms(summed, weight, eps).to(x.dtype), summed.to(residual.dtype)


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
    return write_in_place(x, out) if inplace else out


def autograd_refuses_in_place(x) -> bool:
    """Whether autograd refuses to change x in place: x, or the tensor x is a view of, is a leaf that requires
    grad. Both are asked: ``torch.randn(3, 4)[:2].requires_grad_()`` is itself such a leaf while its base is not."""
    return any(t is not None and t.is_leaf and t.requires_grad for t in (x, x._base))


def write_in_place(x, out):
    """flash-attn's in-place contract: x holds ``out`` afterwards. Where autograd forbids changing x in place
    (``autograd_refuses_in_place``) x is written outside autograd and ``out``, which carries the graph back to x,
    is returned; elsewhere the copy is tracked by autograd and x itself returned."""
    if autograd_refuses_in_place(x) and torch.is_grad_enabled():
        with torch.no_grad():
            x.copy_(out)
        return out
    x.copy_(out)
    return x


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """flash-attn's in-place rotary of packed q and k: qkv (batch, seqlen, 3, heads, d), or (batch, seqlen,
    heads_q + 2 * heads_k, d) with num_heads_q; k uses cos_k, sin_k when given. v is left as it is."""
    cos_k, sin_k = (cos, sin) if cos_k is None else (cos_k, sin_k)
    if qkv.dim() == 5:
        q, k, v = qkv.unbind(2)
    else:
        if num_heads_q is None:
            raise ValueError("qkv (batch, seqlen, heads_q + 2 * heads_k, d) needs num_heads_q")
        heads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k, v = qkv.split([num_heads_q, heads_k, qkv.shape[2] - num_heads_q - heads_k], dim=2)
    q = apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=seqlen_offsets)
    k = apply_rotary_emb(k, cos_k, sin_k, interleaved, seqlen_offsets=seqlen_offsets)
    rotated = torch.stack((q, k, v), dim=2) if qkv.dim() == 5 else torch.cat((q, k, v), dim=2)
    return write_in_place(qkv, rotated)


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """flash-attn's in-place rotary of packed k and v: kv (batch, seqlen, 2, heads, d); k rotated, v left."""
    k, v = kv.unbind(2)
    rotated = torch.stack((apply_rotary_emb(k, cos, sin, interleaved, seqlen_offsets=seqlen_offsets), v), dim=2)
    return write_in_place(kv, rotated)


# ------------------------------------------------------------------------------------ SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32."""
    return (F.silu(_acc(gate)) * _acc(up)).to(gate.dtype)


# ------------------------------------------------------------------------------------ mixture of experts
def moe_routing(expert_ids: torch.Tensor, num_experts: int):
    """(counts, offs, slots, order) of the (T, k) expert choices, flattened: counts and inclusive ends per expert
    (int32), the sorted row of each assignment and the assignment of each sorted row (int64); the order is a
    stable sort by expert (evo/kernels/moe.py's docstring)."""
    check_expert_ids(expert_ids, num_experts)
    ids = expert_ids.reshape(-1)
    counts = torch.stack([(ids == e).sum() for e in range(num_experts)]).to(torch.int32) if num_experts else \
        torch.zeros(0, dtype=torch.int32, device=ids.device)
    order = torch.sort(ids, stable=True).indices
    slots = torch.empty_like(order)
    slots[order] = torch.arange(ids.numel(), device=ids.device)
    return counts, counts.cumsum(0).to(torch.int32), slots, order


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError naming the first expert id outside [0, num_experts) (a host sync)."""
    ids = expert_ids.reshape(-1)
    bad = (ids < 0) | (ids >= num_experts)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"moe_routing: expert id {int(ids[i])} (assignment {i}) is outside [0, {num_experts})")


def check_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, values: bool) -> None:
    """grouped_mm's argument rules (Triton's and this file's alike); ``values``: also offs's values (a host sync)."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_mm needs a (M, K) and b (G, K, N), got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise ValueError(f"grouped_mm needs a and b of one floating dtype, got {a.dtype} and {b.dtype}")
    if offs.dtype != torch.int32 or offs.shape != (b.shape[0],):
        raise ValueError(f"grouped_mm needs offs of dtype int32 and shape ({b.shape[0]},) (one end per group of b), "
                         f"got {offs.dtype} {tuple(offs.shape)}")
    if values:
        ends = offs.tolist()
        if any(e < s for s, e in zip([0, *ends], ends)) or (ends[-1] if ends else 0) != a.shape[0]:
            raise ValueError(f"grouped_mm needs offs non-decreasing from 0 and ending at a's rows ({a.shape[0]}), got "
                             f"{ends if len(ends) <= 8 else ends[:4] + ['...'] + ends[-2:]}")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[r] = a[r] @ b[g] for the rows r of group g (offs: inclusive ends, int32), a loop over the groups."""
    starts = [0, *offs.tolist()[:-1]]
    pieces = [_acc(a[s:e]) @ _acc(b[g]) for g, (s, e) in enumerate(zip(starts, offs.tolist()))]
    out = torch.cat(pieces) if pieces else _acc(a).new_zeros(0, b.shape[2])
    return out.to(a.dtype)



def check_moe_experts(x, expert_ids, weights, w1, w3, w2) -> None:
    """moe_experts's argument rules (both backends)."""
    if x.dim() != 2 or expert_ids.dim() != 2 or weights.shape != expert_ids.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts needs x (T, H) and expert_ids and weights (T, k), got x {tuple(x.shape)}, "
                         f"expert_ids {tuple(expert_ids.shape)}, weights {tuple(weights.shape)}")
    e, i, h = w1.shape if w1.dim() == 3 else (0, 0, -1)
    if h != x.shape[1] or w3.shape != w1.shape or w2.shape != (e, h, i):
        raise ValueError(f"moe_experts needs w1 and w3 (E, I, H) and w2 (E, H, I) with H = {x.shape[1]}, got "
                         f"{tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)}")
    if len({x.dtype, w1.dtype, w3.dtype, w2.dtype}) != 1 or not x.dtype.is_floating_point:
        raise ValueError(f"moe_experts needs x and the expert weights of one floating dtype, got {x.dtype}, "
                         f"{w1.dtype}, {w3.dtype}, {w2.dtype}")
    if expert_ids.dtype.is_floating_point or not weights.dtype.is_floating_point:
        raise ValueError(f"moe_experts needs integer expert_ids and floating weights, got {expert_ids.dtype} and "
                         f"{weights.dtype}")


class SortTokens(torch.autograd.Function):
    """x (T, H) -> its rows in expert order (T*k, H), each token once per choice (row r is token order[r] // k).
    Backward sums each token's k rows in choice order: deterministic, where indexing's backward adds with atomics."""

    @staticmethod
    def forward(ctx, x, order, slots, k: int):
        ctx.save_for_backward(slots)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return grad[slots].view(slots.numel() // ctx.k, ctx.k, grad.shape[-1]).sum(1), None, None, None


def moe_experts(x, expert_ids, weights, w1, w3, w2) -> torch.Tensor:
    """out[t] = sum over j of weights[t, j] * SwiGLU expert expert_ids[t, j] of x[t], where expert e maps v to
    (silu(v w1[e]^T) * (v w3[e]^T)) w2[e]^T: the tokens sorted by expert, three grouped GEMMs, the k outputs of
    each token weighted and added (in fp32 for 16-bit x)."""
    check_moe_experts(x, expert_ids, weights, w1, w3, w2)
    _, offs, slots, order = moe_routing(expert_ids, w1.shape[0])
    x_sorted = SortTokens.apply(x, order, slots, expert_ids.shape[1])
    gate = grouped_mm(x_sorted, w1.transpose(1, 2), offs)
    up = grouped_mm(x_sorted, w3.transpose(1, 2), offs)
    y = grouped_mm(swiglu(gate, up), w2.transpose(1, 2), offs)[slots].view(*expert_ids.shape, x.shape[1])
    return (_acc(y) * _acc(weights).unsqueeze(-1)).sum(1).to(x.dtype)

# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None, *, logit_scale=1.0, return_z_loss=False, precomputed_lse=None):
    """Per token, with x = logit_scale * logits and lse = logsumexp(x):
    (1 - s) * (lse - x[label]) + s * (lse - mean(x)) + z_loss * lse^2, 0 where ignored.

    logits (tokens, vocab) in any float dtype (computed in fp32); labels (tokens,), each in [0, vocab) or
    ignore_index (else a ValueError naming it; checked eagerly, not inside a torch.compile trace). ``mean``
    divides by the number of non-ignored tokens (0 when there are none, not NaN). With return_z_loss, returns
    (loss, z-loss part of it), the latter reduced alike and not differentiable (flash-attn's, for logging).
    precomputed_lse (tokens,) is used as lse only where flash-attn uses it (label_smoothing 0, logit_scale 1;
    otherwise ignored); it gets no gradient, and the logits' gradient is flash-attn's, exp(x - lse) - onehot.
    """
    check_reduction(reduction)
    if process_group is not None:
        if precomputed_lse is not None:
            raise NotImplementedError("cross_entropy with both process_group and precomputed_lse needs the Triton "
                                      "backend")
        loss, _, z_part = _vocab_parallel_loss(_acc(logits) * logit_scale, labels, ignore_index, label_smoothing,
                                               z_loss, process_group)
        valid = labels != ignore_index
        if not return_z_loss:
            return reduce_loss(loss, valid, reduction)
        return reduce_loss(loss, valid, reduction), reduce_loss(z_part, valid, reduction)
    if not torch.compiler.is_compiling():
        check_labels(labels, ignore_index, logits.shape[-1])
    x = _acc(logits) * logit_scale if logit_scale != 1.0 else _acc(logits)
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if precomputed_lse is not None and label_smoothing == 0 and logit_scale == 1.0:
        lse = precomputed_lse.detach().to(x.dtype)
        p_sum = torch.exp(x - lse[:, None]).sum(-1)
        lse = lse + (p_sum - p_sum.detach())  # the value given; its gradient exp(x - lse), as flash-attn's backward
    else:
        lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, target[:, None]).squeeze(-1)
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(-1))
    z_part = z_loss * lse.square() if z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, loss + z_part, torch.zeros_like(loss))
    if not return_z_loss:
        return reduce_loss(loss, valid, reduction)
    z_part = torch.where(valid, z_part, torch.zeros_like(z_part)).detach()
    return reduce_loss(loss, valid, reduction), reduce_loss(z_part, valid, reduction)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", process_group=None, return_accuracy=False, *,
                               logit_scale=1.0):
    """cross_entropy(hidden @ weight.T + bias, labels, logit_scale=...); the reference materializes the logits.

    hidden (tokens, d), weight (vocab, d), bias (vocab,) or None. With return_accuracy, also returns
    the number of non-ignored tokens whose argmax logit is the label (an int64 tensor).
    """
    if process_group is not None:  # weight and bias: this rank's vocab shard
        logits = F.linear(_ReduceGrad.apply(hidden, process_group), weight, bias)
        loss, correct, _ = _vocab_parallel_loss(_acc(logits) * logit_scale, labels, ignore_index, label_smoothing,
                                                z_loss, process_group)
        loss = reduce_loss(loss, labels != ignore_index, reduction)
        return (loss, correct) if return_accuracy else loss
    logits = F.linear(hidden, weight, bias)
    loss = cross_entropy(logits, labels, ignore_index, label_smoothing, z_loss, reduction, process_group,
                         logit_scale=logit_scale)
    if not return_accuracy:
        return loss
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != ignore_index)).sum()
    return loss, correct


class SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward; backward passes the gradient through: every rank computes the same loss from the
    sum, so each rank's gradient of it is already the whole gradient of its own term (the vocab-parallel loss here,
    a MoE layer's load-balancing loss over sequence shards in evo.model.moe)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces: each vocab shard contributes to the gradient of the shared input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _vocab_parallel_loss(x, labels, ignore_index, label_smoothing, z_loss, group):
    """(per-token loss (fp32), correct count, per-token z-loss part, detached) from x (tokens, vocab / ranks), this
    rank's vocab shard of the scaled logits: the max, sum of exponentials, label logit and logit sum are combined
    across ``group``, so every rank gets the full vocabulary's values."""
    vocab_local = x.shape[-1]
    offset, vocab = dist.get_rank(group) * vocab_local, vocab_local * dist.get_world_size(group)
    if not torch.compiler.is_compiling():
        check_labels(labels, ignore_index, vocab)
    valid = labels != ignore_index
    with torch.no_grad():
        m = x.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    lse = m + SumOverGroup.apply(torch.exp(x - m[:, None]).sum(-1), group).log()
    local = labels.long() - offset
    mine = valid & (local >= 0) & (local < vocab_local)
    picked = x.gather(-1, torch.where(mine, local, torch.zeros_like(local))[:, None]).squeeze(-1)
    target = SumOverGroup.apply(torch.where(mine, picked, torch.zeros_like(picked)), group)
    nll = lse - target
    loss = nll
    if label_smoothing:
        mean = SumOverGroup.apply(x.sum(-1), group) / vocab
        loss = (1 - label_smoothing) * nll + label_smoothing * (lse - mean)
    z_part = z_loss * lse.square() if z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, loss + z_part, torch.zeros_like(loss))
    z_part = torch.where(valid, z_part, torch.zeros_like(z_part)).detach()
    correct = (valid & (target.detach() >= m)).sum()  # the label's logit is the largest of every shard
    return loss, correct, z_part


def check_labels(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Raise ValueError naming the first label outside [0, vocab) that is not ignore_index (a host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy: label {int(labels[i])} (token {i}) is outside the vocabulary of size "
                         f"{vocab}: labels must be in [0, {vocab}) or ignore_index ({ignore_index})")


def check_reduction(reduction: str) -> None:
    """The reductions the losses take (Triton's and this file's alike)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_loss(loss, valid, reduction):
    """Per-token ``loss`` reduced: "none" as is, "sum", or "mean" over the ``valid`` tokens (0 when none is)."""
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


def attention_window(causal: bool, window_size, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's key window (left, right) after its argument normalization; both backends use it.

    Query i of a sequence with sq queries and sk keys may see key j iff
    ``i + sk - sq - left <= j <= i + sk - sq + right``, a bound of -1 being absent. ``window_size`` is any
    pair of integers (ints or 0-d tensors); seqlen_q, seqlen_k are the call's: the batched API's, the varlen
    API's max_seqlen_q / max_seqlen_k, the kvcache API's seqlen_q and cache length. The rules, from
    flash-attn 2.8's csrc/flash_attn/flash_api.cpp (mha_fwd, mha_varlen_fwd, mha_fwd_kvcache, set_params_fprop):
    one query turns causal off (it changes no mask); causal forces right = 0; a side >= seqlen_k becomes
    unbounded; with left bounded an unbounded right becomes seqlen_k (it can then exclude keys, for the
    first queries when sq > sk + 1). flash-attn also bounds an unbounded left at seqlen_k when right is
    bounded; that never excludes a key (i + sk - sq - seqlen_k < 0), so it stays -1 here: plain causal
    keeps the kernel's cheaper one-sided mask.
    """
    left, right = (int(w) for w in window_size)
    left, right = max(left, -1), max(right, -1)
    if seqlen_q == 1:
        causal = False
    if causal:
        right = 0
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def _attention_mask(sq: int, sk: int, left: int, right: int, device) -> torch.Tensor | None:
    """Boolean (sq, sk) mask of allowed keys for a normalized window (``attention_window``); None: all."""
    if left < 0 and right < 0:
        return None
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)  # bottom-right aligned, as flash-attn
    j = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    return allowed


def _attend(q, k, v, scale, left, right, softcap):
    """One sequence, a normalized window: q (sq, hq, d), k and v (sk, hkv, d) -> out (sq, hq, d), lse (hq, sq)."""
    sq, hq, d = q.shape
    group = hq // k.shape[1]
    qf = _acc(q).transpose(0, 1)  # (hq, sq, d)
    kf = _acc(k).transpose(0, 1).repeat_interleave(group, dim=0)  # (hq, sk, d)
    vf = _acc(v).transpose(0, 1).repeat_interleave(group, dim=0)
    s = qf @ kf.transpose(1, 2) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = _attention_mask(sq, k.shape[0], left, right, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (hq, sq)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # no allowed key: +inf, so p = 0 (flash-attn's)
    p = torch.exp(s - lse[..., None])
    out = (p @ vf).transpose(0, 1).to(q.dtype)
    return out, lse


def attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """One sequence: q (sq, hq, d), k and v (sk, hkv, d) -> out (sq, hq, d), lse (hq, sq) in fp32.

    Scores s = q k^T * scale, soft-capped as softcap * tanh(s / softcap) when softcap > 0, masked by
    ``attention_window``, then softmax over keys. A query with no allowed key outputs zeros and has
    lse = +inf, as in flash-attn.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = attention_window(causal, window_size, q.shape[0], k.shape[0])
    return _attend(q, k, v, scale, left, right, softcap)


def _fast_path(q, k, left, right, softcap, return_lse) -> bool:
    # SDPA's causal mask is top-left aligned: only use it where that equals flash-attn's bottom-right
    return softcap == 0 and not return_lse and left < 0 and (right < 0 or (right == 0 and q.shape[0] == k.shape[0]))


def _sdpa(q, k, v, scale, causal):
    """Same result as ``attention`` without lse, through PyTorch's fused CPU/GPU kernels (fp32 math).

    The inputs are 3-D (heads, seqlen, dim), which on a CPU takes SDPA's math path. 4-D ones would take its
    CPU flash kernel, 4-5x faster at 8 heads x 1024 tokens (bench/attention.py), but its results then depend
    on the head count (a tensor-parallel rank's gradients left one process's by more than 1e-4) and a resumed
    run no longer repeats the original bit for bit; both are promises of evo's tests, so not yet."""
    group = q.shape[1] // k.shape[1]
    qf = _acc(q).transpose(0, 1)
    kf = _acc(k).transpose(0, 1).repeat_interleave(group, dim=0)
    vf = _acc(v).transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def _sequence(q, k, v, scale, left, right, softcap, return_lse):
    if _fast_path(q, k, left, right, softcap, return_lse):
        return _sdpa(q, k, v, scale, right == 0), None
    return _attend(q, k, v, scale, left, right, softcap)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Packed sequences: q (total_q, hq, d), k and v (total_k, hkv, d); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1] and attends only within itself. Returns out, or (out, lse (hq, total_q), None)."""
    _check_attention_args(dropout_p, alibi_slopes)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = attention_window(causal, window_size, int(max_seqlen_q), int(max_seqlen_k))
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(bq) - 1):
        o, lse = _sequence(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]], scale, left, right, softcap,
                           return_attn_probs)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=0)
    if return_attn_probs:
        return out, torch.cat(lses, dim=1), None
    return out


def _attend_backward(dout, q, k, v, out, lse, scale, left, right, softcap):
    """One sequence's (dq, dk, dv) from the forward's out and lse (hq, sq), a normalized window:
        P = exp(S - lse) (0 where masked, and for a query with lse = +inf), delta = rowsum(dout * out),
        dV = P^T dout,  dS = P * (dout V^T - delta),  through the cap: dS * (1 - tanh^2(raw / softcap)),
        dQ = scale dS K,  dK = scale dS^T Q;  a key head's dK, dV sum over the query heads of its group."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    qf, dof, of = (_acc(t).transpose(0, 1) for t in (q, dout, out))  # (hq, sq, d)
    kf = _acc(k).transpose(0, 1).repeat_interleave(group, dim=0)  # (hq, sk, d)
    vf = _acc(v).transpose(0, 1).repeat_interleave(group, dim=0)
    raw = qf @ kf.transpose(1, 2) * scale
    s = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    mask = _attention_mask(sq, sk, left, right, q.device)
    lse = lse.to(s.dtype)
    p = torch.exp(s - lse[..., None])
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(p), p)
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    dv = p.transpose(1, 2) @ dof  # (hq, sk, d)
    delta = (dof * of).sum(-1, keepdim=True)  # (hq, sq, 1)
    ds = p * (dof @ vf.transpose(1, 2) - delta)
    if softcap > 0:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = ds @ kf * scale
    dk = ds.transpose(1, 2) @ qf * scale
    dk = dk.view(hkv, group, sk, d).sum(1)
    dv = dv.view(hkv, group, sk, d).sum(1)
    return dq.transpose(0, 1).to(q.dtype), dk.transpose(0, 1).to(k.dtype), dv.transpose(0, 1).to(v.dtype)


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False):
    """The backward of ``flash_attn_varlen_func`` from its out and lse (hq, total_q): (dq, dk, dv), each sequence
    on its own (``_attend_backward``)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = attention_window(causal, window_size, int(max_seqlen_q), int(max_seqlen_k))
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(bq) - 1):
        rows, keys = slice(bq[i], bq[i + 1]), slice(bk[i], bk[i + 1])
        dq[rows], dk[keys], dv[keys] = _attend_backward(dout[rows], q[rows], k[keys], v[keys], out[rows],
                                                        softmax_lse[:, rows], scale, left, right, softcap)
    return dq, dk, dv


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Batched: q (batch, sq, hq, d), k and v (batch, sk, hkv, d). Returns out, or (out, lse (batch, hq, sq), None)."""
    _check_attention_args(dropout_p, alibi_slopes)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = attention_window(causal, window_size, q.shape[1], k.shape[1])
    results = [_sequence(q[b], k[b], v[b], scale, left, right, softcap, return_attn_probs) for b in range(q.shape[0])]
    out = torch.stack([o for o, _ in results])
    if return_attn_probs:
        return out, torch.stack([lse for _, lse in results]), None
    return out


def prepare_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                    block_table, causal, window_size, rotary_interleaved, alibi_slopes, rotary):
    """flash_attn_with_kvcache's argument checks, rotary and in-place cache update, shared by both backends
    (``rotary``: an ``apply_rotary_emb``). Returns (q rotated, cache_row, leftpad, seqlen_k, left, right): batch row b
    attends to keys leftpad[b] .. leftpad[b] + seqlen_k[b] - 1 of cache row cache_row[b] (int64 (batch,) tensors)
    with the normalized window (left, right). Semantics of flash-attn 2.8 (flash_attn_interface.py's docstring;
    csrc/flash_attn/flash_api.cpp mha_fwd_kvcache; src/block_info.h; flash_fwd_kernel.h's split-kv kernel):
    batch row b uses cache row cache_batch_idx[b]; its cache holds keys leftpad[b] .. cache_seqlens[b] - 1;
    new k (rotated at positions cache_seqlens[b] + i) and v are written at cache_seqlens[b] + i; q is rotated
    at positions cache_seqlens[b] + i when the normalized window is causal or local, else all of it at
    cache_seqlens[b]; the keys attended are leftpad[b] .. cache_seqlens[b] + seqlen_new - 1, the window
    aligned to their bottom right. Host syncs: none."""
    if block_table is not None:
        raise NotImplementedError("flash_attn_with_kvcache: block_table (a paged KV cache) is not implemented in evo")
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn_with_kvcache: alibi_slopes is not implemented in evo")
    batch, seqlen_q, heads_q, head_dim = q.shape
    cache_batch, cache_len, heads_kv = k_cache.shape[:3]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or \
            k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one float dtype; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim or heads_q % heads_kv:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: need "
                         "(batch, seqlen, heads, d) q and (batch_cache, seqlen_cache, heads_kv, d) caches alike, "
                         "heads a multiple of heads_kv")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dimension (they are updated in place)")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: give k and v together")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("flash_attn_with_kvcache: new k and v need cache_seqlens (where to write them)")
        if k.dtype != q.dtype or v.dtype != q.dtype or k.shape != v.shape or k.dim() != 4 or \
                k.shape[0] != batch or k.shape[2:] != (heads_kv, head_dim):
            raise ValueError(f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}: need (batch, seqlen_new, "
                             f"heads_kv, d) like the cache, in {q.dtype}")
        if seqlen_q > cache_len:
            raise ValueError(f"with new k and v, seqlen_q ({seqlen_q}) must be at most the cache length ({cache_len})")
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None or rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2:
            raise ValueError("rotary_cos and rotary_sin: both (seqlen_ro, rotary_dim / 2), or neither")
        if k is None:
            raise ValueError("flash_attn_with_kvcache: rotary_cos / rotary_sin need new k and v to rotate")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_dim ({2 * rotary_cos.shape[1]}) must be at most the head dim ({head_dim})")
        if rotary_cos.shape[0] < cache_len:  # flash-attn's check; positions reach the cache's end
            raise ValueError(f"rotary_cos / rotary_sin cover {rotary_cos.shape[0]} positions, fewer than the cache "
                             f"length {cache_len}")
    q, k, v = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # as flash-attn
    device = k_cache.device
    index = dict(dtype=torch.int64, device=device)
    if cache_seqlens is None:  # the whole cache
        cache_seqlens = torch.full((batch,), cache_len, **index)
    elif torch.is_tensor(cache_seqlens):
        cache_seqlens = cache_seqlens.to(**index).expand(batch)
    else:
        cache_seqlens = torch.full((batch,), int(cache_seqlens), **index)
    cache_row = torch.arange(batch, **index) if cache_batch_idx is None else cache_batch_idx.to(**index)
    leftpad = torch.zeros(batch, **index) if cache_leftpad is None else cache_leftpad.to(**index)
    left, right = attention_window(causal, window_size, seqlen_q, cache_len)
    seqlen_new = 0
    if k is not None:
        seqlen_new = k.shape[1]
        if rotary_cos is not None:
            k = rotary(k, rotary_cos, rotary_sin, interleaved=rotary_interleaved, seqlen_offsets=cache_seqlens)
        rows = cache_seqlens[:, None] + torch.arange(seqlen_new, **index)  # (batch, seqlen_new)
        k_cache[cache_row[:, None], rows] = k  # in place, only the new rows
        v_cache[cache_row[:, None], rows] = v
    if rotary_cos is not None:
        if left >= 0 or right >= 0:  # causal or local: query i at position cache_seqlens + i
            q = rotary(q, rotary_cos, rotary_sin, interleaved=rotary_interleaved, seqlen_offsets=cache_seqlens)
        else:  # every query at position cache_seqlens: one position of seqlen_q * heads_q rows
            flat = q.reshape(batch, 1, seqlen_q * heads_q, head_dim)
            q = rotary(flat, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                       seqlen_offsets=cache_seqlens).view(q.shape)
    return q, cache_row, leftpad, cache_seqlens + seqlen_new - leftpad, left, right


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """flash-attn's decoding attention against a KV cache (see ``prepare_kvcache``): q (batch, sq, hq, d),
    caches (batch_cache, seqlen_cache, hkv, d) updated in place with k, v (batch, seqlen_new, hkv, d).
    Returns out (batch, sq, hq, d), or (out, lse (batch, hq, sq) fp32) with return_softmax_lse."""
    q, cache_row, leftpad, seqlen_k, left, right = prepare_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
        causal, window_size, rotary_interleaved, alibi_slopes, apply_rotary_emb)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for b, (row, start, length) in enumerate(zip(cache_row.tolist(), leftpad.tolist(), seqlen_k.tolist())):
        keys, values = k_cache[row, start:start + length], v_cache[row, start:start + length]
        o, lse = _sequence(q[b], keys, values, scale, left, right, softcap, return_softmax_lse)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if return_softmax_lse else out
