"""What the compiler makes of evo's kernels for a GPU, on any machine: ``python bench/kernel_report.py [--arch
sm_90a] [--head-dim 128] [--dtype bf16] [--default-only] [--out DIR]``.

No GPU is needed. Each launch function of evo/kernels (``triton_utils.OPAQUE_OPS``) is called on meta tensors at a
training shape (attention: batch 4 x 4096 tokens, 32 heads; 16k rows of hidden 4096 for the norms; a 128k vocab for
the loss), with Triton's launches recorded instead of run (``recorded_launches``). Each recorded launch, and each
autotune candidate it would try, is then compiled for the arch exactly as Triton's launcher specializes a real call
(its own binder: pointers and integers divisible by 16 marked so, integers equal to 1 made constants), which is what
decides software pipelining and vector widths; compiling without those attributes gives other, slower kernels.

A row names its launch (``kernel``; for attention ``mask``, ``causal``, ``path`` of the forward: "tma" or "copy",
``config``: BLOCK_M, BLOCK_N, num_warps, num_stages, ``tuned``: an autotune candidate, ``default``: the one
non-causal training forward with EVO_AUTOTUNE=0's tile on the sm_90 default path). From the compiler's output, per
kernel and candidate:
- ``registers``, ``spill_bytes`` (spill stores) and ``wgmma_serialized`` (warnings C7511 / C7512) from ptxas -v;
- ``shared_bytes`` from Triton's metadata;
- ``wgmma`` / ``mma_sync`` / ``tma``: whether the SASS holds HGMMA (Hopper's warpgroup MMA), HMMA (Ampere's
  mma.sync) and UTMALDG / UTMASTG (TMA loads and stores), from nvdisasm;
- ``loop_instructions``: the SASS instructions of the shortest loop (a backward branch) that contains a tensor-core
  MMA (HGMMA, else HMMA); an mbarrier's retry loop holds none, so it is never the one counted. 0: no such loop;
- ``instructions_per_score`` = loop_instructions x num_warps / (BLOCK_M x BLOCK_N): instructions issued per attention
  score (one element of a BLOCK_M x BLOCK_N score tile) in the main loop; lower is better.

Writes ``DIR/report.json`` (a list of rows), ``DIR/failed.json`` (candidates that did not compile, with the error),
``DIR/report.md`` (the table), ``DIR/machine.json`` (Triton's and ptxas's versions, the commit) and each cubin
under ``DIR/cubins/``. In bench/run.py it is the ``kernel_report`` benchmark (its rows; the files under
bench/results/kernel-report/triton-<version>/, cubins not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

if __name__ == "__main__":  # Python put bench/ first on the path: the repository root replaces it
    sys.path[0] = str(Path(__file__).resolve().parents[1])

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
BATCH, SEQLEN, HEADS = 4, 4096, 32  # the attention shape: batch x tokens, query heads (= kv heads)
MOE_SHAPE = (16384, 8, 128, 2048, 768)  # tokens, top_k, experts, hidden, expert intermediate (Qwen3-30B-A3B)


# ---- recording launches --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recorded_launches():
    """Within it, a Triton launch is recorded and not run: yields the list of (jit function, args, kwargs, autotune
    candidates or None) that the launch functions called fill."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        launches.append((self, args, kwargs, None))

    def tuned_run(self, *args, **kwargs):
        launches.append((self.fn, args, kwargs, list(self.configs)))

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuned_run):
        yield launches


