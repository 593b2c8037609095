"""Cross-entropy and fused linear cross-entropy in Triton, with flash-attn's ``cross_entropy_loss`` semantics.

Per token with logits l (vocab V), x = c * l (c = ``logit_scale``), label y, smoothing s and z-loss weight z
(flash-attn's ``lse_square_scale``):
    lse  = log(sum_v exp(x_v))
    loss = (1 - s) * (lse - x_y) + s * (lse - mean_v x_v) + z * lse^2      (0 where y == ignore_index)
    dloss/dl_v = c * (p_v * (1 + 2 z lse) - (1 - s) * [v == y] - s / V),   p = exp(x - lse)
``return_z_loss`` also returns the z * lse^2 part, reduced like the loss and not differentiable (flash-attn's
CrossEntropyLoss, for logging). ``precomputed_lse`` (tokens,) replaces lse where flash-attn uses it, with
s = 0 and c = 1 (it is ignored otherwise): forward then reads only x_y per row, and backward uses it as
lse in p (so it gets no gradient itself); with ``process_group`` it is this rank's shard lse, combined
across the group as the computed one is.

Labels must be in [0, V) or ignore_index. Checking that needs a host sync, so the Triton path checks only
with ``EVO_DEBUG=1`` (a ValueError naming the label and V; the reference path always checks); unchecked,
a bad label's loss and gradient are meaningless.

Forward streams each row once through ``_ce_stats``, which returns four fp32 numbers per row: the
row max m, sum exp(x - m), sum x, and x_y when y falls in this block of the vocabulary. Everything
else is a few (tokens,)-sized torch ops, which is also where a vocab-parallel head combines its
shards (``process_group``: max, target logit, sums all-reduced across the group). Backward runs
``_ce_grad`` elementwise from the saved lse. ``mean`` divides by the count of non-ignored tokens
as a tensor (no host sync); a batch of only ignored tokens gives loss 0 and zero gradients.

The fused linear version never holds the (tokens, vocab) logits: it walks the vocabulary in chunks
of ``vocab_chunk`` rows of the weight, computing ``hidden @ W_chunk.T`` (tokens, chunk) at a time.
Forward merges each chunk's statistics into a running (max, sum exp); backward recomputes each
chunk's logits and yields that chunk's weight (and bias) gradient whole, in one matmul over all
tokens, while the hidden gradient accumulates in fp32 across chunks. Working memory is one logits
chunk plus a (tokens, hidden) fp32 buffer. With ``return_accuracy`` it also returns how many labelled
tokens have their label's logit equal to the row max (the argmax, up to exact ties).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from evo.kernels.reference import check_reduction, reduce_loss, check_labels  # the reference's own rules
from evo.kernels.triton_utils import OpaqueOp

BLOCK_V = 2048
CHUNK_ELEMENTS = 1 << 24  # logits elements per vocab chunk of the fused version (32 MiB in bf16)


# grid: (rows,); one program streams one row of logits in BLOCK_V tiles (online max / sum of exp)
@triton.jit
def _ce_stats(X, LABELS, STATS, stride_x, V, label_offset, logit_scale, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    label = tl.load(LABELS + row).to(tl.int64) - label_offset
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * logit_scale
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        total += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    in_block = (label >= 0) & (label < V)
    target = tl.load(x_row + tl.where(in_block, label, 0)).to(tl.float32) * logit_scale
    tl.store(STATS + row * 4 + 0, m)
    tl.store(STATS + row * 4 + 1, d)
    tl.store(STATS + row * 4 + 2, total)
    tl.store(STATS + row * 4 + 3, tl.where(in_block, target, 0.0))


# grid: (rows, cdiv(V, BLOCK_V)); elementwise gradient of one tile of one row
@triton.jit
def _ce_grad(X, LABELS, LSE, SCALE, DX, stride_x, stride_dx, V, label_offset, inv_vocab, smoothing, z_loss,
             logit_scale, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row) * logit_scale  # the row's chain-rule factor, and d x / d logits
    label = tl.load(LABELS + row).to(tl.int64) - label_offset
    p = tl.exp(x - lse)
    g = p * (1.0 + 2.0 * z_loss * lse) - smoothing * inv_vocab
    g = tl.where(cols == label, g - (1.0 - smoothing), g)
    tl.store(DX + row * stride_dx + cols, (g * scale).to(DX.dtype.element_ty), mask=mask)


def _stats(logits: torch.Tensor, labels: torch.Tensor, label_offset: int, logit_scale: float) -> torch.Tensor:
    """(rows, 4) fp32 of x = logit_scale * logits: max, sum exp(x - max), sum x, x[label] (0 if the label is
    outside this block)."""
    rows, vocab = logits.shape
    out = torch.empty((rows, 4), dtype=torch.float32, device=logits.device)
    if rows:
        _ce_stats[(rows,)](logits, labels, out, logits.stride(0), vocab, label_offset, logit_scale, BLOCK_V=BLOCK_V)
    return out


def _grad(logits, labels, lse, scale, label_offset, vocab_total, smoothing, z_loss, logit_scale, dtype):
    """d loss / d logits (rows, vocab) in ``dtype``, each row times scale[row]."""
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=dtype, device=logits.device)
    if rows and vocab:
        _ce_grad[(rows, triton.cdiv(vocab, BLOCK_V))](logits, labels, lse, scale, out, logits.stride(0), out.stride(0),
                                                      vocab, label_offset, 1.0 / vocab_total, smoothing, z_loss,
                                                      logit_scale, BLOCK_V=BLOCK_V)
    return out


_stats_op = OpaqueOp("ce_stats", "(Tensor logits, Tensor labels, int label_offset, float logit_scale) -> Tensor",
                     _stats, lambda logits, *args: logits.new_empty((logits.shape[0], 4), dtype=torch.float32))
_grad_op = OpaqueOp("ce_grad", "(Tensor logits, Tensor labels, Tensor lse, Tensor scale, int label_offset, "
                    "int vocab_total, float smoothing, float z_loss, float logit_scale, ScalarType dtype) -> Tensor",
                    _grad, lambda logits, *args: logits.new_empty(logits.shape, dtype=args[-1]))


class _Running:
    """Merges per-block statistics into a running log-sum-exp (online softmax across vocab blocks)."""

    def __init__(self, rows: int, device):
        self.m = torch.full((rows,), float("-inf"), device=device)
        self.d = torch.zeros(rows, device=device)
        self.total = torch.zeros(rows, device=device)
        self.target = torch.zeros(rows, device=device)

    def add(self, stats: torch.Tensor) -> None:
        m = torch.maximum(self.m, stats[:, 0])
        safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows of -inf everywhere stay finite
        self.d = self.d * torch.exp(self.m - safe) + stats[:, 1] * torch.exp(stats[:, 0] - safe)
        self.m = m
        self.total += stats[:, 2]
        self.target += stats[:, 3]

    def reduce(self, group) -> None:
        """Combine the vocab shards of a tensor-parallel group."""
        if group is None:
            return
        m = self.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        self.d = self.d * torch.exp(self.m - m)
        self.m = m
        both = torch.stack([self.d, self.total, self.target])
        dist.all_reduce(both, group=group)
        self.d, self.total, self.target = both[0], both[1], both[2]

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.d)


def _given_lse(logits, labels, offset, lse, group):
    """(lse, x[label]) from a precomputed lse: x[label] gathered, not streamed; under ``group``, lse (this shard's)
    combined across the group as a computed one is (a running state of max lse, sum 1), and x[label] taken from
    the shard that holds it."""
    local = labels.long() - offset
    in_shard = (local >= 0) & (local < logits.shape[1])
    target = logits.gather(1, torch.where(in_shard, local, 0)[:, None]).squeeze(1).float()
    run = _Running(labels.shape[0], logits.device)
    run.m, run.d = lse.detach().float().contiguous(), torch.ones_like(run.d)
    run.target = torch.where(in_shard, target, torch.zeros_like(target))
    run.reduce(group)
    return run.lse(), run.target


def _finish(lse, target, total, labels, ignore_index, vocab_total, smoothing, z_loss):
    """(per-token loss with 0 where ignored, its z-loss part, valid mask); total = sum x (used with smoothing)."""
    loss = (1.0 - smoothing) * (lse - target)
    if smoothing:
        loss = loss + smoothing * (lse - total / vocab_total)
    valid = labels != ignore_index
    z_part = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse)) if z_loss else torch.zeros_like(lse)
    loss = torch.where(valid, loss + z_part, torch.zeros_like(loss))
    return loss, z_part, valid


def _row_scale(grad_out, valid, reduction):
    """d(reduced loss)/d(per-token loss) per token: the chain rule through the reduction, 0 where ignored."""
    if reduction == "none":
        scale = grad_out.float()
    elif reduction == "sum":
        scale = grad_out.float().expand(valid.shape)
    else:
        scale = (grad_out.float() / valid.sum().clamp(min=1)).expand(valid.shape)
    return torch.where(valid, scale, torch.zeros_like(scale)).contiguous()


def _shard(process_group, vocab_local):
    """(label offset, full vocab size) of this rank's vocab shard."""
    if process_group is None:
        return 0, vocab_local
    return dist.get_rank(process_group) * vocab_local, vocab_local * dist.get_world_size(process_group)


def _check(reduction, labels, rows, ignore_index, vocab_total, logit_scale):
    check_reduction(reduction)
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive (flash-attn's), got {logit_scale}")
    # EVO_DEBUG=1: the label range check, a host sync (skipped inside a compiled graph)
    if not torch.compiler.is_compiling() and os.environ.get("EVO_DEBUG") == "1":
        check_labels(labels, ignore_index, vocab_total)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, smoothing, z_loss, reduction, process_group, logit_scale,
                precomputed_lse):
        offset, vocab_total = _shard(process_group, logits.shape[1])
        _check(reduction, labels, logits.shape[0], ignore_index, vocab_total, logit_scale)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        if precomputed_lse is not None and smoothing == 0 and logit_scale == 1.0:  # where flash-attn uses it
            if precomputed_lse.shape != labels.shape:
                raise ValueError(f"precomputed_lse must have shape {tuple(labels.shape)}, got "
                                 f"{tuple(precomputed_lse.shape)}")
            lse, target = _given_lse(logits, labels, offset, precomputed_lse, process_group)
            total = None
        else:
            run = _Running(logits.shape[0], logits.device)
            run.add(_stats_op(logits, labels, offset, logit_scale))
            run.reduce(process_group)
            lse, target, total = run.lse(), run.target, run.total
        loss, z_part, valid = _finish(lse, target, total, labels, ignore_index, vocab_total, smoothing, z_loss)
        ctx.save_for_backward(logits, labels, lse, valid)
        ctx.args = (offset, vocab_total, smoothing, z_loss, reduction, logit_scale)
        z_reduced = reduce_loss(z_part, valid, reduction)
        ctx.mark_non_differentiable(z_reduced)
        return reduce_loss(loss, valid, reduction), z_reduced

    @staticmethod
    def backward(ctx, grad_out, _grad_z_loss):  # the z-loss output is for logging: no gradient (flash-attn's)
        logits, labels, lse, valid = ctx.saved_tensors
        offset, vocab_total, smoothing, z_loss, reduction, logit_scale = ctx.args
        scale = _row_scale(grad_out, valid, reduction)
        dlogits = _grad_op(logits, labels, lse, scale, offset, vocab_total, smoothing, z_loss, logit_scale,
                           logits.dtype)
        return dlogits, None, None, None, None, None, None, None, None


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None, *, logit_scale=1.0, return_z_loss=False, precomputed_lse=None):
    """logits (tokens, vocab) fp32/bf16/fp16 (the local vocab shard with ``process_group``), labels (tokens,) int
    -> the loss, fp32 (per token with reduction='none'), or (loss, z-loss part) with return_z_loss.

    logit_scale multiplies the logits first; z_loss is flash-attn's lse_square_scale; precomputed_lse (tokens,)
    fp32 (this rank's shard lse under process_group) replaces the lse where label_smoothing is 0 and logit_scale
    1, and is ignored otherwise, as in flash-attn. Labels outside [0, vocab) other than ignore_index: ValueError
    with EVO_DEBUG=1, else unchecked (module docstring).
    """
    loss, z_part = CrossEntropyFunction.apply(logits, labels, ignore_index, float(label_smoothing), float(z_loss),
                                              reduction, process_group, float(logit_scale), precomputed_lse)
    return (loss, z_part) if return_z_loss else loss


