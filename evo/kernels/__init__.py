"""evo's kernels: the public functions the model layer calls, and the backend that runs them.

Backend per call: ``EVO_KERNEL_BACKEND`` (or ``use_backend(name)`` for a block of code) is
``auto`` (Triton for CUDA tensors, the plain-PyTorch reference for CPU tensors), ``triton`` (Triton
always; on CPU that needs ``TRITON_INTERPRET=1`` set before triton is imported) or ``torch`` (the
reference always). Each op's Triton implementation lives in the module named in ``_TRITON``, imported on first use
(so importing evo needs no Triton); an op without one runs the reference under ``auto`` and raises
under ``triton``.

Under torch.compile the backend is chosen while tracing: a ``use_backend`` block is guarded (a change
recompiles), ``EVO_KERNEL_BACKEND`` is read once (Dynamo does not guard the environment). The Triton
launches reach the compiled graph as the custom ops ``torch.ops.evo.*`` (see ``triton_utils.OpaqueOp``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from evo.kernels import reference

BACKENDS = ("auto", "triton", "torch")
_override: str | None = None  # use_backend's choice: a plain global, which torch.compile guards on
_TRITON: dict[str, str] = {  # op name -> the module (in evo/kernels/) holding its Triton implementation
    "rms_norm": "rmsnorm",
    "fused_add_rms_norm": "rmsnorm",
    "swiglu": "activation",
    "apply_rotary_emb": "rotary",
    "apply_rotary_emb_qkv_": "rotary",
    "apply_rotary_emb_kv_": "rotary",
    "cross_entropy": "loss",
    "fused_linear_cross_entropy": "loss",
    "flash_attn_func": "attention",
    "flash_attn_varlen_func": "attention",
    "flash_attn_varlen_backward": "attention",
    "flash_attn_with_kvcache": "attention",
    "moe_routing": "moe",
    "grouped_mm": "moe",
    "moe_experts": "moe",
}
# Module files never share a public function's name: importing evo.kernels.swiglu would replace the
# function evo.kernels.swiglu with the module. Hence activation.py (swiglu) and loss.py (cross-entropy).


def backend() -> str:
    """The backend in force: ``use_backend``'s if inside one, else ``EVO_KERNEL_BACKEND`` (default auto)."""
    name = _override or os.environ.get("EVO_KERNEL_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"EVO_KERNEL_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block of code with kernel backend ``name`` (auto, triton or torch); process-wide, not per thread."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def _triton_module(name: str):
    """evo.kernels.<name>, imported on first use by import statements (Dynamo traces those, not importlib)."""
    if name == "rmsnorm":
        from evo.kernels import rmsnorm as module
    elif name == "activation":
        from evo.kernels import activation as module
    elif name == "rotary":
        from evo.kernels import rotary as module
    elif name == "loss":
        from evo.kernels import loss as module
    elif name == "attention":
        from evo.kernels import attention as module
    elif name == "moe":
        from evo.kernels import moe as module
    else:
        raise KeyError(f"no import statement for evo.kernels.{name}: add one here with its _TRITON entry")
    return module


def _impl(op: str, x: torch.Tensor) -> Callable:
    """Pick the implementation of ``op`` for a call whose main tensor is ``x``."""
    name = backend()
    if name == "torch" or (name == "auto" and (not x.is_cuda or op not in _TRITON)):
        return getattr(reference, op)
    if op not in _TRITON:
        raise NotImplementedError(f"evo.kernels.{op} has no Triton implementation yet; use EVO_KERNEL_BACKEND=torch")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return getattr(_triton_module(_TRITON[op]), op)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim. x (..., hidden), weight (hidden,) -> (..., hidden) in x.dtype."""
    return _impl("rms_norm", x)(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Returns (rms_norm(x + residual, weight) in x.dtype, x + residual in residual.dtype); x and residual
    (..., hidden), their dtypes may differ (an fp32 residual stream). The norm is of the unrounded fp32 sum."""
    return _impl("fused_add_rms_norm", x)(x, residual, weight, eps)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotary embedding with flash-attn's signature.

    x (batch, seqlen, heads, headdim), or (total_tokens, heads, headdim) with ``cu_seqlens`` (positions
    restart per sequence); cos, sin (max_seqlen, rotary_dim / 2); channels past rotary_dim unchanged.
    """
    return _impl("apply_rotary_emb", x)(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """flash-attn's in-place rotary of packed q and k: qkv (batch, seqlen, 3, heads, headdim), or (batch, seqlen,
    heads_q + 2 * heads_k, headdim) with ``num_heads_q``; k uses cos_k, sin_k if given. Returns qkv."""
    return _impl("apply_rotary_emb_qkv_", qkv)(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """flash-attn's in-place rotary of k in kv (batch, seqlen, 2, heads, headdim). Returns kv."""
    return _impl("apply_rotary_emb_kv_", kv)(kv, cos, sin, interleaved, seqlen_offsets)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype."""
    return _impl("swiglu", gate)(gate, up)


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None, *, logit_scale=1.0, return_z_loss=False, precomputed_lse=None):
    """Cross-entropy of logits (tokens, vocab) against labels (tokens,), fp32; flash-attn's cross_entropy_loss
    with CrossEntropyLoss's reductions (z_loss is its lse_square_scale). With return_z_loss, (loss, the z-loss
    part reduced alike, not differentiable). precomputed_lse (tokens,) is used where flash-attn uses it
    (label_smoothing 0, logit_scale 1). Labels outside [0, vocab) other than ignore_index raise a ValueError on
    the reference path, and on the Triton path with EVO_DEBUG=1. See reference.cross_entropy and loss.py."""
    return _impl("cross_entropy", logits)(logits, labels, ignore_index, label_smoothing, z_loss, reduction,
                                          process_group, logit_scale=logit_scale, return_z_loss=return_z_loss,
                                          precomputed_lse=precomputed_lse)


def cross_entropy_loss(logits, labels, precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0,
                       lse_square_scale=0.0, ignore_index=-100, inplace_backward=False, process_group=None):
    """flash-attn's functional cross-entropy (flash_attn.ops.triton.cross_entropy), same signature: returns
    (losses, z_losses), both (tokens,) fp32 and 0 where ignored; losses include the z-loss
    lse_square_scale * lse^2, z_losses is that part alone (not differentiable). ``inplace_backward`` (a memory
    saving of flash-attn's) is accepted and changes nothing here. ``cross_entropy`` with reduction="none"."""
    return cross_entropy(logits, labels, ignore_index, label_smoothing, lse_square_scale, "none", process_group,
                         logit_scale=logit_scale, return_z_loss=True, precomputed_lse=precomputed_lse)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", process_group=None, return_accuracy=False, *,
                               logit_scale=1.0):
    """Cross-entropy of logit_scale * (hidden (tokens, d) @ weight (vocab, d).T (+ bias)) without keeping the
    logits (in the Triton backend). With return_accuracy, returns (loss, number of correct argmax tokens)."""
    return _impl("fused_linear_cross_entropy", hidden)(hidden, weight, labels, bias, ignore_index, label_smoothing,
                                                       z_loss, reduction, process_group, return_accuracy,
                                                       logit_scale=logit_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's varlen attention: q (total_q, heads_q, d), k and v (total_k, heads_kv, d), int32
    cu_seqlens; each packed sequence attends only within itself. Returns out (total_q, heads_q, d), or
    (out, softmax_lse (heads_q, total_q) fp32, None) with return_attn_probs."""
    return _impl("flash_attn_varlen_func", q)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                              deterministic, return_attn_probs)


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False):
    """The backward of ``flash_attn_varlen_func`` as a function (flash-attn's ``_flash_attn_varlen_backward``, which
    writes into buffers; this returns them): from dout, the inputs, and the forward's out and softmax_lse
    (heads_q, total_q) fp32, returns (dq, dk, dv) in the inputs' shapes and dtypes. out and lse may come from
    elsewhere than one call (a context-parallel ring merges them over key blocks): the gradients are those of
    softmax(q k^T) v with that lse as the normalizer and delta = rowsum(dout * out). Deterministic on both backends."""
    if softmax_lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"flash_attn_varlen_backward needs softmax_lse (heads_q, total_q) = ({q.shape[1]}, "
                         f"{q.shape[0]}), got {tuple(softmax_lse.shape)}")
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"flash_attn_varlen_backward needs dout and out shaped as q {tuple(q.shape)}, got "
                         f"{tuple(dout.shape)} and {tuple(out.shape)}")
    return _impl("flash_attn_varlen_backward", q)(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                                                  max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
                                                  softcap, deterministic)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's attention: q (batch, seqlen_q, heads_q, d), k and v (batch, seqlen_k, heads_kv, d)."""
    return _impl("flash_attn_func", q)(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                       alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """flash-attn 2's attention against a KV cache, for decoding; no backward (as flash-attn).

    q (batch, seqlen_q, heads_q, d); k_cache, v_cache (batch_cache, seqlen_cache, heads_kv, d), updated in place
    with k, v (batch, seqlen_new, heads_kv, d) written at rows cache_seqlens (an int or an int32 (batch,) tensor;
    None: the whole cache is valid) of cache row cache_batch_idx[b]. With rotary_cos, rotary_sin (seqlen_ro >=
    seqlen_cache, rotary_dim / 2) the new k is rotated at positions cache_seqlens + i, and q too when causal or
    local (else all of q at cache_seqlens). cache_leftpad (batch,): keys before it are not attended. block_table
    and alibi_slopes raise NotImplementedError. Returns out (batch, seqlen_q, heads_q, d), or (out, softmax_lse
    (batch, heads_q, seqlen_q) fp32) with return_softmax_lse.
    """
    return _impl("flash_attn_with_kvcache", q)(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                               cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                               window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                                               return_softmax_lse)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, heads, d)."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads_q, d), kv (batch, seqlen_k, 2, heads_kv, d)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, heads, d)."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, heads_q, d), kv (total_k, 2, heads_kv, d)."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