def specialize(fn, args, kwargs, arch: int) -> dict:
    """What Triton's launcher would compile for this call on a GPU of ``arch`` (90 for sm_90a): a picklable job."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return {"module": fn.fn.__module__, "name": fn.fn.__name__, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": dict(options.__dict__), "arch": arch}


# ---- the launches of each kernel -----------------------------------------------------------------------------------

def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def attention_launches(head_dim: int, dtype, default_only: bool) -> list[dict]:
    """Every attention launch as a dict of its row's fields, jit function, args, kwargs and autotune candidates
    (None when not autotuned): forward and backward, causal and not, autotuned and with EVO_AUTOTUNE=0's tile, the
    forward through TMA and through copies; the KV-cache decode forward; the window + softcap forward and backward
    (the most code)."""
    import torch

    from evo.kernels import attention
    from evo.kernels.triton_utils import OPAQUE_OPS

    total = BATCH * SEQLEN
    q, k, v, out, dout = (_meta(total, HEADS, head_dim, dtype=dtype) for _ in range(5))
    lse = _meta(HEADS, total, dtype=torch.float32)
    cu = _meta(BATCH + 1, dtype=torch.int32)
    scale = head_dim ** -0.5
    masks = {"causal": (-1, 0, 0.0), "full": (-1, -1, 0.0), "window+softcap": (255, 0, 30.0)}
    jobs = []

    def record(call, **fields):
        for fn, args, kwargs, candidates in call:
            jobs.append(dict(fields=fields, fn=fn, args=args, kwargs=kwargs, candidates=candidates))

    for mask, (left, right, softcap) in masks.items():
        for tuned in ((False,) if default_only or mask == "window+softcap" else (True, False)):
            autotune = mock.patch.dict(os.environ, {"EVO_AUTOTUNE": "1" if tuned else "0"})
            for tma in (True, False):  # the forward through TMA (Hopper's default path) and through copies
                with recorded_launches() as launches, autotune, \
                        mock.patch.object(attention, "_use_tma", lambda *t, tma=tma: tma):
                    OPAQUE_OPS["flash_attn_fwd"].fn(q, k, v, cu, cu, SEQLEN, SEQLEN, scale, left, right, softcap)
                record(launches, causal=mask != "full", mask=mask, path="tma" if tma else "copy")
            with recorded_launches() as launches, autotune:
                OPAQUE_OPS["flash_attn_bwd"].fn(dout, q, k, v, out, lse, cu, cu, SEQLEN, SEQLEN, scale, left, right,
                                                softcap)
            record(launches, causal=mask != "full", mask=mask)
    # decode: one new token per row against a 4096-token cache (flash_attn_with_kvcache)
    qd = _meta(BATCH, 1, HEADS, head_dim, dtype=dtype)
    cache = _meta(BATCH, SEQLEN, HEADS, head_dim, dtype=dtype)
    spans = _meta(3, BATCH, dtype=torch.int64)
    with recorded_launches() as launches, mock.patch.dict(os.environ, {"EVO_AUTOTUNE": "0"}):
        OPAQUE_OPS["flash_attn_kvcache_fwd"].fn(qd, cache, cache, spans, scale, -1, 0, 0.0)
    record(launches, causal=True, mask="causal", kv_cache=True)
    return jobs


def other_launches(dtype) -> list[dict]:
    """The other kernels, each launched once at a training shape."""
    import torch

    from evo.kernels import activation, loss, moe, rmsnorm, rotary  # noqa: F401  (their launch functions register)
    from evo.kernels.triton_utils import OPAQUE_OPS

    rows, hidden, inter, vocab = 16384, 4096, 14336, 128256
    x, res, dy = (_meta(rows, hidden, dtype=dtype) for _ in range(3))
    w = _meta(hidden, dtype=dtype)
    rstd = _meta(rows, dtype=torch.float32)
    g, u = _meta(rows, inter, dtype=dtype), _meta(rows, inter, dtype=dtype)
    xr = _meta(BATCH, SEQLEN, HEADS, 128, dtype=dtype)
    cos = _meta(SEQLEN, 64, dtype=torch.float32)
    logits = _meta(4096, vocab, dtype=dtype)
    labels = _meta(4096, dtype=torch.int64)
    lse4k = _meta(4096, dtype=torch.float32)
    with recorded_launches() as launches:
        OPAQUE_OPS["rms_norm_fwd"].fn(x, res, w, 1e-6)
        OPAQUE_OPS["rms_norm_bwd"].fn(dy, x, w, rstd, dy, dtype, True)
        OPAQUE_OPS["swiglu_fwd"].fn(g, u)
        OPAQUE_OPS["swiglu_bwd"].fn(g, u, g)
        OPAQUE_OPS["rotary"].fn(xr, cos, cos, False, False, None, 0, None, None)
        OPAQUE_OPS["ce_stats"].fn(logits, labels, 0, 1.0)
        OPAQUE_OPS["ce_grad"].fn(logits, labels, lse4k, lse4k, 0, vocab, 0.0, 0.0, 1.0, dtype)
        moe_launches(dtype)
    return [dict(fields={}, fn=fn, args=args, kwargs=kwargs, candidates=candidates)
            for fn, args, kwargs, candidates in launches]


def moe_launches(dtype) -> None:
    """The MoE kernels at the Qwen3-30B-A3B shape (MOE_SHAPE: 16k tokens, top-8 of 128 experts, hidden 2048, expert
    intermediate 768): the routing; the public grouped_mm's GEMMs (forward, dA, dB, at gate/up's N = 2 x 768); and
    moe_experts's fused forward and backward launches (evo/kernels/moe.py: gathered SwiGLU GEMM, weighted w2 GEMM,
    gathered dout GEMM, weighted SwiGLU backward, two-product dX GEMM, gathered dW GEMMs)."""
    import torch

    from evo.kernels.triton_utils import OPAQUE_OPS

    tokens, top_k, experts, hidden, inter = MOE_SHAPE
    rows = tokens * top_k
    xs, h2 = _meta(rows, hidden, dtype=dtype), _meta(rows, 2 * inter, dtype=dtype)
    w = _meta(experts, 2 * inter, hidden, dtype=dtype).transpose(1, 2)  # a Linear-style weight, as the model has it
    offs = _meta(experts, dtype=torch.int32)
    gemm, db = OPAQUE_OPS["grouped_mm_fwd"].fn, OPAQUE_OPS["grouped_mm_db"].fn
    OPAQUE_OPS["moe_routing"].fn(_meta(tokens, top_k, dtype=torch.int64), experts)
    gemm(xs, w, offs, None, None, None, None)
    gemm(h2, w.transpose(1, 2), offs, None, None, None, None)
    db(xs, h2, offs, w, None, False)
    x, dout = _meta(tokens, hidden, dtype=dtype), _meta(tokens, hidden, dtype=dtype)
    w1, w3 = (_meta(experts, inter, hidden, dtype=dtype) for _ in range(2))
    w2 = _meta(experts, hidden, inter, dtype=dtype)
    token_rows, ws = _meta(rows, dtype=torch.int64), _meta(rows, dtype=torch.float32)
    gate, up, h = OPAQUE_OPS["moe_swiglu_fwd"].fn(x, token_rows, w1, w3, offs)
    gemm(h, w2.transpose(1, 2), offs, None, ws, None, None)
    p = gemm(dout, w2, offs, token_rows, None, None, None)
    dgate, dup, _, hw = OPAQUE_OPS["moe_swiglu_bwd"].fn(p, gate, up, ws)
    gemm(dgate, w1, offs, None, None, dup, w3)
    db(x, dgate, offs, w1.transpose(1, 2), token_rows, True)
    db(hw, dout, offs, w2.transpose(1, 2), token_rows, False)


def kernel_name(fn_name: str, fields: dict) -> str:
    """A row's kernel name: attention's say attention and fwd / bwd ("attention_fwd", "attention_bwd_dkdv", ...)."""
    name = fn_name.lstrip("_")
    if name.startswith("attn_"):
        name = "attention_" + name[len("attn_"):]
        if fields.get("kv_cache"):
            name += "_kvcache"
    return name


def jobs_for(head_dim: int, dtype_name: str, arch: int, default_only: bool) -> list[dict]:
    """Every compile job: one per recorded launch and autotune candidate, with the fields of its row."""
    import torch

    from evo.kernels import attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    jobs = []
    for launch in attention_launches(head_dim, dtype, default_only) + other_launches(dtype):
        fn, fields = launch["fn"], launch["fields"]
        kwargs = {k: v for k, v in launch["kwargs"].items() if k not in ("grid", "warmup")}
        candidates = launch["candidates"]
        for config in candidates or [None]:
            full = {**kwargs, **(config.all_kwargs() if config else {})}
            if config is not None and config.pre_hook is not None:  # as the autotuner does before each candidate
                config.pre_hook({**dict(zip(fn.arg_names, launch["args"])), **full})
            row = {"kernel": kernel_name(fn.fn.__name__, fields), "dtype": dtype_name, "head_dim": head_dim, **fields}
            if row["kernel"].startswith("attention"):
                row["config"] = {"BLOCK_M": full.get("BLOCK_M", 0), "BLOCK_N": full.get("BLOCK_N", 0),
                                 "num_warps": full.get("num_warps", 4), "num_stages": full.get("num_stages", 3)}
                # the EVO_AUTOTUNE=0 tile of the training forward on its sm_90 default path
                is_untuned = candidates is None and not fields.get("kv_cache")
                row["default"] = bool(is_untuned and row["kernel"] == "attention_fwd" and fields.get("mask") == "full"
                                      and fields.get("path") == ("tma" if attention.TMA_DEFAULT else "copy"))
                row["tuned"] = candidates is not None
            else:
                tiles = {k: full[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in full and "gmm" in row["kernel"]}
                row["config"] = {**tiles, "num_warps": full.get("num_warps", 4), "num_stages": full.get("num_stages", 3)}
                if "gmm" in row["kernel"]:  # which fusions this launch of a grouped GEMM has (evo/kernels/moe.py)
                    row["options"] = "+".join(o.lower() for o in ("GATHER", "DUAL", "SCALED", "GATHER_A", "GATHER_D")
                                              if full.get(o)) or "plain"
                row["default"] = False
            jobs.append({"row": row, "spec": specialize(fn, launch["args"], full, arch)})
    return _once(jobs)


def _once(jobs: list[dict]) -> list[dict]:
    """Each row once: the delta kernel is launched alike by the tuned and the untuned backward (the others keep
    their EVO_AUTOTUNE=0 row beside the same tile's candidate row)."""
    seen, out = set(), []
    for job in jobs:
        row = job["row"]
        tuned = None if row["kernel"] == "attention_bwd_delta" else row.get("tuned")
        key = repr((row["kernel"], row.get("mask"), row.get("path"), tuned, job["spec"]))
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


# ---- compiling and reading the result ------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """A binary of Triton's NVIDIA backend (its wheel ships ptxas and nvdisasm)."""
    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(90).path
        except ImportError:  # older Triton
            from triton.backends.nvidia.compiler import _path_to_binary

            return _path_to_binary("ptxas")[0]
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path)


