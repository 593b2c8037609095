"""What the op benchmarks (bench/kernels.py, bench/attention.py) share: one row schema, the correctness
check made before any time is reported, timing with median and spread, peak memory, and the device's own
peaks measured in the same run.

Every row has ``op, provider, shape, dtype, mode`` ("fwd", "fwd+bwd"), ``size`` (the plot's x value) and
``size_name``, then either ``error`` (the provider raised, or its result was wrong: no time is reported)
or ``ms`` (median), ``ms_p20``, ``ms_p80`` (the spread), ``repeats``, ``max_rel_err`` (against an fp32
reference), ``GB_s`` and/or ``TFLOP_s`` (from the op's byte and FLOP formulas, one per op in its module)
and ``peak_MiB`` (GPU: the most memory allocated during one call above what was allocated before it;
None on a CPU, where torch keeps no such count).

Timing: on a GPU ``triton.testing.do_bench`` per provider (it warms up, clears the L2 cache between calls
and times with CUDA events), all of its samples kept; on a CPU every provider is warmed up, then the
providers take turns, one call each per round, so that the machine's drift falls on all of them alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

VENDOR = Path(__file__).resolve().parent / "vendor"  # bench/fetch_liger.sh unpacks Liger-Kernel here (git-ignored)

# the largest relative error allowed: max |got - want| / max |want| over each output and gradient, against the
# reference computed in fp32 on the same inputs; a wrong kernel is off by O(1), a bf16 rounding by < 1e-2
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

# vendors' peaks (dense, no sparsity): HBM bandwidth in GB/s; the 16-bit FLOP/s are evo.monitor.PEAK_TFLOPS
VENDOR_GB_S = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000,
               "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555}


def vendor_gb_s(gpu_name: str | None) -> float | None:
    """The vendor's memory bandwidth of the GPU named (torch.cuda.get_device_name()), None if not known."""
    for key, value in VENDOR_GB_S.items():
        if gpu_name and key in gpu_name:
            return float(value)
    return None


def liger():
    """Liger-Kernel's functional module, or the reason it does not import (a string)."""
    if VENDOR.is_dir() and str(VENDOR) not in sys.path:
        sys.path.append(str(VENDOR))
    try:
        from liger_kernel.transformers import functional
    except Exception as exc:  # noqa: BLE001 - not installed, or built for another Triton: the rows say which
        return f"liger-kernel does not import: {type(exc).__name__}: {str(exc)[:150]}"
    return functional


@dataclass
class Case:
    """One op at one size: the inputs every provider gets, and what the reference is compared on.

    ``reference`` runs on fp32 copies of ``ref_inputs`` (default: ``inputs``); for "fwd+bwd" the outputs
    and the gradients of the inputs that require them are compared, ``view`` (default: all of them) picking
    from a provider's the parts the reference computed."""

    op: str
    mode: str
    shape: str
    size: int
    size_name: str
    dtype: torch.dtype
    inputs: list
    reference: Callable
    grad_outs: list = field(default_factory=list)
    nbytes: int | None = None
    flops: float | None = None
    ref_inputs: list | None = None
    ref_grad_outs: list | None = None
    view: Callable | None = None


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _diff_inputs(inputs) -> list:
    return [t for t in inputs if torch.is_tensor(t) and t.requires_grad]


def _run(fn, inputs, grad_outs, mode) -> list[torch.Tensor]:
    """The provider's outputs (and, for fwd+bwd, its gradients), detached."""
    if mode == "fwd":
        with torch.no_grad():
            return [o.detach() for o in _as_tuple(fn(*inputs))]
    outs = _as_tuple(fn(*inputs))
    grads = torch.autograd.grad(outs, _diff_inputs(inputs), grad_outs or None)
    return [o.detach() for o in outs] + list(grads)


def _timed_call(fn, inputs, grad_outs, mode) -> Callable[[], None]:
    """What is timed: the forward (no autograd graph kept), or forward and backward."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*inputs)
    else:
        diff = _diff_inputs(inputs)

        def call():
            torch.autograd.grad(_as_tuple(fn(*inputs)), diff, grad_outs or None)
    return call


def rel_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """max over the pairs of max |got - want| / max |want| (in fp32); inf where shapes differ or a value is
    not finite."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        g, w = g.float(), w.float()
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst


