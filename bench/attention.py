"""Attention benchmark: evo's FlashAttention against PyTorch's ``scaled_dot_product_attention`` with the flash
backend forced (PyTorch's FlashAttention-2) and with its default choice, in the same run, on the same inputs,
each checked against an fp32 reference first. Rows follow bench/common.py's schema.

Providers on a GPU: ``evo`` (on Hopper its forward loads and stores through TMA), ``evo-copy`` (evo with
``EVO_ATTN_TMA=0``: the forward's per-thread copies; the backward is the same kernels), ``sdpa-flash``,
``sdpa-default``; bf16, 16 query heads and
16k tokens per batch (batch = 16384 / seqlen), inputs (batch, seqlen, heads, head dim). On a CPU: ``evo`` (what
the model runs there: evo's reference path) against ``sdpa-default``, fp32, at CPU sizes. The reference is
the explicit softmax(q k^T) v of ``evo.kernels.reference.attention`` (no SDPA) in fp32, on the first sequence
and the query heads of the first KV head (the others are alike, and the whole would not fit).

FLOPs: forward 4 * batch * heads_q * seqlen^2 * headdim, halved when causal; forward + backward 3.5 times
the forward (the backward is 2.5 times it). Varlen sums seqlen_i^2 over the packed documents.
``smoke=True`` runs the GPU code at tiny shapes on any device (on a CPU through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import os

import torch

from bench.common import Case, run_case
from evo.kernels import reference as ref

# (headdim, causal, kv heads, seqlens swept, --quick's); the quick ones hold the goals: fwd+bwd causal at
# 8k and 16k against sdpa-flash, forward non-causal at 16k
GPU_CASES = [(128, True, 16, [1024, 2048, 4096, 8192, 16384], [8192, 16384]),
             (128, False, 16, [4096, 16384], [16384]),
             (128, True, 4, [8192], []),
             (64, True, 16, [4096, 16384], [])]
CPU_CASES = [(64, True, 8, [256, 512, 1024], [512, 1024])]
SMOKE_CASES = [(32, True, 4, [16, 64], [64]), (40, False, 2, [32], [32])]
VARLEN = [4096, 2048, 2048, 1024, 1024, 1024, 1024, 512, 512, 512, 512, 512, 512, 512, 512, 512]  # 16k tokens
SMOKE_VARLEN = [33, 7, 1, 23]


def _sdpa(backend: str | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attn(q, k, v, causal):  # (b, s, h, d) -> (b, s, h, d), GQA through enable_gqa
        pick = {"flash": [SDPBackend.FLASH_ATTENTION], "math": [SDPBackend.MATH]}.get(backend)
        with sdpa_kernel(pick) if pick else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2), is_causal=causal,
                                                                   enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)

    return attn


def _evo_copy(q, k, v, causal):  # the forward without TMA, as on GPUs before Hopper
    from evo.kernels import attention

    previous = os.environ.get("EVO_ATTN_TMA")
    os.environ["EVO_ATTN_TMA"] = "0"
    try:
        return attention.flash_attn_func(q, k, v, causal=causal)
    finally:
        if previous is None:
            del os.environ["EVO_ATTN_TMA"]
        else:
            os.environ["EVO_ATTN_TMA"] = previous


def _providers(device: str, smoke: bool) -> dict:
    if device == "cuda" or smoke:
        from evo.kernels import attention

        return {"evo": lambda q, k, v, c: attention.flash_attn_func(q, k, v, causal=c), "evo-copy": _evo_copy,
                "sdpa-flash": _sdpa("flash"), "sdpa-default": _sdpa(None)}
    from evo import kernels

    return {"evo": lambda q, k, v, c: kernels.flash_attn_func(q, k, v, causal=c), "sdpa-default": _sdpa(None)}


def dense_case(d: int, causal: bool, hkv: int, s: int, mode: str, tokens: int, hq: int, dtype, device) -> Case:
    b = max(1, tokens // s)
    bwd = mode == "fwd+bwd"
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=bwd) for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    g = hq // hkv  # the query heads of KV head 0

    def view(outs):
        parts = [outs[0][:1, :, :g]]
        return parts + ([outs[1][:1, :, :g], outs[2][:1, :, :1], outs[3][:1, :, :1]] if bwd else [])

    fwd_flops = 4.0 * b * hq * s * s * d / (2 if causal else 1)
    return Case(op=f"attention d{d} {'causal' if causal else 'full'} {hq}/{hkv} heads", mode=mode,
                shape=f"{b}x{s}x{hq}x{d}", size=s, size_name="seqlen", dtype=dtype, inputs=[q, k, v],
                grad_outs=[do] if bwd else [], flops=fwd_flops * (3.5 if bwd else 1),
                reference=lambda q, k, v: ref.attention(q[0], k[0], v[0], causal=causal)[0][None],
                ref_inputs=[q[:1, :, :g], k[:1, :, :1], v[:1, :, :1]], ref_grad_outs=[do[:1, :, :g]] if bwd else [],
                view=view)


def varlen_case(lens: list[int], hq: int, d: int, dtype, device) -> tuple[Case, dict]:
    from evo.kernels import attention

    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    total, m = int(cu[-1]), max(lens)
    q, k, v = (torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hq // 4, hq // 4))
    case = Case(op=f"attention varlen d{d} causal {hq}/{hq // 4} heads, {len(lens)} docs", mode="fwd+bwd",
                shape=f"{total}x{hq}x{d}", size=total, size_name="tokens", dtype=dtype, inputs=[q, k, v],
                grad_outs=[torch.randn_like(q)], flops=3.5 * 4.0 * hq * sum(x * x for x in lens) * d / 2,
                reference=lambda q, k, v: ref.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True))
    return case, {"evo": lambda q, k, v: attention.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)}


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    gpu_like = device == "cuda" or smoke
    if smoke:
        cases, tokens, hq, dtype = SMOKE_CASES, 64, 4, torch.bfloat16
    elif device == "cuda":
        cases, tokens, hq, dtype = GPU_CASES, 16384, 16, torch.bfloat16
    else:
        cases, tokens, hq, dtype = CPU_CASES, 2048, 8, torch.float32
    found = _providers(device, smoke)
    rows = []
    for d, causal, hkv, every, fewer in cases:
        for s in fewer if quick else every:
            for mode in ("fwd", "fwd+bwd"):
                torch.manual_seed(0)
                case = dense_case(d, causal, hkv, s, mode, tokens, hq, dtype, device)
                rows += run_case(case, {name: (lambda f: lambda q, k, v: f(q, k, v, causal))(fn)
                                        for name, fn in found.items()}, device, quick)
                del case
    if gpu_like:  # packed documents of mixed length, GQA: evo only (SDPA has no varlen form)
        torch.manual_seed(0)
        case, evo = varlen_case(SMOKE_VARLEN if smoke else VARLEN, hq, 32 if smoke else 128, dtype, device)
        rows += run_case(case, evo, device, quick)
    return rows
