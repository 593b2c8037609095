"""Attention benchmark on a GPU: evo's Triton FlashAttention against PyTorch's SDPA with the flash
backend forced (PyTorch's FlashAttention-2) and with its default backend choice, in the same run.

FLOPs: 4 * batch * heads_q * seqlen_q * seqlen_k * headdim for the forward (halved when causal),
2.5 times that for the backward; varlen sums seqlen_i^2 over the packed sequences.
``evo-tma`` is evo with ``EVO_ATTN_TMA=1`` (the forward's K and V through Hopper's TMA; the backward
is the same kernels). ``smoke=True`` runs the same code at tiny shapes on any device (on a CPU through
Triton's interpreter), so that a test can check the benchmark itself before a GPU run; its numbers
mean nothing.
"""

from __future__ import annotations

import contextlib
import os

import torch

from kernels import bench_ms

# (headdim, seqlen, causal, kv heads) with 16 query heads and 16k tokens per batch
CASES = [(128, 8192, True, 16), (128, 16384, True, 16), (128, 16384, False, 16), (64, 4096, True, 16),
         (128, 8192, True, 4)]
FULL_ONLY = [(64, 1024, False, 16), (128, 2048, True, 16), (64, 16384, True, 16)]
VARLEN = [4096, 2048, 2048, 1024, 1024, 1024, 1024, 512, 512, 512, 512, 512, 512, 512, 512, 512]  # 16k tokens
# smoke: (headdim, seqlen, causal, kv heads) with 4 query heads and 64 tokens per batch
SMOKE_CASES = [(32, 64, True, 4), (40, 32, False, 2)]
SMOKE_VARLEN = [33, 7, 1, 23]


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attn(q, k, v, causal):  # (b, s, h, d) -> (b, s, h, d), GQA through enable_gqa
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if backend == "flash" else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2), is_causal=causal,
                                                                   enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)

    return attn


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    if device != "cuda" and not smoke:
        return []
    from evo.kernels import attention

    def _bench(fn, quick):
        return bench_ms(fn, quick, device)

    def evo_tma(q, k, v, c):  # the opt-in Hopper path: K and V loaded through TMA descriptors in the forward
        previous = os.environ.get("EVO_ATTN_TMA")
        os.environ["EVO_ATTN_TMA"] = "1"
        try:
            return attention.flash_attn_func(q, k, v, causal=c)
        finally:
            if previous is None:
                del os.environ["EVO_ATTN_TMA"]
            else:
                os.environ["EVO_ATTN_TMA"] = previous

    impls = {"evo": lambda q, k, v, c: attention.flash_attn_func(q, k, v, causal=c), "evo-tma": evo_tma,
             "sdpa-flash": _sdpa("flash"), "sdpa-default": _sdpa("default")}
    if smoke:
        cases, tokens, hq, lens = SMOKE_CASES, 64, 4, SMOKE_VARLEN
    else:
        cases, tokens, hq, lens = CASES + ([] if quick else FULL_ONLY), 16384, 16, VARLEN
    rows = []
    for d, s, causal, hkv in cases:
        b = max(1, tokens // s)
        q = torch.randn(b, s, hq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, s, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, s, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        fwd_flops = 4 * b * hq * s * s * d / (2 if causal else 1)
        outs = {}
        for name, fn in impls.items():
            try:
                out = outs[name] = fn(q, k, v, causal)
                fwd = _bench(lambda: fn(q, k, v, causal), quick)
                bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), quick)
            except Exception as exc:  # noqa: BLE001 - e.g. no SDPA flash backend for this shape, a ptxas crash
                rows.append({"impl": name, "headdim": d, "seqlen": s, "causal": causal, "error": str(exc)[:120]})
                continue
            rows.append({"impl": name, "headdim": d, "seqlen": s, "causal": causal, "heads_q": hq, "heads_kv": hkv,
                         "fwd_ms": fwd, "bwd_ms": bwd, "fwd_TFLOP_s": fwd_flops / fwd / 1e9,
                         "bwd_TFLOP_s": 2.5 * fwd_flops / bwd / 1e9,
                         "fwd_bwd_TFLOP_s": 3.5 * fwd_flops / (fwd + bwd) / 1e9})
        for name in ("evo", "evo-tma"):  # a sanity check of the tuned kernels' output at this shape
            if name in outs and "sdpa-default" in outs:
                row = next(r for r in rows[::-1] if r["impl"] == name)
                row["max_abs_diff_vs_sdpa"] = (outs[name].float() - outs["sdpa-default"].float()).abs().max().item()
    # a packed varlen case: documents of mixed length, GQA (heads_q / 4 kv heads)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    total, d = int(cu[-1]), 32 if smoke else 128
    q = torch.randn(total, hq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, hq // 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, hq // 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = attention.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    fwd = _bench(lambda: attention.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True), quick)
    bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True), quick)
    flops = 4 * hq * sum(x * x for x in lens) * d / 2
    rows.append({"impl": "evo", "case": f"varlen {len(lens)} docs, {total} tokens, GQA {hq}/{hq // 4}", "headdim": d,
                 "causal": True, "fwd_ms": fwd, "bwd_ms": bwd, "fwd_TFLOP_s": flops / fwd / 1e9,
                 "bwd_TFLOP_s": 2.5 * flops / bwd / 1e9})
    return rows
