"""Mixture-of-experts benchmark: the routed experts forward + backward and their grouped GEMM, each provider
checked against an fp32 reference first (rows: bench/common.py's schema, plus ``tokens_per_s``).

Ops:
- ``moe_experts`` (T tokens, top-k of E SwiGLU experts, hidden H, expert intermediate I): given the tokens, the
  routing (ids and weights, top-k of random logits, so about T*k/E rows per expert) and the expert weights, the
  weighted sum of each token's k experts; routing metadata included, the router's own matmul not. Providers:
  ``evo`` (``evo.kernels.moe_experts``: on a GPU the fused Triton kernels, evo/kernels/moe.py),
  ``torch._grouped_mm`` (the same math on PyTorch's grouped GEMM: tokens sorted with torch.sort, gate and up as one
  GEMM of the stacked (E, 2I, H) weight, SwiGLU, the down GEMM, weighted sum: how torchtitan runs experts),
  ``loop`` (transformers' expert-by-expert loop) and ``liger`` (Liger-Kernel's ``LigerFusedMoEFunction``, where
  its package has one: bench/fetch_liger.sh). Inputs: x (T, H), ids (T, k), weights (T, k), the stacked gate/up
  weight (E, 2I, H) with gate rows first (transformers' ``gate_up_proj``, Liger's input; evo takes its two halves
  as views) and the down weight (E, H, I).
- ``grouped_mm`` (the first GEMM alone: M = T*k sorted rows, K = H, N = 2I, E groups): ``evo``
  (``evo.kernels.grouped_mm_unchecked``), ``torch._grouped_mm``, ``loop`` (evo's reference: a matmul per group).

FLOPs (the count Liger-Kernel's fused-MoE numbers use, linkedin/Liger-Kernel#1294): the experts' three GEMMs,
forward 2*T*k*H*2I + 2*T*k*I*H = 6*T*k*H*I, backward twice the forward (dX and dW of each), so forward +
backward 18*T*k*H*I; the grouped GEMM 2*M*K*N forward, 3 times that forward + backward. SwiGLU, the routing and
the weighted sum are not counted.

Shapes: on a GPU bf16 at Qwen3-30B-A3B's experts (E 128, H 2048, I 768, top-8) over a sweep of T, 16k tokens the
goal's (``--quick`` runs only it); on a CPU fp32 at a small shape (evo there is its reference path); ``smoke``
bf16 at tiny shapes on any device (on a CPU through Triton's interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, liger, run_case

# (tokens swept, --quick's, (top_k, experts, hidden, intermediate))
GPU = ([4096, 8192, 16384], [16384], (8, 128, 2048, 768))
CPU = ([256, 1024], [1024], (2, 8, 256, 128))
SMOKE = ([16, 40], [40], (2, 4, 32, 16))


def _halves(w13: torch.Tensor):
    inter = w13.shape[1] // 2
    return w13[:, :inter], w13[:, inter:]


def evo_experts(x, ids, weights, w13, w2):
    from evo import kernels

    return kernels.moe_experts(x, ids, weights, *_halves(w13), w2)


def reference_experts(x, ids, weights, w13, w2):
    from evo.kernels import reference

    return reference.moe_experts(x, ids, weights, *_halves(w13), w2)


def torch_grouped_experts(x, ids, weights, w13, w2):
    """The experts on torch._grouped_mm, routing by torch.sort (stable)."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    slots = torch.empty_like(order)
    slots[order] = torch.arange(flat.numel(), device=flat.device)
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)[slots].view(tokens, k, -1)
    return (y * weights.to(y.dtype).unsqueeze(-1)).sum(1)


def loop_experts(x, ids, weights, w13, w2):
    """transformers' loop: expert by expert, its tokens' outputs weighted and added into place."""
    out = torch.zeros_like(x)
    gates, ups = _halves(w13)
    for e in range(w13.shape[0]):
        token, choice = torch.where(ids == e)
        v = x[token]
        y = (F.silu(v @ gates[e].T) * (v @ ups[e].T)) @ w2[e].T
        out = out.index_add(0, token, y * weights[token, choice, None].to(y.dtype))
    return out


