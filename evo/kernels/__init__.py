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
    "cross_entropy": "loss",
    "fused_linear_cross_entropy": "loss",
    "flash_attn_func": "attention",
    "flash_attn_varlen_func": "attention",
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
    """Returns (rms_norm(x + residual, weight), x + residual); x and residual (..., hidden)."""
    return _impl("fused_add_rms_norm", x)(x, residual, weight, eps)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotary embedding with flash-attn's signature.

    x (batch, seqlen, heads, headdim), or (total_tokens, heads, headdim) with ``cu_seqlens`` (positions
    restart per sequence); cos, sin (max_seqlen, rotary_dim / 2); channels past rotary_dim unchanged.
    """
    return _impl("apply_rotary_emb", x)(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype."""
    return _impl("swiglu", gate)(gate, up)


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  process_group=None):
    """Cross-entropy of logits (tokens, vocab) against labels (tokens,); see reference.cross_entropy."""
    return _impl("cross_entropy", logits)(logits, labels, ignore_index, label_smoothing, z_loss, reduction,
                                          process_group)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", process_group=None, return_accuracy=False):
    """Cross-entropy of hidden (tokens, d) @ weight (vocab, d).T (+ bias) without keeping the logits
    (in the Triton backend). With return_accuracy, returns (loss, number of correct argmax tokens)."""
    return _impl("fused_linear_cross_entropy", hidden)(hidden, weight, labels, bias, ignore_index, label_smoothing,
                                                       z_loss, reduction, process_group, return_accuracy)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's varlen attention: q (total_q, heads_q, d), k and v (total_k, heads_kv, d), int32
    cu_seqlens; each packed sequence attends only within itself. Returns out (total_q, heads_q, d), or
    (out, softmax_lse (heads_q, total_q) fp32, None) with return_attn_probs."""
    return _impl("flash_attn_varlen_func", q)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                              deterministic, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's attention: q (batch, seqlen_q, heads_q, d), k and v (batch, seqlen_k, heads_kv, d)."""
    return _impl("flash_attn_func", q)(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                       alibi_slopes, deterministic, return_attn_probs)


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


__all__ = ["backend", "use_backend", "rms_norm", "fused_add_rms_norm", "apply_rotary_emb", "swiglu", "cross_entropy",
           "fused_linear_cross_entropy", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]