def measure(calls: dict[str, Callable[[], None]], device: str, quick: bool,
            before: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Milliseconds per call, every sample, for each provider (see the module's docstring for how); ``before``
    runs before each provider's turn on a GPU, and once before all on a CPU."""
    if device == "cuda":
        import triton.testing

        samples = {}
        for name, call in calls.items():
            before()
            options = dict(warmup=10 if quick else 25, rep=40 if quick else 100)
            try:
                samples[name] = list(triton.testing.do_bench(call, return_mode="all", **options))
            except (TypeError, ValueError, AssertionError):  # a Triton without return_mode="all": 3 quantiles
                samples[name] = list(triton.testing.do_bench(call, quantiles=[0.2, 0.5, 0.8], **options))
        return samples
    before()
    names = list(calls)
    for name in names:
        calls[name]()
    samples = {name: [] for name in names}
    for r in range(5 if quick else 11):
        for name in names[r % len(names):] + names[:r % len(names)]:  # who goes first rotates
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def peak_mib(call: Callable[[], None], device: str) -> float | None:
    """GPU memory allocated at the peak of one call above what was allocated before it (None on a CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_case(case: Case, providers: dict[str, Callable | str], device: str, quick: bool) -> list[dict]:
    """Rows for ``case``, one per provider (a provider given as a string is one that could not be had: its
    row carries that string as the error). Each provider's result is checked against the fp32 reference
    first; a wrong or failing one gets an error row and is not timed."""
    head = {"op": case.op, "mode": case.mode, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
            "size": case.size, "size_name": case.size_name}
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
                  else t for t in (case.ref_inputs or case.inputs)]
    ref_grads = [g.float() for g in (case.ref_grad_outs or case.grad_outs)]
    want = _run(case.reference, ref_inputs, ref_grads, case.mode)
    del ref_inputs, ref_grads
    tolerance = TOLERANCE[case.dtype]
    tensors = [t for t in case.inputs + case.grad_outs if torch.is_tensor(t)]
    saved = [t.detach().clone() for t in tensors]

    def restore():  # some providers write into their inputs (Liger's): each starts from the same values
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)

    rows, calls, errors = {}, {}, {}
    for name, fn in providers.items():
        if isinstance(fn, str):
            rows[name] = {**head, "provider": name, "error": fn}
            continue
        restore()
        try:
            got = _run(fn, case.inputs, case.grad_outs, case.mode)
            err = rel_error(case.view(got) if case.view else got, want)
            del got
        except Exception as exc:  # noqa: BLE001 - no backend for this shape, a compiler crash, out of memory
            rows[name] = {**head, "provider": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        if err > tolerance:
            rows[name] = {**head, "provider": name, "error": f"wrong result: max relative error {err:.3g} > {tolerance}",
                          "max_rel_err": err}
            continue
        calls[name], errors[name] = _timed_call(fn, case.inputs, case.grad_outs, case.mode), err
        if device == "cuda":
            torch.cuda.empty_cache()
    del want
    for name, samples in measure(calls, device, quick, restore).items():
        ms = statistics.median(samples)
        row = {**head, "provider": name, "ms": ms, "ms_p20": quantile(samples, 0.2), "ms_p80": quantile(samples, 0.8),
               "repeats": len(samples), "max_rel_err": errors[name]}
        if case.nbytes:
            row["GB_s"] = case.nbytes / ms / 1e6
        if case.flops:
            row["TFLOP_s"] = case.flops / ms / 1e9
        restore()
        row["peak_MiB"] = peak_mib(calls[name], device)
        rows[name] = row
    return [rows[name] for name in providers]


def device_peaks(device: str, quick: bool, smoke: bool = False) -> list[dict]:
    """The device's own peaks, measured now: a device-to-device copy (GB/s, bytes read + written) and a
    square bf16 matmul (TFLOP/s; fp32 on a CPU), with the vendor's numbers where the GPU is known."""
    from evo.monitor import peak_tflops

    nbytes = (1 << 20) if smoke else (1 << 30) if device == "cuda" else (1 << 27)
    n = 256 if smoke else 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    times = measure({"copy": lambda: b.copy_(a), "matmul": lambda: x @ y}, device, quick)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    rows = []
    for op, shape, work, unit in (("copy", f"{nbytes} bytes", 2 * nbytes, "GB_s"),
                                  ("matmul", f"{n}x{n}x{n}", 2 * n ** 3, "TFLOP_s")):
        ms = statistics.median(times[op])
        value = work / ms / (1e6 if unit == "GB_s" else 1e9)
        vendor = vendor_gb_s(gpu) if unit == "GB_s" else peak_tflops(torch.device(device), "torch.bfloat16")
        rows.append({"op": op, "provider": "torch", "shape": shape, "dtype": "uint8" if op == "copy" else str(dtype)[6:],
                     "mode": "peak", "ms": ms, "ms_p20": quantile(times[op], 0.2), "ms_p80": quantile(times[op], 0.8),
                     "repeats": len(times[op]), unit: value, f"vendor_{unit}": vendor})
    return rows


def share(rows: list[dict], peaks: list[dict]) -> None:
    """Adds each row's share of the measured peaks (``copy_share``, ``matmul_share``) and of the vendor's."""
    copy = next(r for r in peaks if r["op"] == "copy")
    matmul = next(r for r in peaks if r["op"] == "matmul")
    for row in rows:
        if row.get("mode") == "peak":
            continue
        if "GB_s" in row:
            row["copy_share"] = row["GB_s"] / copy["GB_s"]
            if copy.get("vendor_GB_s"):
                row["vendor_bw_share"] = row["GB_s"] / copy["vendor_GB_s"]
        if "TFLOP_s" in row:
            row["matmul_share"] = row["TFLOP_s"] / matmul["TFLOP_s"]
            if matmul.get("vendor_TFLOP_s"):
                row["vendor_flops_share"] = row["TFLOP_s"] / matmul["vendor_TFLOP_s"]