def _liger_experts():
    """Liger-Kernel's fused MoE with this benchmark's signature, or why not (a string)."""
    functional = liger()
    if isinstance(functional, str):
        return functional
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as exc:  # noqa: BLE001 - an older Liger without it
        return f"liger-kernel has no fused MoE: {type(exc).__name__}: {str(exc)[:120]}"
    return lambda x, ids, weights, w13, w2: LigerFusedMoEFunction.apply(x, w13, w2, ids.to(torch.int32), weights)


def _routing(tokens: int, k: int, experts: int, device: str, gen: torch.Generator):
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def experts_case(tokens: int, shape, dtype, device: str) -> Case:
    k, experts, hidden, inter = shape
    gen = torch.Generator().manual_seed(tokens)
    ids, weights = _routing(tokens, k, experts, device, gen)

    def randn(*dims, scale=1.0):
        return (torch.randn(*dims, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = randn(tokens, hidden)
    w13, w2 = randn(experts, 2 * inter, hidden, scale=hidden ** -0.5), randn(experts, hidden, inter, scale=inter ** -0.5)
    return Case(op="moe_experts", mode="fwd+bwd", shape=f"{tokens}x{k}x{experts}x{hidden}x{inter}", size=tokens,
                size_name="tokens", dtype=dtype, inputs=[x, ids, weights.to(dtype).requires_grad_(), w13, w2],
                reference=reference_experts, grad_outs=[torch.randn(tokens, hidden, generator=gen).to(device, dtype)],
                flops=18.0 * tokens * k * hidden * inter)


def grouped_mm_case(tokens: int, shape, dtype, device: str) -> Case:
    from evo.kernels import reference

    k, experts, hidden, inter = shape
    gen = torch.Generator().manual_seed(tokens + 1)
    ids, _ = _routing(tokens, k, experts, device, gen)
    offs = torch.bincount(ids.reshape(-1), minlength=experts).cumsum(0).to(torch.int32)
    m, n = tokens * k, 2 * inter
    a = torch.randn(m, hidden, generator=gen).to(device, dtype).requires_grad_()
    # the weight as the model holds it (E, N, K), seen as b (E, K, N): a strided view, a leaf here
    b = (torch.randn(experts, n, hidden, generator=gen) * hidden ** -0.5).to(device, dtype).transpose(1, 2)
    b.requires_grad_()
    return Case(op="grouped_mm", mode="fwd+bwd", shape=f"{m}x{hidden}x{n}x{experts}", size=tokens, size_name="tokens",
                dtype=dtype, inputs=[a, b], reference=lambda a, b: reference.grouped_mm(a, b, offs),
                grad_outs=[torch.randn(m, n, generator=gen).to(device, dtype)], flops=6.0 * m * hidden * n), offs


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    from evo import kernels

    every, fewer, shape = SMOKE if smoke else GPU if device == "cuda" else CPU
    dtype = torch.bfloat16 if device == "cuda" or smoke else torch.float32
    triton = device == "cuda" or smoke
    rows = []
    for tokens in (fewer if quick else every):
        case = experts_case(tokens, shape, dtype, device)
        providers = {"evo": evo_experts, "torch._grouped_mm": torch_grouped_experts, "loop": loop_experts}
        if triton:
            providers["liger"] = _liger_experts()
        with kernels.use_backend("triton" if triton else "torch"):
            found = run_case(case, providers, device, quick)
        rows += [{**row, "tokens_per_s": tokens / row["ms"] * 1e3} if "ms" in row else row for row in found]
        del case
        case, offs = grouped_mm_case(tokens, shape, dtype, device)
        providers = {"evo": lambda a, b: kernels.grouped_mm_unchecked(a, b, offs),
                     "torch._grouped_mm": lambda a, b: torch._grouped_mm(a, b, offs=offs),
                     "loop": case.reference}
        with kernels.use_backend("triton" if triton else "torch"):
            rows += run_case(case, providers, device, quick)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
