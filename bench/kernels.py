"""Kernel benchmarks on a GPU: evo's Triton kernels against torch eager and torch.compile of the
reference, at the shapes the issue's anchors publish. Bandwidth-bound ops report GB/s and the share
of the device's own copy bandwidth, measured in the same run (a large device-to-device copy).

Each row: op, impl, shape, ms, and GB/s + share of copy bandwidth, or TFLOP/s + working memory.
On a CPU there is nothing to time here (the kernels run in Triton's interpreter): see flce_memory.
``smoke=True`` runs the same code at tiny shapes on any device (on a CPU through the interpreter),
so that a test can check the benchmark itself before a GPU run; its numbers mean nothing.
"""

from __future__ import annotations

import time

import torch

from evo.kernels import reference as ref

# (full size: the anchors' shapes, smoke: tiny)
SHAPES = {
    "rms_fwd": ((4096, 16384), (8, 300)),
    "rms_bwd": ((16384, 4096), (8, 256)),
    "rotary": ((4, 4096, 32, 128), (2, 32, 2, 16)),
    "swiglu": ((16384, 11008), (8, 300)),
    "cross_entropy": ((8192, 131072), (8, 3000)),
    "flce": ((8192, 4096, 128256), (16, 32, 3000)),
    "copy_bytes": (1 << 30, 1 << 20),
}


def bench_ms(fn, quick: bool, device: str) -> float:
    """Milliseconds per call: triton.testing.do_bench on a GPU, a short wall-clock median elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(quick: bool, device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / bench_ms(lambda: b.copy_(a), quick, device) / 1e6


def _impls(triton_fn, ref_fn):
    return [("evo", triton_fn), ("torch", ref_fn), ("torch.compile", torch.compile(ref_fn, dynamic=False))]


def _fwd_bwd(fn, inputs, grad):
    """One forward and backward of fn(*inputs), gradients reset first."""
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return run


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    if device != "cuda" and not smoke:
        return []
    from evo.kernels import activation, loss, rmsnorm, rotary

    pick = 1 if smoke else 0
    shape = {name: sizes[pick] for name, sizes in SHAPES.items()}
    bf16, dev = torch.bfloat16, device
    copy = copy_bandwidth(quick, dev, shape["copy_bytes"])
    rows = [{"op": "copy", "impl": "torch", "shape": f"{shape['copy_bytes']} bytes", "GB_s": copy}]

    def time_ms(fn):
        return bench_ms(fn, quick, dev)

    def add(op, impl, dims, ms, nbytes=None, flops=None, extra=None):
        row = {"op": op, "impl": impl, "shape": "x".join(map(str, dims)), "ms": ms}
        if nbytes:
            row.update(GB_s=nbytes / ms / 1e6, copy_share=nbytes / ms / 1e6 / copy)
        if flops:
            row["TFLOP_s"] = flops / ms / 1e9
        rows.append({**row, **(extra or {})})

    # RMSNorm forward (read x, write y), backward at hidden 4096 (read x, dy; write dx)
    dims = shape["rms_fwd"]
    x = torch.randn(dims, device=dev, dtype=bf16)
    w = torch.ones(dims[1], device=dev, dtype=bf16)
    for impl, fn in _impls(rmsnorm.rms_norm, ref.rms_norm):
        add("rms_norm fwd", impl, dims, time_ms(lambda: fn(x, w)), nbytes=2 * x.numel() * 2)
    dims = shape["rms_bwd"]
    x = torch.randn(dims, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(dims[1], device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn_like(x)
    for impl, fn in _impls(rmsnorm.rms_norm, ref.rms_norm):
        y = fn(x, w)
        add("rms_norm bwd", impl, dims, time_ms(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True)),
            nbytes=3 * x.numel() * 2)

    # rotary forward, (batch, seqlen, heads, headdim), the whole head dim rotated
    dims = shape["rotary"]
    q = torch.randn(dims, device=dev, dtype=bf16)
    ang = torch.outer(torch.arange(dims[1], device=dev, dtype=torch.float32), torch.rand(dims[3] // 2, device=dev))
    cos, sin = ang.cos(), ang.sin()
    for impl, fn in _impls(rotary.apply_rotary_emb, ref.apply_rotary_emb):
        add("rotary fwd", impl, dims, time_ms(lambda: fn(q, cos, sin)), nbytes=2 * q.numel() * 2)

    # SwiGLU forward + backward (reads gate, up twice and dy; writes y, dgate, dup)
    dims = shape["swiglu"]
    g = torch.randn(dims, device=dev, dtype=bf16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    dout = torch.randn_like(g)
    for impl, fn in _impls(activation.swiglu, ref.swiglu):
        add("swiglu fwd+bwd", impl, dims, time_ms(_fwd_bwd(fn, [g, u], dout)), nbytes=7 * g.numel() * 2)
    del g, u, dout

    # cross-entropy forward + backward (read logits twice, write their gradient)
    dims = shape["cross_entropy"]
    logits = torch.randn(dims, device=dev, dtype=bf16, requires_grad=True)
    labels = torch.randint(0, dims[1], (dims[0],), device=dev)
    for impl, fn in _impls(loss.cross_entropy, ref.cross_entropy):
        add("cross_entropy fwd+bwd", impl, dims, time_ms(_fwd_bwd(lambda z: fn(z, labels), [logits], None)),
            nbytes=3 * logits.numel() * 2)
    del logits

    # fused linear cross-entropy: time and working memory (peak minus inputs, weight and gradient buffers)
    T, H, V = dims = shape["flce"]
    h = torch.randn(T, H, device=dev, dtype=bf16, requires_grad=True)
    wt = (torch.randn(V, H, device=dev, dtype=bf16) / H ** 0.5).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev)
    naive = ("torch (matmul + cross_entropy)", lambda a, b: torch.nn.functional.cross_entropy(a @ b.T, labels))
    for impl, fn in (("evo", lambda a, b: loss.fused_linear_cross_entropy(a, b, labels)), naive):
        step = _fwd_bwd(fn, [h, wt], None)
        step()  # the gradient buffers now exist
        extra = {}
        if dev == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            extra["working_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        add("fused_linear_cross_entropy fwd+bwd", impl, dims, time_ms(step), flops=6 * T * H * V, extra=extra)
    return rows
