"""Kernel benchmarks: each op over a sweep of sizes, one row per provider (the row schema and the timing are
bench/common.py's).

Providers: ``evo`` (the op's Triton kernel), ``torch`` (evo's plain-PyTorch reference of the op, eager),
``torch.compile`` (that reference compiled at each shape) and ``liger`` (Liger-Kernel's op, when it imports:
bench/fetch_liger.sh puts it in bench/vendor/). Every provider's result is checked against the reference in
fp32 on the same inputs before it is timed. On a GPU everything runs in bf16. On a CPU there is no Triton to
time (the interpreter says nothing about speed), so a CPU run times the reference eager against compiled, in
fp32, at CPU-sized shapes. ``smoke=True`` runs every provider at tiny shapes on any device (on a CPU through
Triton's interpreter) so that a test checks the harness before a GPU run; its numbers mean nothing.

What each op moves and computes, the formulas of its GB/s and TFLOP/s (elements of e bytes):
- rms_norm fwd: read x, write y: 2 * numel * e. fwd+bwd: add read x and dy, write dx: 5 * numel * e.
- rotary fwd+bwd (q and k): read and write q and k, forward and backward: 4 * (numel q + numel k) * e.
- swiglu fwd+bwd: read gate and up, write y; read gate, up and dy, write dgate and dup: 8 * numel * e.
- cross_entropy fwd+bwd: read the logits (forward), read them and write their gradient (backward):
  3 * tokens * vocab * e.
- fused_linear_cross_entropy fwd+bwd: the matmuls' FLOPs, 2 * T * H * V forward (logits) and 4 * T * H * V
  backward (input and weight gradients), 6 * T * H * V in all; its ``peak_MiB`` is the working memory.
Liger's rotary, SwiGLU and cross-entropy write into their inputs (to save memory); every provider's inputs
are put back before it runs, and timing does not depend on the values.
"""

from __future__ import annotations

import functools

import torch

from bench.common import Case, liger, run_case
from evo.kernels import reference as ref

# the sizes swept, per op: (the shape of each size, the sizes) on a GPU (all, --quick), on a CPU (all,
# --quick) and in smoke mode. The quick GPU sizes hold the goal shapes.
SWEEPS = {
    "rms_norm": {"name": "hidden", "shape": lambda n, rows: (rows, n),
                 "gpu": ([1024, 2048, 4096, 8192, 16384], [16384], 4096),
                 "cpu": ([1024, 2048, 4096], [1024, 4096], 1024), "smoke": ([64, 300], [300], 8)},
    "rotary": {"name": "seqlen", "shape": lambda n, bhd: (bhd[0], n, *bhd[1:]),
               "gpu": ([1024, 2048, 4096, 8192], [4096], (4, 32, 128)),
               "cpu": ([256, 512, 1024], [512], (1, 32, 128)), "smoke": ([16, 32], [32], (1, 8, 16))},
    "swiglu": {"name": "width", "shape": lambda n, rows: (rows, n),
               "gpu": ([2816, 5632, 11008, 14336], [11008], 8192), "cpu": ([1024, 2816, 5632], [2816], 1024),
               "smoke": ([96, 300], [300], 8)},
    "cross_entropy": {"name": "vocab", "shape": lambda n, rows: (rows, n),
                      "gpu": ([32768, 65536, 131072], [131072], 8192), "cpu": ([8192, 32768], [8192], 512),
                      "smoke": ([1000, 3000], [3000], 8)},
    "fused_linear_cross_entropy": {"name": "tokens", "shape": lambda n, hv: (n, *hv),
                                   "gpu": ([2048, 4096, 8192], [8192], (4096, 128256)),
                                   "cpu": ([256, 1024], [256], (512, 32000)), "smoke": ([16, 32], [32], (32, 3000))},
}
# the ops with a GPU goal first: a run cut short by its timeout has measured those
OPS = [("rms_norm", "fwd"), ("cross_entropy", "fwd+bwd"), ("fused_linear_cross_entropy", "fwd+bwd"),
       ("rms_norm", "fwd+bwd"), ("rotary", "fwd+bwd"), ("swiglu", "fwd+bwd")]


def sizes(op: str, device: str, quick: bool, smoke: bool) -> tuple[list, object]:
    """The sizes to run for ``op`` and the rest of its shape (rows, batch, or (hidden, vocab))."""
    every, fewer, rest = SWEEPS[op]["smoke" if smoke else "gpu" if device == "cuda" else "cpu"]
    return (fewer if quick else every), rest


def _rope_pair(apply):
    """rotary on q and k with one function (as a model calls it), from a single-tensor ``apply``."""
    def rope(q, k, cos, sin):
        return apply(q, cos, sin), apply(k, cos, sin)
    return rope


