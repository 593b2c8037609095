"""Compile evo's Triton kernels for an NVIDIA GPU without one: ``python tests/kernels/gpu_compile.py [--full]``.

Triton's front end, its GPU passes and the ptxas it ships build each kernel specialization down to a
cubin for sm_90 (H100, H200); the cubin's shared memory must fit in one block (227 KiB). This catches
what Triton's interpreter lets through (``tl.dot`` tiles under 16, type errors in branches, shared
memory overflow) before a GPU is at hand. Run in a fresh process: under TRITON_INTERPRET=1 the kernels
are not compilable objects. Prints one JSON line per specialization, after ``PREFIX``.

Default: every kernel in its main specializations, attention with the tile EVO_AUTOTUNE=0 uses (the forward
with and without TMA loads, and in flash_attn_with_kvcache's KV_CACHE mode).
``--full`` adds every attention autotune candidate, the other mask kinds and fp32.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

ARCH = 90
PREFIX = "gpu-compile: "
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90


def _types(fn, dtype: str, special: dict) -> dict:
    """Triton signature types: capitalized arguments point to ``dtype``, others are i32; ``special`` overrides
    (the scalar sizes named M, N, V among them)."""
    types = {n: ("*" + dtype if n[0].isupper() else "i32") for n in fn.arg_names}
    types.update(special)
    return types


def specs(full: bool) -> list[tuple]:
    """(module, kernel, pointer dtype, special types, constexprs, num_warps, num_stages) to compile."""
    from evo.kernels import attention

    out = []
    for block in (4096, 65536):  # rmsnorm: hidden 4096 and the largest supported row
        warps = 32 if block >= 32768 else 8
        out.append(("rmsnorm", "_rms_norm_fwd", "bf16", {"RSTD": "*fp32", "eps": "fp32", "N": "i32"},
                    {"HAS_RESIDUAL": True, "BLOCK_N": block}, warps, 1))
        out.append(("rmsnorm", "_rms_norm_bwd", "bf16",
                    {"RSTD": "*fp32", "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32"},
                    {"HAS_DS": False, "STORE_DR": False, "BLOCK_N": block}, warps, 1))
    # fused add with an fp32 residual stream (bf16 x): the sum and its gradient in fp32
    out.append(("rmsnorm", "_rms_norm_fwd", "bf16", {"R": "*fp32", "S": "*fp32", "RSTD": "*fp32", "eps": "fp32",
                                                     "N": "i32"}, {"HAS_RESIDUAL": True, "BLOCK_N": 4096}, 8, 1))
    out.append(("rmsnorm", "_rms_norm_bwd", "bf16",
                {"X": "*fp32", "DS": "*fp32", "DR": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "M": "i32",
                 "N": "i32"}, {"HAS_DS": True, "STORE_DR": True, "BLOCK_N": 4096}, 8, 1))
    out.append(("activation", "_swiglu_fwd", "bf16", {}, {"BLOCK": 1024}, 4, 1))
    out.append(("activation", "_swiglu_bwd", "bf16", {"n": "i64"}, {"BLOCK": 1024}, 4, 1))
    for varlen, offsets, interleaved in ((False, False, False), (True, True, True)):
        out.append(("rotary", "_rotary_kernel", "bf16",
                    {"COS": "*fp32", "SIN": "*fp32", "CU_SEQLENS": "*i32", "OFFSETS": "*i32"},
                    {"IS_VARLEN": varlen, "OFFSET_TENSOR": offsets, "INTERLEAVED": interleaved, "CONJUGATE": varlen,
                     "BLOCK_M": 16, "BLOCK_K": 64}, 4, 1))
    out.append(("loss", "_ce_stats", "bf16", {"LABELS": "*i64", "STATS": "*fp32", "V": "i32", "logit_scale": "fp32"},
                {"BLOCK_V": 2048}, 4, 1))
    ce_grad_types = {"LABELS": "*i64", "LSE": "*fp32", "SCALE": "*fp32", "inv_vocab": "fp32", "smoothing": "fp32",
                     "z_loss": "fp32", "logit_scale": "fp32", "V": "i32"}
    out.append(("loss", "_ce_grad", "bf16", ce_grad_types, {"BLOCK_V": 2048}, 4, 1))

    attn_types = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "scale2": "fp32", "softcap": "fp32"}
    masks = {"causal": dict(CAUSAL=True, LOCAL=False, SOFTCAP=False),
             "full": dict(CAUSAL=False, LOCAL=False, SOFTCAP=False),
             "window+softcap": dict(CAUSAL=True, LOCAL=True, SOFTCAP=True)}
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        for block_d in (64, 128, 256):
            untuned = attention.untuned_config(block_d)
            cases = [(untuned, "bf16", "window+softcap")]
            if full:
                cases += [(c, "bf16", "causal") for c in attention._gpu_configs(block_d)
                          if c.all_kwargs() != untuned.all_kwargs()]
                cases += [(untuned, "bf16", "causal"), (untuned, "bf16", "full")]
                if block_d == 64:  # the GPU tests run fp32 at head dims up to 40
                    cases += [(untuned, "fp32", "causal")]
            for cfg, dtype, mask in cases:
                fp32 = dtype == "fp32"
                constexprs = dict(masks[mask], DOT_FP32=fp32, PRECISION="ieee" if fp32 else "tf32", BLOCK_D=block_d,
                                  **cfg.kwargs)
                if name == "_attn_fwd":  # the forward also with Hopper's TMA loads (EVO_ATTN_TMA=1)
                    out.append(("attention", name, dtype, attn_types, {**constexprs, "TMA": True, "KV_CACHE": False},
                                cfg.num_warps, cfg.num_stages))
                    constexprs.update(TMA=False, KV_CACHE=False)
                out.append(("attention", name, dtype, attn_types, constexprs, cfg.num_warps, cfg.num_stages))
    # flash_attn_with_kvcache's forward: CU_K holds int64 (k offset, v offset, key count) per sequence
    for block_d in (64, 128, 256):
        untuned = attention.untuned_config(block_d)
        out.append(("attention", "_attn_fwd", "bf16", {**attn_types, "CU_K": "*i64"},
                    dict(masks["window+softcap"], DOT_FP32=False, PRECISION="tf32", BLOCK_D=block_d, TMA=False,
                         KV_CACHE=True, **untuned.kwargs), untuned.num_warps, untuned.num_stages))
    return out


def compile_one(spec: tuple) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, dtype, special, constexprs, warps, stages = spec
    fn = getattr(importlib.import_module(f"evo.kernels.{module}"), name)
    types = _types(fn, dtype, special)
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
    row = {"kernel": name, "dtype": dtype, "constexprs": constexprs, "num_warps": warps, "num_stages": stages}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", ARCH, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:  # noqa: BLE001 - reported, the caller fails the check
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    shared = compiled.metadata.shared
    return {**row, "ok": shared <= SMEM_LIMIT, "shared": shared}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    # run as a script, Python put tests/kernels/ first on the path: the repository root replaces it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    todo = specs("--full" in sys.argv)
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for row in pool.map(compile_one, todo):
            print(PREFIX + json.dumps(row), flush=True)  # prefixed: Triton prints ptxas failures to stdout too
    return 0


if __name__ == "__main__":
    sys.exit(main())