__all__ = ["backend", "use_backend", "rms_norm", "fused_add_rms_norm", "apply_rotary_emb", "apply_rotary_emb_qkv_",
           "apply_rotary_emb_kv_", "swiglu", "cross_entropy", "cross_entropy_loss",
           "fused_linear_cross_entropy", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_varlen_backward",
           "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_with_kvcache", "moe_routing", "grouped_mm", "grouped_mm_unchecked", "moe_experts"]


def moe_routing(expert_ids: torch.Tensor, num_experts: int):
    """The routing metadata of a mixture of experts: ``expert_ids`` (T, k) integers in [0, num_experts), each
    token's k choices. Returns (counts, offs, slots, order) for the T*k assignments flattened row-major, put in
    expert order stably: counts (E,) and offs (E,) int32 (inclusive ends, ``grouped_mm``'s offsets), slots (T*k,)
    int64 (the sorted row of each assignment) and order (T*k,) int64 (the assignment at each sorted row: token
    ``order // k``). Ids outside [0, num_experts) raise a ValueError on the reference path, and on the Triton path
    with EVO_DEBUG=1 (a host sync). See evo/kernels/moe.py."""
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"moe_routing needs integer expert ids, got {expert_ids.dtype}")
    if os.environ.get("EVO_DEBUG") == "1":
        reference.check_expert_ids(expert_ids, num_experts)
    return _impl("moe_routing", expert_ids)(expert_ids, num_experts)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs=offs) for a 2-D ``a`` and a 3-D ``b``: a (M, K) with its rows sorted by group,
    b (G, K, N), offs (G,) int32 inclusive ends of the groups' rows. Returns (M, N): out[r] = a[r] @ b[g] for the
    rows r of group g. Differentiable in a and b (an empty group's db is zero). offs must be non-decreasing and end
    at M (checked: a host sync; torch leaves later rows uninitialised); ``grouped_mm_unchecked`` takes offsets as
    ``moe_routing`` returns them, without the check."""
    reference.check_grouped_mm(a, b, offs, values=True)
    return _impl("grouped_mm", a)(a, b, offs)


def grouped_mm_unchecked(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm`` with the shapes and dtypes checked but not the values of ``offs`` (no host sync)."""
    reference.check_grouped_mm(a, b, offs, values=False)
    return _impl("grouped_mm", a)(a, b, offs)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A mixture of SwiGLU experts, routed: x (T, H), expert_ids (T, k) integers in [0, E), weights (T, k) floats,
    w1 and w3 (E, I, H), w2 (E, H, I) (nn.Linear's layout, as transformers' checkpoints store experts). Returns
    (T, H) in x's dtype: out[t] = sum over j of weights[t, j] * (silu(x[t] w1[e]^T) * (x[t] w3[e]^T)) w2[e]^T with
    e = expert_ids[t, j]. Differentiable in x, weights and the expert weights (an expert with no token gets zero).
    The Triton path fuses the gather, SwiGLU and the weighting into the grouped GEMMs (evo/kernels/moe.py)."""
    reference.check_moe_experts(x, expert_ids, weights, w1, w3, w2)
    if os.environ.get("EVO_DEBUG") == "1":
        reference.check_expert_ids(expert_ids, w1.shape[0])
    return _impl("moe_experts", x)(x, expert_ids, weights, w1, w3, w2)
