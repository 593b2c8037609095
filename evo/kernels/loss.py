"""Cross-entropy and fused linear cross-entropy in Triton.

Per token with logits x (vocab V), label y, smoothing s and z-loss weight z:
    lse  = log(sum_v exp(x_v))
    loss = (1 - s) * (lse - x_y) + s * (lse - mean_v x_v) + z * lse^2      (0 where y == ignore_index)
    dloss/dx_v = p_v * (1 + 2 z lse) - (1 - s) * [v == y] - s / V,          p = softmax(x)

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

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from evo.kernels.reference import _check_reduction, _reduce  # the reductions are the reference's own
from evo.kernels.triton_utils import OpaqueOp

BLOCK_V = 2048
CHUNK_ELEMENTS = 1 << 24  # logits elements per vocab chunk of the fused version (32 MiB in bf16)


# grid: (rows,); one program streams one row of logits in BLOCK_V tiles (online max / sum of exp)
@triton.jit
def _ce_stats(X, LABELS, STATS, stride_x, V, label_offset, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    label = tl.load(LABELS + row).to(tl.int64) - label_offset
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        total += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    in_block = (label >= 0) & (label < V)
    target = tl.load(x_row + tl.where(in_block, label, 0)).to(tl.float32)
    tl.store(STATS + row * 4 + 0, m)
    tl.store(STATS + row * 4 + 1, d)
    tl.store(STATS + row * 4 + 2, total)
    tl.store(STATS + row * 4 + 3, tl.where(in_block, target, 0.0))


# grid: (rows, cdiv(V, BLOCK_V)); elementwise gradient of one tile of one row
@triton.jit
def _ce_grad(X, LABELS, LSE, SCALE, DX, stride_x, stride_dx, V, label_offset, inv_vocab, smoothing, z_loss,
             BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    label = tl.load(LABELS + row).to(tl.int64) - label_offset
    p = tl.exp(x - lse)
    g = p * (1.0 + 2.0 * z_loss * lse) - smoothing * inv_vocab
    g = tl.where(cols == label, g - (1.0 - smoothing), g)
    tl.store(DX + row * stride_dx + cols, (g * scale).to(DX.dtype.element_ty), mask=mask)


def _stats(logits: torch.Tensor, labels: torch.Tensor, label_offset: int) -> torch.Tensor:
    """(rows, 4) fp32: max, sum exp(x - max), sum x, x[label] (0 if the label is outside this block)."""
    rows, vocab = logits.shape
    out = torch.empty((rows, 4), dtype=torch.float32, device=logits.device)
    if rows:
        _ce_stats[(rows,)](logits, labels, out, logits.stride(0), vocab, label_offset, BLOCK_V=BLOCK_V)
    return out


def _grad(logits, labels, lse, scale, label_offset, vocab_total, smoothing, z_loss, dtype):
    """d loss / d logits (rows, vocab) in ``dtype``, each row times scale[row]."""
    rows, vocab = logits.shape
    out = torch.empty((rows, vocab), dtype=dtype, device=logits.device)
    if rows and vocab:
        _ce_grad[(rows, triton.cdiv(vocab, BLOCK_V))](logits, labels, lse, scale, out, logits.stride(0), out.stride(0),
                                                      vocab, label_offset, 1.0 / vocab_total, smoothing, z_loss,
                                                      BLOCK_V=BLOCK_V)
    return out


_stats_op = OpaqueOp("ce_stats", "(Tensor logits, Tensor labels, int label_offset) -> Tensor", _stats,
                     lambda logits, labels, label_offset: logits.new_empty((logits.shape[0], 4), dtype=torch.float32))
_grad_op = OpaqueOp("ce_grad", "(Tensor logits, Tensor labels, Tensor lse, Tensor scale, int label_offset, "
                    "int vocab_total, float smoothing, float z_loss, ScalarType dtype) -> Tensor", _grad,
                    lambda logits, *args: logits.new_empty(logits.shape, dtype=args[-1]))


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


def _finish(run: _Running, labels, ignore_index, vocab_total, smoothing, z_loss):
    """(per-token loss with 0 where ignored, lse, valid mask, correct count)."""
    lse = run.m + torch.log(run.d)
    loss = (1.0 - smoothing) * (lse - run.target)
    if smoothing:
        loss = loss + smoothing * (lse - run.total / vocab_total)
    if z_loss:
        loss = loss + z_loss * lse * lse
    valid = labels != ignore_index
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    correct = (valid & (run.target >= run.m)).sum()
    return loss, lse, valid, correct


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


def _check(reduction, labels, rows):
    _check_reduction(reduction)
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, smoothing, z_loss, reduction, process_group):
        _check(reduction, labels, logits.shape[0])
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        offset, vocab_total = _shard(process_group, logits.shape[1])
        run = _Running(logits.shape[0], logits.device)
        run.add(_stats_op(logits, labels, offset))
        run.reduce(process_group)
        loss, lse, valid, _ = _finish(run, labels, ignore_index, vocab_total, smoothing, z_loss)
        ctx.save_for_backward(logits, labels, lse, valid)
        ctx.args = (offset, vocab_total, smoothing, z_loss, reduction)
        return _reduce(loss, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, valid = ctx.saved_tensors
        offset, vocab_total, smoothing, z_loss, reduction = ctx.args
        scale = _row_scale(grad_out, valid, reduction)
        dlogits = _grad_op(logits, labels, lse, scale, offset, vocab_total, smoothing, z_loss, logits.dtype)
        return dlogits, None, None, None, None, None, None


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None):
    """logits (tokens, vocab) fp32/bf16/fp16 (the local vocab shard with ``process_group``), labels (tokens,)
    -> the loss (fp32; per token with reduction='none')."""
    return CrossEntropyFunction.apply(logits, labels, ignore_index, float(label_smoothing), float(z_loss), reduction,
                                      process_group)


def _vocab_chunks(vocab: int, rows: int, vocab_chunk: int | None):
    size = vocab_chunk or max(BLOCK_V, min(vocab, CHUNK_ELEMENTS // max(rows, 1)))
    return [(v, min(v + size, vocab)) for v in range(0, vocab, size)]


def _chunk_logits(hidden, weight, bias, v0, v1):
    w = weight[v0:v1]
    return torch.addmm(bias[v0:v1], hidden, w.t()) if bias is not None else hidden @ w.t()


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, smoothing, z_loss, reduction, process_group,
                vocab_chunk):
        _check(reduction, labels, hidden.shape[0])
        hidden, labels = hidden.contiguous(), labels.contiguous()
        offset, vocab_total = _shard(process_group, weight.shape[0])
        chunks = _vocab_chunks(weight.shape[0], hidden.shape[0], vocab_chunk)
        run = _Running(hidden.shape[0], hidden.device)
        for v0, v1 in chunks:
            run.add(_stats_op(_chunk_logits(hidden, weight, bias, v0, v1), labels, offset + v0))
        run.reduce(process_group)
        loss, lse, valid, correct = _finish(run, labels, ignore_index, vocab_total, smoothing, z_loss)
        if process_group is not None:
            dist.all_reduce(correct, group=process_group)  # each token's label lives in one shard
        ctx.save_for_backward(hidden, weight, bias, labels, lse, valid)
        ctx.args = (offset, vocab_total, smoothing, z_loss, reduction, chunks, process_group)
        ctx.mark_non_differentiable(correct)
        return _reduce(loss, valid, reduction), correct

    @staticmethod
    def backward(ctx, grad_out, _grad_correct):
        hidden, weight, bias, labels, lse, valid = ctx.saved_tensors
        offset, vocab_total, smoothing, z_loss, reduction, chunks, group = ctx.args
        scale = _row_scale(grad_out, valid, reduction)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for v0, v1 in chunks:
            logits = _chunk_logits(hidden, weight, bias, v0, v1)
            dlogits = _grad_op(logits, labels, lse, scale, offset + v0, vocab_total, smoothing, z_loss, hidden.dtype)
            if need_h:
                grad_h += (dlogits @ weight[v0:v1]).float()
            if need_w:
                torch.mm(dlogits.t(), hidden, out=grad_w[v0:v1])  # this chunk's rows, complete: one matmul
            if need_b:
                grad_b[v0:v1] = dlogits.float().sum(0)
        if need_h and group is not None:
            dist.all_reduce(grad_h, group=group)  # every vocab shard contributes to each hidden gradient
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                               reduction="mean", process_group=None, return_accuracy=False, vocab_chunk=None):
    """The cross-entropy of ``hidden (tokens, d) @ weight (vocab, d).T + bias`` without the full logits.

    With ``process_group``, weight and bias are this rank's vocab shard. Returns the loss, or
    (loss, correct count) with return_accuracy. ``vocab_chunk`` overrides the chunk size (tests).
    """
    loss, correct = FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, bias, ignore_index,
                                                          float(label_smoothing), float(z_loss), reduction,
                                                          process_group, vocab_chunk)
    return (loss, correct) if return_accuracy else loss
