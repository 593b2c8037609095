"""Attention benchmark on a GPU: evo's Triton FlashAttention against PyTorch's SDPA with the flash
backend forced (PyTorch's FlashAttention-2) and with its default backend choice, in the same run.

FLOPs: 4 * batch * heads_q * seqlen_q * seqlen_k * headdim for the forward (halved when causal),
2.5 times that for the backward; varlen sums seqlen_i^2 over the packed sequences.
"""

from __future__ import annotations

import torch


def _bench(fn, quick):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100)


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attn(q, k, v, causal):  # (b, s, h, d) -> (b, s, h, d), GQA through enable_gqa
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if backend == "flash" else list(SDPBackend)):
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2), is_causal=causal,
                                                                   enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)

    return attn


def run(quick: bool, device: str) -> list[dict]:
    if device != "cuda":
        return []
    from evo.kernels import attention

    impls = {"evo": lambda q, k, v, c: attention.flash_attn_func(q, k, v, causal=c),
             "sdpa-flash": _sdpa("flash"), "sdpa-default": _sdpa("default")}
    cases = [(128, 8192, True, 16), (128, 16384, True, 16), (128, 16384, False, 16), (64, 4096, True, 16),
             (128, 8192, True, 4)]  # (headdim, seqlen, causal, kv heads); 16 query heads, 16k tokens per batch
    if not quick:
        cases += [(64, 1024, False, 16), (128, 2048, True, 16), (64, 16384, True, 16)]
    rows = []
    for d, s, causal, hkv in cases:
        b, hq = max(1, 16384 // s), 16
        q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        fwd_flops = 4 * b * hq * s * s * d / (2 if causal else 1)
        for name, fn in impls.items():
            try:
                out = fn(q, k, v, causal)
                fwd = _bench(lambda: fn(q, k, v, causal), quick)
                bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), quick)
            except RuntimeError as exc:  # e.g. no flash backend for this shape in this PyTorch
                rows.append({"impl": name, "headdim": d, "seqlen": s, "causal": causal, "error": str(exc)[:120]})
                continue
            rows.append({"impl": name, "headdim": d, "seqlen": s, "causal": causal, "heads_q": hq, "heads_kv": hkv,
                         "fwd_ms": fwd, "bwd_ms": bwd, "fwd_TFLOP_s": fwd_flops / fwd / 1e9,
                         "bwd_TFLOP_s": 2.5 * fwd_flops / bwd / 1e9,
                         "fwd_bwd_TFLOP_s": 3.5 * fwd_flops / (fwd + bwd) / 1e9})
    # a packed varlen case: 16 documents of mixed length in 16k tokens
    lens = [4096, 2048, 2048, 1024, 1024, 1024, 1024, 512, 512, 512, 512, 512, 512, 512, 512, 512]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    total, d = int(cu[-1]), 128
    q = torch.randn(total, 16, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = attention.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    fwd = _bench(lambda: attention.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True), quick)
    bwd = _bench(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True), quick)
    flops = 4 * 16 * sum(x * x for x in lens) * d / 2
    rows.append({"impl": "evo", "case": "varlen 16 docs, 16k tokens, GQA 16/4", "headdim": d, "causal": True,
                 "fwd_ms": fwd, "bwd_ms": bwd, "fwd_TFLOP_s": flops / fwd / 1e9, "bwd_TFLOP_s": 2.5 * flops / bwd / 1e9})
    return rows