def ptxas_info(ptx: str, arch_name: str) -> dict:
    """registers, spill_bytes and wgmma_serialized from ``ptxas -v`` on the PTX Triton produced (the flags Triton's
    own ptxas call uses that change code: -lineinfo, and the register allocation level where supported)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        base = [_tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch_name}", str(src), "-o", str(Path(tmp) / "k.o")]
        result = subprocess.run(base[:3] + ["--regAllocOptLevel=2"] + base[3:], capture_output=True, text=True)
        if result.returncode != 0 and "regAllocOptLevel" in result.stderr:
            result = subprocess.run(base, capture_output=True, text=True)
    log = result.stdout + result.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spills.group(1)) if spills else 0,
            "wgmma_serialized": bool(re.search(r"C751[12]", log))}


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\((\.L_x_\d+)\)")


def sass_info(sass: str) -> dict:
    """wgmma / mma_sync / tma and the main loop's length from nvdisasm's listing."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instr = _INSTR.match(line)
        if instr:
            instructions.append(instr.group(2))
    ops = [" ".join(i.split()[1:]) if i.startswith("@") else i for i in instructions]
    has = lambda prefix: any(op.startswith(prefix) for op in ops)  # noqa: E731
    wgmma, mma_sync = has("HGMMA"), has("HMMA")
    mma = "HGMMA" if wgmma else "HMMA"
    loops = []
    for end, op in enumerate(ops):
        branch = _BRANCH.search(op) if op.startswith("BRA") else None
        if branch and labels.get(branch.group(1), end + 1) <= end:
            start = labels[branch.group(1)]
            if any(o.startswith(mma) for o in ops[start:end + 1]):
                loops.append(end + 1 - start)
    return {"wgmma": wgmma, "mma_sync": mma_sync, "tma": has("UTMALDG") or has("UTMASTG"),
            "loop_instructions": min(loops) if loops else 0, "instructions": len(ops)}


