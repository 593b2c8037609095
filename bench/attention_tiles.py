"""Every forward tile of evo's attention timed on the GPU, beside what bench/kernel_report.py says of it.

The kernel report ranks the autotune candidates by the compiler's output (SASS instructions per attention score in
the main loop, spills, shared memory) without a GPU; this benchmark checks that ranking against the clock. At the
report's shape (batch 4 x 4096 tokens, 32 heads, head_dim 128, bf16), causal and not, through TMA and through
per-thread copies (``--quick``: non-causal through TMA, the goal's case on Hopper's default path), each candidate
of ``attention.gpu_configs(_attn_fwd, 128)`` is pinned as the only tile and the forward timed (``bench.common``'s
timer, after a correctness check against the fp32 reference on the first sequence). Rows: ``config``, ``tma``,
``causal``, ``ms``, ``TFLOP_s`` and, where the kernel report for this Triton version has the same launch, its
``instructions_per_score`` and ``spill_bytes``. On a CPU there is nothing to time: one row says so (``smoke=True``
runs one tiny tile through Triton's interpreter instead, to check the code runs).
"""

from __future__ import annotations

import contextlib
import json
import os
from unittest import mock

import torch

from bench.common import Case, run_case

BATCH, SEQLEN, HEADS, HEAD_DIM = 4, 4096, 32, 128


@contextlib.contextmanager
def pinned_forward_tile(config, tma: bool):
    """The forward runs with ``config`` as its only tile (EVO_AUTOTUNE=0 takes the first candidate), through TMA
    or not."""
    from evo.kernels import attention

    listed = attention.gpu_configs

    def only(kernel, block_d, decode=False):
        return [config] if kernel is attention._attn_fwd and not decode else listed(kernel, block_d, decode)

    with mock.patch.object(attention, "gpu_configs", only), \
            mock.patch.dict(os.environ, {"EVO_AUTOTUNE": "0", "EVO_ATTN_TMA": "1" if tma else "0"}):
        yield


def _report_rows() -> dict:
    """The kernel report's forward rows for the running Triton (committed under bench/results/kernel-report/)."""
    from bench.kernel_report import default_folder

    try:
        rows = json.loads((default_folder() / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return {(r["causal"], r.get("path") == "tma", json.dumps(r["config"], sort_keys=True)): r for r in rows
            if r.get("kernel") == "attention_fwd" and r.get("mask") in ("causal", "full") and r.get("tuned")}


def run(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    from evo.kernels import attention
    from evo.kernels import reference as ref

    if device != "cuda" and not smoke:
        return [{"case": "attention forward tiles", "skipped": "needs a GPU (the interpreter runs one tile size)"}]
    batch, seqlen, heads, d = (1, 48, 2, 32) if smoke else (BATCH, SEQLEN, HEADS, HEAD_DIM)
    configs = attention.gpu_configs(attention._attn_fwd, d)[:1 if smoke else None]
    known = _report_rows()
    rows = []
    for causal in (False,) if quick or smoke else (False, True):  # --quick: the non-causal goal's case
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, d, device=device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4.0 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)
        for tma in (False,) if smoke else (True,) if quick else (True, False):  # --quick: the default path
            for config in configs:
                cfg = {"BLOCK_M": config.kwargs["BLOCK_M"], "BLOCK_N": config.kwargs["BLOCK_N"],
                       "num_warps": config.num_warps, "num_stages": config.num_stages}
                case = Case(op=f"attention fwd d{d} {'causal' if causal else 'full'} tile", mode="fwd",
                            shape=f"{batch}x{seqlen}x{heads}x{d}", size=seqlen, size_name="seqlen",
                            dtype=torch.bfloat16, inputs=[q, k, v], grad_outs=[], flops=flops,
                            reference=lambda q, k, v, c=causal: ref.attention(q[0], k[0], v[0], causal=c)[0][None],
                            ref_inputs=[q[:1], k[:1], v[:1]], view=lambda outs: [outs[0][:1]])
                with pinned_forward_tile(config, tma):
                    found = run_case(case, {"evo": lambda q, k, v, c=causal: attention.flash_attn_func(
                        q, k, v, causal=c)}, device, quick)
                report = known.get((causal, tma, json.dumps(cfg, sort_keys=True)), {})
                for row in found:
                    row.update(causal=causal, tma=tma, config=" ".join(f"{k}={v}" for k, v in cfg.items()),
                               **{key: report[key] for key in ("instructions_per_score", "spill_bytes")
                                  if key in report})
                rows += found
    return rows
