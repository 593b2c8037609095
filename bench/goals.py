"""The GPU goals of evo's kernels and training step, read from bench/run.py results: each met, missed (by how
much) or not measured in the rows given.

    python bench/goals.py bench/results/<file>.json [...]   # several files: their rows together
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # Python put bench/ first on the path: the repository root replaces it
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def _find(rows, benchmark, op, mode, shape=None, size=None, provider="evo"):
    for row in rows:
        if (row.get("benchmark") == benchmark and row.get("op") == op and row.get("mode") == mode
                and row.get("provider") == provider and (shape is None or row.get("shape") == shape)
                and (size is None or row.get("size") == size)):
            return row
    return None


def _verdict(value, goal, higher_is_better=True) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if higher_is_better else value <= goal
    margin = value / goal - 1
    return f"{'met' if met else 'missed'} ({margin:+.0%} against the goal)"


def _goal(goal: str, value, target: float, detail: str, higher_is_better: bool = True) -> dict:
    return {"goal": goal, "measured": value, "verdict": _verdict(value, target, higher_is_better), "detail": detail}


def evaluate(rows: list[dict]) -> list[dict]:
    """One entry per goal: goal, measured (a number or None), verdict, detail."""
    out = []

    def add(goal, value, target, detail, higher_is_better=True):
        out.append(_goal(goal, value, target, detail, higher_is_better))

    for s in (8192, 16384):  # attention forward + backward against SDPA's flash backend, same run
        evo = _find(rows, "attention", "attention d128 causal 16/16 heads", "fwd+bwd", size=s)
        sdpa = _find(rows, "attention", "attention d128 causal 16/16 heads", "fwd+bwd", size=s, provider="sdpa-flash")
        ratio = evo["TFLOP_s"] / sdpa["TFLOP_s"] if evo and sdpa and "TFLOP_s" in evo and "TFLOP_s" in sdpa else None
        add(f"attention fwd+bwd d128 causal {s // 1024}k >= SDPA flash", ratio, 1.0,
            "evo TFLOP/s over sdpa-flash's" + (f": {evo['TFLOP_s']:.0f} vs {sdpa['TFLOP_s']:.0f}" if ratio else ""))
    row = _find(rows, "attention", "attention d128 full 16/16 heads", "fwd", size=16384)
    add("attention fwd d128 non-causal 16k >= 470 TFLOP/s", row and row.get("TFLOP_s"), 470.0, "evo TFLOP/s")
    row = _find(rows, "kernels", "rms_norm", "fwd", shape="4096x16384")
    add("RMSNorm fwd >= 90% of copy bandwidth", row and row.get("copy_share"), 0.9,
        "evo GB/s over the same run's device-to-device copy, 4096x16384 bf16")
    row = _find(rows, "kernels", "cross_entropy", "fwd+bwd", shape="8192x131072")
    add("cross-entropy >= 70% of copy bandwidth", row and row.get("copy_share"), 0.7,
        "evo fwd+bwd GB/s (3 x logits bytes) over the copy's, 8192x131072 bf16")
    evo = _find(rows, "kernels", "fused_linear_cross_entropy", "fwd+bwd", shape="8192x4096x128256")
    naive = _find(rows, "kernels", "fused_linear_cross_entropy", "fwd+bwd", shape="8192x4096x128256",
                  provider="torch")
    both = bool(evo and naive and evo.get("peak_MiB") and naive.get("peak_MiB"))
    add("fused linear cross-entropy memory <= 10% of naive", evo["peak_MiB"] / naive["peak_MiB"] if both else None,
        0.1, "evo working memory over matmul + cross_entropy's, 8192x4096x128256 bf16", higher_is_better=False)
    add("fused linear cross-entropy time <= 1.0x naive", evo["ms"] / naive["ms"] if both else None, 1.0,
        "evo ms over matmul + cross_entropy's", higher_is_better=False)
    shape = "16384x8x128x2048x768"  # Qwen3-30B-A3B's routed experts: 16k tokens, top-8 of 128, hidden 2048, I 768
    evo = _find(rows, "moe", "moe_experts", "fwd+bwd", shape=shape)
    torch_gmm = _find(rows, "moe", "moe_experts", "fwd+bwd", shape=shape, provider="torch._grouped_mm")
    add("MoE experts fwd+bwd >= 400 TFLOP/s (Qwen3-30B-A3B experts, 16k tokens, bf16)", evo and evo.get("TFLOP_s"),
        400.0, "evo TFLOP/s, 18 T k H I FLOPs (Liger-Kernel#1294's count; its fused MoE: 413 on an H100)")
    both = bool(evo and torch_gmm and "TFLOP_s" in evo and "TFLOP_s" in torch_gmm)
    add("MoE experts fwd+bwd >= 1.2x torch._grouped_mm", evo["TFLOP_s"] / torch_gmm["TFLOP_s"] if both else None, 1.2,
        "evo TFLOP/s over the same experts on torch._grouped_mm, same run" +
        (f": {evo['TFLOP_s']:.0f} vs {torch_gmm['TFLOP_s']:.0f}" if both else ""))
    ring = _find(rows, "context", "ring per-block attention", "fwd+bwd", shape="16384x16/4x128, context 4",
                 provider="ring")  # the GPU shape: a CPU's rows (the reference attention, small) are not the goal's
    add("ring per-block attention >= 90% of single-process attention TFLOP/s", ring and ring.get("vs_single_process"),
        0.9, "context rank 0's ring steps (context 4, forward + backward, merges included) over one process's "
        "varlen attention on the whole 16k row, same run")
    modes = [_find(rows, "checkpointing", "checkpointing", m) for m in ("none", "full", "selective")]
    none, full, sel = (r if r and "llama-1b" in r.get("case", "") else None for r in modes)  # the GPU case only
    add("selective checkpointing step time <= 1.05x no checkpointing (1B, seq 16k)",
        sel["ms_per_step"] / none["ms_per_step"] if sel and none else None, 1.05,
        "selective's ms per step over no checkpointing's, same run", higher_is_better=False)
    add("selective checkpointing memory <= full checkpointing's + the kept attention outputs",
        sel["peak_extra_bytes"] / (full["peak_extra_bytes"] + sel["kept_attention_bytes"]) if sel and full else None,
        1.0, "peak bytes a step adds, over full checkpointing's plus (out, lse) of every layer", higher_is_better=False)
    out += compiler_goals([r for r in rows if r.get("benchmark") == "kernel_report"])
    row = next((r for r in rows if r.get("benchmark") == "train_step" and r.get("provider") == "evo"), None)
    add("end-to-end MFU >= 50% (Llama-style 1B, seq 4096, bf16)", row and row.get("mfu"), 0.5,
        "the trainer's mfu against the vendor's bf16 peak")
    return out


def compiler_goals(report: list[dict]) -> list[dict]:
    """The attention goals read from bench/kernel_report.py's rows (sm_90a, head_dim 128, bf16, no GPU needed);
    none where the report did not run."""
    attention = [r for r in report if str(r.get("kernel", "")).startswith("attention") and r.get("head_dim") == 128]
    if not attention:
        return []
    full = [r for r in attention if r["kernel"] == "attention_fwd" and r.get("mask") == "full" and
            r.get("spill_bytes") == 0]
    default = [r for r in attention if r.get("default")]
    backward = [r for r in attention if "bwd" in r["kernel"] and r["kernel"] != "attention_bwd_delta"
                and r.get("mask") in ("causal", "full")]
    with_dot = [r for r in attention if r["kernel"] != "attention_bwd_delta"]
    bad = sum(1 for r in with_dot if not r["wgmma"] or r["mma_sync"] or r["wgmma_serialized"])
    return [
        _goal("attention fwd best non-causal tile <= 0.25 SASS instructions per score (sm_90a, no spills)",
              min((r["instructions_per_score"] for r in full), default=None), 0.25,
              "bench/kernel_report.py; the Triton tutorial's best, compiled the same way: 0.254",
              higher_is_better=False),
        _goal("attention fwd EVO_AUTOTUNE=0 tile <= 0.31 instructions per score",
              default[0]["instructions_per_score"] if len(default) == 1 else None, 0.31,
              "the default tile on Hopper's default path", higher_is_better=False),
        _goal("attention backward candidates spill <= 64 bytes",
              max((r["spill_bytes"] for r in backward), default=None), 64, "the most any backward candidate spills",
              higher_is_better=False),
        # a count, not a ratio: a goal of 0 has no margin to state
        {"goal": "every attention kernel with a dot on wgmma, none serialized, no mma.sync", "measured": bad,
         "verdict": "met" if bad == 0 else f"missed ({bad} of {len(with_dot)})", "detail": "kernels that fall short"},
    ]


def markdown(goals: list[dict]) -> str:
    lines = ["| goal | measured | verdict | what |", "|---|---|---|---|"]
    for g in goals:
        value = "" if g["measured"] is None else f"{g['measured']:.3g}"
        lines.append(f"| {g['goal']} | {value} | {g['verdict']} | {g['detail']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = []
    for file in sys.argv[1:]:
        try:
            rows += json.loads(Path(file).read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:  # a step that timed out before its first row
            print(f"{file}: not read ({type(exc).__name__}: {exc})")
    print(markdown(evaluate(rows)))
