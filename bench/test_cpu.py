"""CPU-runnable kernel benchmarks (pytest-benchmark): each op's reference under torch eager and under
torch.compile, at shapes a CPU runs in milliseconds. The Triton kernels themselves only run on a CPU
through Triton's interpreter, which says nothing about speed: their numbers come from bench/kernels.py
and bench/attention.py on a GPU.

    python -m pytest bench/test_cpu.py --benchmark-only [--benchmark-json FILE]
"""

import functools

import pytest
import torch

from evo import kernels
from evo.kernels import reference as ref

torch.manual_seed(0)


@functools.lru_cache(maxsize=None)
def compiled(name):
    return torch.compile(getattr(ref, name), dynamic=False)


IMPLS = {"eager": lambda name: getattr(ref, name), "compile": compiled}


def _cases():
    x = torch.randn(2048, 4096)
    w = torch.ones(4096)
    q = torch.randn(2, 1024, 8, 64)
    ang = torch.outer(torch.arange(1024.0), torch.rand(32))
    logits = torch.randn(1024, 32000)
    labels = torch.randint(0, 32000, (1024,))
    h, wv = torch.randn(1024, 512), torch.randn(32000, 512) / 23
    g, u = torch.randn(2048, 4096), torch.randn(2048, 4096)
    return {  # name -> (op, args, bytes moved by one call, for GB/s)
        "rms_norm 2048x4096": ("rms_norm", (x, w), 2 * x.numel() * 4),
        "apply_rotary_emb 2x1024x8x64": ("apply_rotary_emb", (q, ang.cos(), ang.sin()), 2 * q.numel() * 4),
        "swiglu 2048x4096": ("swiglu", (g, u), 3 * g.numel() * 4),
        "cross_entropy 1024x32000": ("cross_entropy", (logits, labels), logits.numel() * 4),
        "fused_linear_cross_entropy 1024x512x32000": ("fused_linear_cross_entropy", (h, wv, labels), None),
    }


CASES = _cases()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_reference_op(benchmark, case, impl):
    op, args, nbytes = CASES[case]
    fn = IMPLS[impl](op)
    fn(*args)  # compile outside the timing
    benchmark.group = case
    result = benchmark(fn, *args)
    assert torch.is_tensor(result)
    if nbytes:
        benchmark.extra_info["GB_s"] = nbytes / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("impl", ["evo-cpu-path", "evo-reference-math", "sdpa"])
def test_attention_cpu(benchmark, impl):
    q, k, v = torch.randn(1024, 8, 64), torch.randn(1024, 2, 64), torch.randn(1024, 2, 64)
    cu = torch.tensor([0, 512, 1024], dtype=torch.int32)
    if impl == "evo-cpu-path":  # what the model runs on a CPU: per sequence, SDPA where its mask fits
        fn = lambda: kernels.flash_attn_varlen_func(q, k, v, cu, cu, 512, 512, causal=True)  # noqa: E731
    elif impl == "evo-reference-math":  # the explicit formulation (also returns lse)
        fn = lambda: ref.flash_attn_varlen_func(q, k, v, cu, cu, 512, 512, causal=True, return_attn_probs=True)[0]  # noqa: E731
    else:
        qb, kb, vb = (t.view(2, 512, -1, 64).transpose(1, 2) for t in (q, k, v))
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)  # noqa: E731
    benchmark.group = "attention varlen 2x512, 8/2 heads, d64"
    out = benchmark(fn)
    flops = 4 * 2 * 8 * 512 * 512 * 64 / 2
    benchmark.extra_info["GFLOP_s"] = flops / benchmark.stats.stats.mean / 1e9
    assert out.shape[-1] == 64