def compile_job(job: dict, out_dir: str | None) -> dict:
    """Compile one job; the row with what the compiler made, or {"error": ...} with the row's fields."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    spec, row = job["spec"], dict(job["row"])
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    while not isinstance(fn, JITFunction):  # a module-level autotune or heuristics wrapper holds the kernel
        fn = fn.fn
    arch_name = f"sm_{spec['arch']}a" if spec["arch"] >= 90 else f"sm_{spec['arch']}"
    try:
        compiled = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"]),
                                  target=GPUTarget("cuda", spec["arch"], 32), options=spec["options"])
    except Exception as exc:  # noqa: BLE001 - a failed candidate is reported, not fatal
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:3000]}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    row.update(ptxas_info(compiled.asm["ptx"], arch_name))
    row["shared_bytes"] = int(compiled.metadata.shared)
    row.update(sass_info(sass))
    cfg = row["config"]
    tile = cfg.get("BLOCK_M", 0) * cfg.get("BLOCK_N", 0)
    row["instructions_per_score"] = (row["loop_instructions"] * cfg["num_warps"] / tile) if tile else 0.0
    if out_dir is not None:
        name = _file_name(row)
        (Path(out_dir) / "cubins").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "cubins" / name).write_bytes(compiled.asm["cubin"])
        row["cubin"] = f"cubins/{name}"
    return row


def _file_name(row: dict) -> str:
    cfg = row["config"]
    parts = [row["kernel"], row.get("mask", ""), row.get("path", ""),
             "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N") if k in cfg),
             f"w{cfg['num_warps']}s{cfg['num_stages']}", f"d{row['head_dim']}", row["dtype"]]
    return "-".join(p.replace("+", "_") for p in parts if p) + ".cubin"


def report(head_dims=(128,), dtype: str = "bf16", arch: int = 90, default_only: bool = False,
           out_dir: str | None = None, workers: int | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, failed) for every kernel and candidate; the files under ``out_dir`` when given."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernel report compiles kernels: unset TRITON_INTERPRET (interpreted kernels are not "
                           "compilable objects)")
    jobs = [job for d in head_dims for job in jobs_for(d, dtype, arch, default_only)]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(compile_job, jobs, [out_dir] * len(jobs)))
    rows = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "machine.json").write_text(json.dumps(toolchain(arch), indent=1))
        (out / "report.json").write_text(json.dumps(rows, indent=1))
        (out / "failed.json").write_text(json.dumps(failed, indent=1))
        (out / "report.md").write_text(markdown(rows, failed))
    return rows, failed


def toolchain(arch: int) -> dict:
    """What compiled: Triton's and ptxas's versions, the arch, the source commit, the date."""
    import datetime

    import triton

    from bench.run import git_commit

    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"triton": triton.__version__, "ptxas": ptxas[-1] if ptxas else "unknown", "arch": f"sm_{arch}a",
            "commit": git_commit(), "date": datetime.date.today().isoformat()}


def default_folder() -> Path:
    """Where bench/run.py writes the report: one folder per Triton version (3.6 is the GPU machine's)."""
    import triton

    return Path(__file__).resolve().parent / "results" / "kernel-report" / f"triton-{triton.__version__}"


COLUMNS = ["kernel", "mask", "path", "tma", "config", "options", "default", "registers", "spill_bytes", "shared_bytes", "wgmma",
           "mma_sync", "wgmma_serialized", "loop_instructions", "instructions_per_score"]


def markdown(rows: list[dict], failed: list[dict]) -> str:
    def cell(row, key):
        value = row.get(key, "")
        if key == "config" and isinstance(value, dict):
            return (f"{value.get('BLOCK_M', '-')}x{value.get('BLOCK_N', '-')} w{value['num_warps']} "
                    f"s{value['num_stages']}")
        if key == "shared_bytes":
            return f"{value / 1024:.0f} KiB"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k) for k in COLUMNS) + " |" for r in rows]
    if failed:
        lines += ["", "Failed to compile:", ""]
        lines += [f"- {r['kernel']} {cell(r, 'config')} {r.get('mask', '')}: {r['error'].splitlines()[0][:200]}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def run(quick: bool, device: str) -> list[dict]:
    """bench/run.py's entry: the report at head_dim 128, bf16, sm_90a, files under ``default_folder()``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [{"kernel": "all", "skipped": "needs compilable kernels: run without TRITON_INTERPRET"}]
    rows, failed = report(out_dir=str(default_folder()))
    return [{**r, "config": cell_config(r["config"])} for r in rows] + \
           [{"kernel": r["kernel"], "error": r["error"].splitlines()[0][:200]} for r in failed]


def cell_config(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="sm_90a (H100, H200) or another sm_NN")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--default-only", action="store_true",
                        help="only the launches EVO_AUTOTUNE=0 makes, not every autotune candidate")
    parser.add_argument("--out", default="kernel-report", help="folder for report.json, report.md and the cubins")
    args = parser.parse_args()
    match = re.fullmatch(r"sm_(\d+)a?", args.arch)
    if not match:
        parser.error(f"--arch {args.arch!r}: expected sm_NN or sm_NNa, such as sm_90a")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows, failed = report(tuple(args.head_dim), args.dtype, int(match.group(1)), args.default_only, args.out)
    print(markdown(rows, failed), end="")
    print(f"{len(rows)} compiled, {len(failed)} failed; written to {args.out}/report.json, report.md, cubins/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