def _liger_adapters(functional) -> dict:
    """Liger's ops with evo's signatures."""
    def rope(q, k, cos, sin):  # Liger takes (batch, heads, seqlen, dim) views and tables of the full head dim
        full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        q2, k2 = functional.liger_rope(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        return q2.transpose(1, 2), k2.transpose(1, 2)

    return {"rms_norm": lambda x, w: functional.liger_rms_norm(x, w, 1e-6, in_place=False),
            "rotary": rope, "swiglu": functional.liger_swiglu,
            "cross_entropy": functional.liger_cross_entropy,
            "fused_linear_cross_entropy": functional.liger_fused_linear_cross_entropy}


@functools.lru_cache(maxsize=None)
def _references() -> dict:
    """Each op's reference with the benchmark's signature (the fp32 check and the torch providers use these)."""
    return {"rms_norm": lambda x, w: ref.rms_norm(x, w, 1e-6), "rotary": _rope_pair(ref.apply_rotary_emb),
            "swiglu": ref.swiglu, "cross_entropy": ref.cross_entropy,
            "fused_linear_cross_entropy": lambda h, w, labels: torch.nn.functional.cross_entropy(h @ w.T, labels)}


def _evo(op: str):
    from evo.kernels import activation, loss, rmsnorm, rotary

    return {"rms_norm": lambda x, w: rmsnorm.rms_norm(x, w, 1e-6), "rotary": _rope_pair(rotary.apply_rotary_emb),
            "swiglu": activation.swiglu, "cross_entropy": loss.cross_entropy,
            "fused_linear_cross_entropy": loss.fused_linear_cross_entropy}[op]


def make_case(op: str, mode: str, n: int, rest, dtype: torch.dtype, device: str) -> Case:
    """The inputs of ``op`` at size ``n``, with its byte or FLOP count."""
    shape = SWEEPS[op]["shape"](n, rest)
    e = torch.finfo(dtype).bits // 8
    bwd = mode == "fwd+bwd"

    def randn(*dims, scale=1.0, grad=bwd):
        return (torch.randn(*dims, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    common = dict(op=op, mode=mode, shape="x".join(map(str, shape)), size=n, size_name=SWEEPS[op]["name"],
                  dtype=dtype, reference=_references()[op])
    if op == "rms_norm":
        x = randn(*shape)
        w = (1 + torch.randn(shape[1], device=device) / 10).to(dtype).requires_grad_(bwd)
        return Case(inputs=[x, w], grad_outs=[randn(*shape, grad=False)] if bwd else [],
                    nbytes=(5 if bwd else 2) * x.numel() * e, **common)
    if op == "rotary":
        b, s, h, d = shape
        q, k = randn(b, s, h, d), randn(b, s, h // 4, d)
        angles = torch.outer(torch.arange(s, device=device, dtype=torch.float32),
                             10000.0 ** (-torch.arange(0, d, 2, device=device) / d))
        return Case(inputs=[q, k, angles.cos(), angles.sin()],
                    grad_outs=[randn(*q.shape, grad=False), randn(*k.shape, grad=False)],
                    nbytes=4 * (q.numel() + k.numel()) * e, **common)
    if op == "swiglu":
        g, u = randn(*shape), randn(*shape)
        return Case(inputs=[g, u], grad_outs=[randn(*shape, grad=False)], nbytes=8 * g.numel() * e, **common)
    if op == "cross_entropy":
        logits = randn(*shape)
        labels = torch.randint(0, shape[1], (shape[0],), device=device)
        return Case(inputs=[logits, labels], nbytes=3 * logits.numel() * e, **common)
    t, h, v = shape
    hidden, weight = randn(t, h), randn(v, h, scale=h ** -0.5)
    labels = torch.randint(0, v, (t,), device=device)
    return Case(inputs=[hidden, weight, labels], flops=6.0 * t * h * v, **common)


def providers(op: str, device: str, smoke: bool) -> dict:
    """name -> function, or the reason it cannot run (a string)."""
    reference = _references()[op]
    found = {}
    if device == "cuda" or smoke:
        found["evo"] = _evo(op)
    found["torch"] = reference
    found["torch.compile"] = torch.compile(reference, dynamic=False)
    if device == "cuda" or smoke:
        functional = liger()
        found["liger"] = functional if isinstance(functional, str) else _liger_adapters(functional)[op]
    return found


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" or smoke else torch.float32
    rows = []
    for op, mode in OPS:
        found = providers(op, device, smoke)
        every, rest = sizes(op, device, quick, smoke)
        for n in every:
            torch.manual_seed(0)
            case = make_case(op, mode, n, rest, dtype, device)
            rows += run_case(case, found, device, quick)
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
        torch._dynamo.reset()  # each op's compiled graphs go with it
    return rows
