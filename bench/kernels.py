"""Kernel benchmarks on a GPU: evo's Triton kernels against torch eager and torch.compile of the
reference, at the shapes the issue's anchors publish. Bandwidth-bound ops report GB/s and the share
of the device's own copy bandwidth, measured in the same run (a large device-to-device copy).

Each row: op, impl, shape, ms, and GB/s + share of copy bandwidth, or TFLOP/s + working memory.
On a CPU there is nothing to time here (the kernels run in Triton's interpreter): see flce_memory.
"""

from __future__ import annotations

import torch

from evo.kernels import reference as ref


def _bench(fn, quick: bool) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)


def copy_bandwidth(quick: bool) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a), quick)
    return 2 * a.numel() / ms / 1e6


def _impls(triton_fn, ref_fn):
    return [("evo", triton_fn), ("torch", ref_fn), ("torch.compile", torch.compile(ref_fn, dynamic=False))]


def _fwd_bwd(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return run


def run(quick: bool, device: str) -> list[dict]:
    if device != "cuda":
        return []
    from evo.kernels import activation, loss, rmsnorm, rotary

    bf16, dev = torch.bfloat16, "cuda"
    copy = copy_bandwidth(quick)
    rows = [{"op": "copy", "impl": "torch", "shape": "1 GiB", "GB_s": copy}]

    def add(op, impl, shape, ms, nbytes=None, flops=None, extra=None):
        row = {"op": op, "impl": impl, "shape": shape, "ms": ms}
        if nbytes:
            row.update(GB_s=nbytes / ms / 1e6, copy_share=nbytes / ms / 1e6 / copy)
        if flops:
            row["TFLOP_s"] = flops / ms / 1e9
        rows.append({**row, **(extra or {})})

    # RMSNorm forward at 4096 x 16384, backward at hidden 4096
    x = torch.randn(4096, 16384, device=dev, dtype=bf16)
    w = torch.ones(16384, device=dev, dtype=bf16)
    for impl, fn in _impls(rmsnorm.rms_norm, ref.rms_norm):
        add("rms_norm fwd", impl, "4096x16384", _bench(lambda: fn(x, w), quick), nbytes=2 * x.numel() * 2)
    x = torch.randn(16384, 4096, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(4096, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn_like(x)
    for impl, fn in _impls(rmsnorm.rms_norm, ref.rms_norm):
        y = fn(x, w)
        add("rms_norm bwd", impl, "16384x4096",
            _bench(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True), quick), nbytes=3 * x.numel() * 2)

    # rotary, (batch 4, seqlen 4096, heads 32, headdim 128), forward
    q = torch.randn(4, 4096, 32, 128, device=dev, dtype=bf16)
    ang = torch.outer(torch.arange(4096, device=dev, dtype=torch.float32), torch.rand(64, device=dev))
    cos, sin = ang.cos(), ang.sin()
    for impl, fn in _impls(rotary.apply_rotary_emb, ref.apply_rotary_emb):
        add("rotary fwd", impl, "4x4096x32x128", _bench(lambda: fn(q, cos, sin), quick), nbytes=2 * q.numel() * 2)

    # SwiGLU forward + backward, (16384, 11008)
    g = torch.randn(16384, 11008, device=dev, dtype=bf16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    dout = torch.randn_like(g)
    for impl, fn in _impls(activation.swiglu, ref.swiglu):
        add("swiglu fwd+bwd", impl, "16384x11008", _bench(_fwd_bwd(fn, [g, u], dout), quick), nbytes=7 * g.numel() * 2)
    del g, u, dout

    # cross-entropy forward + backward at 8192 x 131072
    logits = torch.randn(8192, 131072, device=dev, dtype=bf16, requires_grad=True)
    labels = torch.randint(0, 131072, (8192,), device=dev)
    for impl, fn in _impls(loss.cross_entropy, ref.cross_entropy):
        add("cross_entropy fwd+bwd", impl, "8192x131072",
            _bench(_fwd_bwd(lambda z: fn(z, labels), [logits], None), quick), nbytes=3 * logits.numel() * 2)
    del logits

    # fused linear cross-entropy at 8192 tokens, hidden 4096, vocab 128256: time and working memory
    T, H, V = 8192, 4096, 128256
    h = torch.randn(T, H, device=dev, dtype=bf16, requires_grad=True)
    wt = (torch.randn(V, H, device=dev, dtype=bf16) / 64).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev)
    for impl, fn in (("evo", lambda: loss.fused_linear_cross_entropy(h, wt, labels)),
                     ("torch (matmul + cross_entropy)", lambda: torch.nn.functional.cross_entropy(h @ wt.T, labels))):
        step = _fwd_bwd(fn, [h, wt], None)
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()  # inputs, weight and the gradient buffers now exist
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        working = (torch.cuda.max_memory_allocated() - base) / 2**30
        add("fused_linear_cross_entropy fwd+bwd", impl, f"{T}x{H}x{V}", _bench(step, quick), flops=6 * T * H * V,
            extra={"working_GiB": working})
    return rows