def _vocab_chunks(vocab: int, rows: int, vocab_chunk: int | None):
    size = vocab_chunk or max(BLOCK_V, min(vocab, CHUNK_ELEMENTS // max(rows, 1)))
    return [(v, min(v + size, vocab)) for v in range(0, vocab, size)]


def _chunk_logits(hidden, weight, bias, v0, v1):
    w = weight[v0:v1]
    return torch.addmm(bias[v0:v1], hidden, w.t()) if bias is not None else hidden @ w.t()


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, smoothing, z_loss, reduction, process_group,
                vocab_chunk, logit_scale):
        offset, vocab_total = _shard(process_group, weight.shape[0])
        _check(reduction, labels, hidden.shape[0], ignore_index, vocab_total, logit_scale)
        hidden, labels = hidden.contiguous(), labels.contiguous()
        chunks = _vocab_chunks(weight.shape[0], hidden.shape[0], vocab_chunk)
        run = _Running(hidden.shape[0], hidden.device)
        for v0, v1 in chunks:
            run.add(_stats_op(_chunk_logits(hidden, weight, bias, v0, v1), labels, offset + v0, logit_scale))
        run.reduce(process_group)
        lse = run.lse()
        loss, _, valid = _finish(lse, run.target, run.total, labels, ignore_index, vocab_total, smoothing, z_loss)
        correct = (valid & (run.target >= run.m)).sum()  # after reduce(): the global label logit and max
        ctx.save_for_backward(hidden, weight, bias, labels, lse, valid)
        ctx.args = (offset, vocab_total, smoothing, z_loss, reduction, chunks, process_group, logit_scale)
        ctx.mark_non_differentiable(correct)
        return reduce_loss(loss, valid, reduction), correct

    @staticmethod
    def backward(ctx, grad_out, _grad_correct):
        hidden, weight, bias, labels, lse, valid = ctx.saved_tensors
        offset, vocab_total, smoothing, z_loss, reduction, chunks, group, logit_scale = ctx.args
        scale = _row_scale(grad_out, valid, reduction)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for v0, v1 in chunks:
            logits = _chunk_logits(hidden, weight, bias, v0, v1)
            dlogits = _grad_op(logits, labels, lse, scale, offset + v0, vocab_total, smoothing, z_loss, logit_scale,
                               hidden.dtype)
            if need_h:
                grad_h += (dlogits @ weight[v0:v1]).float()
            if need_w:
                torch.mm(dlogits.t(), hidden, out=grad_w[v0:v1])  # this chunk's rows, complete: one matmul
            if need_b:
                grad_b[v0:v1] = dlogits.float().sum(0)
        if need_h and group is not None:
            dist.all_reduce(grad_h, group=group)  # every vocab shard contributes to each hidden gradient
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                               reduction="mean", process_group=None, return_accuracy=False, vocab_chunk=None, *,
                               logit_scale=1.0):
    """The cross-entropy of ``logit_scale * (hidden (tokens, d) @ weight (vocab, d).T + bias)`` without the full
    logits; hidden, weight, bias fp32/bf16/fp16, labels (tokens,) int.

    With ``process_group``, weight and bias are this rank's vocab shard. Returns the loss (fp32), or
    (loss, correct count) with return_accuracy. ``vocab_chunk`` overrides the chunk size (tests). The scale is
    applied inside the kernels (free). No precomputed_lse or return_z_loss here: the lse is always computed in
    the chunked forward, and the z-loss part is z_loss * lse^2 of it.
    """
    loss, correct = FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, bias, ignore_index,
                                                          float(label_smoothing), float(z_loss), reduction,
                                                          process_group, vocab_chunk, float(logit_scale))
    return (loss, correct) if return_accuracy else loss
