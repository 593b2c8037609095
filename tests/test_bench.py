"""The benchmark harness: the correctness check before timing (bench/common.py), the end-to-end loss check
(bench/train_step.py), the pictures (bench/plots.py), and a smoke run of the GPU benchmarks end to end
(tiny shapes on the CPU through Triton's interpreter): a GPU run is rare and short, and a benchmark that
crashes wastes it."""

import json

import pytest
import torch

from bench import common, plots, train_step
from tests.helpers import run_script


def _rms(x, w):  # an independent RMSNorm (not evo's reference)
    return x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * w


class _RMS(torch.autograd.Function):
    """RMSNorm as a Function of its own, to be broken: ``grad_factor`` scales the input's gradient, and
    ``scribble`` writes into the input after using it (as Liger's kernels do, to save memory)."""

    @staticmethod
    def forward(ctx, x, w, grad_factor, scribble):
        with torch.enable_grad():
            xd, wd = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
            out = _rms(xd, wd)
        ctx.save_for_backward(xd, wd, out)
        ctx.grad_factor = grad_factor
        if scribble:
            x.data.mul_(3)
        return out.detach()

    @staticmethod
    def backward(ctx, dy):
        xd, wd, out = ctx.saved_tensors
        dx, dw = torch.autograd.grad(out, (xd, wd), dy)
        return dx * ctx.grad_factor, dw, None, None


def _case(mode):
    torch.manual_seed(0)
    bwd = mode == "fwd+bwd"
    x = torch.randn(16, 64, requires_grad=bwd)
    w = (1 + torch.randn(64) / 10).requires_grad_(bwd)
    return common.Case(op="rms", mode=mode, shape="16x64", size=64, size_name="hidden", dtype=torch.float32,
                       inputs=[x, w], grad_outs=[torch.randn(16, 64)] if bwd else [], reference=_rms,
                       nbytes=2 * x.numel() * 4)


def test_a_wrong_or_failing_provider_is_reported_failed_and_not_timed():
    def raises(x, w):
        raise RuntimeError("no kernel for this shape")

    for mode in ("fwd", "fwd+bwd"):
        providers = {"scribbles": lambda x, w: _RMS.apply(x, w, 1.0, True), "right": _rms, "wrong": lambda x, w: _rms(x, w) * 1.01,
                     "raises": raises, "absent": "liger-kernel does not import: ModuleNotFoundError"}
        if mode == "fwd+bwd":
            providers["wrong-grad"] = lambda x, w: _RMS.apply(x, w, 1.1, False)
        rows = {r["provider"]: r for r in common.run_case(_case(mode), providers, "cpu", quick=True)}
        assert list(rows) == list(providers)
        for name in ("scribbles", "right"):
            row = rows[name]
            assert "error" not in row and row["max_rel_err"] < 1e-5, row
            assert row["ms_p20"] <= row["ms"] <= row["ms_p80"] and row["repeats"] == 5
            assert row["GB_s"] == pytest.approx(2 * 16 * 64 * 4 / row["ms"] / 1e6)
            assert {"op", "provider", "shape", "dtype", "mode", "size"} <= set(row)
        for name in ("wrong", "wrong-grad") if mode == "fwd+bwd" else ("wrong",):
            assert rows[name]["error"].startswith("wrong result") and "ms" not in rows[name], rows[name]
        assert "RuntimeError: no kernel" in rows["raises"]["error"] and "ms" not in rows["raises"]
        assert rows["absent"]["error"].startswith("liger-kernel does not import")


def test_providers_take_turns_on_a_cpu():
    order = []
    calls = {name: (lambda n: lambda: order.append(n))(name) for name in "abc"}
    samples = common.measure(calls, "cpu", quick=True)
    assert {k: len(v) for k, v in samples.items()} == {"a": 5, "b": 5, "c": 5}
    rounds = [order[3 + 3 * r: 6 + 3 * r] for r in range(5)]  # after one warm-up call each
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b"] and all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_rel_error():
    want = [torch.tensor([1.0, -2.0])]
    assert common.rel_error([torch.tensor([1.0, -2.0])], want) == 0
    assert common.rel_error([torch.tensor([1.0, -1.0])], want) == pytest.approx(0.5)
    assert common.rel_error([torch.tensor([float("nan"), -2.0])], want) == float("inf")
    assert common.rel_error([torch.tensor([1.0])], want) == float("inf")


def test_shares_of_the_measured_and_vendor_peaks():
    peaks = [{"op": "copy", "mode": "peak", "GB_s": 3000.0, "vendor_GB_s": 3350.0},
             {"op": "matmul", "mode": "peak", "TFLOP_s": 700.0, "vendor_TFLOP_s": None}]
    rows = [{"op": "rms", "mode": "fwd", "GB_s": 2700.0}, {"op": "flce", "mode": "fwd+bwd", "TFLOP_s": 350.0}]
    common.share(rows, peaks)
    assert rows[0]["copy_share"] == pytest.approx(0.9) and rows[0]["vendor_bw_share"] == pytest.approx(2700 / 3350)
    assert rows[1]["matmul_share"] == pytest.approx(0.5) and "vendor_flops_share" not in rows[1]
    assert "copy_share" not in peaks[0]
    assert common.vendor_gb_s("NVIDIA H100 80GB HBM3") == 3350 and common.vendor_gb_s("NVIDIA H200") == 4800
    assert common.vendor_gb_s("NVIDIA H100 PCIe") == 2000 and common.vendor_gb_s("Tesla T4") is None


def test_end_to_end_rows_with_a_wrong_loss_lose_their_numbers():
    rows = [{"provider": "evo", "loss_first": 10.05, "tokens_per_s": 2.0, "mfu": 0.5},
            {"provider": "reference", "loss_first": 10.0, "tokens_per_s": 1.0},
            {"provider": "evo+compile", "loss_first": 12.0, "tokens_per_s": 3.0, "TFLOP_s": 9.0}]
    train_step.check_losses(rows, tolerance=2e-2)
    assert rows[0]["loss_vs_reference"] == pytest.approx(0.005) and rows[0]["tokens_per_s"] == 2.0
    assert "error" not in rows[1]
    assert rows[2]["error"].startswith("wrong result") and "tokens_per_s" not in rows[2] and "TFLOP_s" not in rows[2]


def test_pictures_one_panel_per_op_and_a_bar_per_provider(tmp_path):
    rows = [{"benchmark": "peaks", "op": "copy", "mode": "peak", "GB_s": 20.0},
            {"benchmark": "peaks", "op": "matmul", "mode": "peak", "TFLOP_s": 0.3}]
    for provider, scale in (("torch", 1.0), ("torch.compile", 2.0)):
        rows += [{"benchmark": "kernels", "op": "rms_norm", "mode": "fwd", "size": n, "size_name": "hidden",
                  "provider": provider, "GB_s": scale * n / 1024} for n in (1024, 2048, 4096)]
    rows.append({"benchmark": "kernels", "op": "rms_norm", "mode": "fwd", "size": 1024, "size_name": "hidden",
                 "provider": "liger", "error": "liger-kernel does not import"})
    rows += [{"benchmark": "train_step", "case": "tiny", "provider": p, "layout": "1 device", "tokens_per_s": t,
              "matmul_share": 0.2} for p, t in (("reference", 5000.0), ("reference+compile", 4000.0))]
    rows += [{"benchmark": "parallel", "kind": "time", "case": f"tiny step, {c}", "world": w,
              "tokens_per_s_per_process": t} for c, w, t in (("1 process", 1, 4000.0), ("dp=2", 2, 3000.0))]
    results = {"machine": {"torch": "2.x", "cpus": 2}, "date": "2026-12-01T10:00:00", "rows": rows}
    written = plots.draw(results, tmp_path / "cpu-2026-12-01.json")
    assert [p.name for p in written] == ["cpu-2026-12-01-kernels.png", "cpu-2026-12-01-end_to_end.png",
                                         "cpu-2026-12-01-layouts.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in written)
    assert plots.op_figure([rows[-3]], "nothing to draw", tmp_path / "none.png") is None


@pytest.mark.slow
def test_gpu_benchmarks_run_at_smoke_shapes(tmp_path):
    """About 4 minutes: every provider of the kernel, attention, MoE and end-to-end benchmarks at tiny shapes."""
    out = tmp_path / "smoke.json"
    result = run_script("bench/run.py", "--smoke", "--out", out, env={"TRITON_INTERPRET": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["machine"]["device"] == "cpu"
    rows = results["rows"]
    assert {r["op"] for r in rows if r["benchmark"] == "peaks"} == {"copy", "matmul"}

    kernels = [r for r in rows if r["benchmark"] == "kernels"]
    for op in ("rms_norm", "rotary", "swiglu", "cross_entropy", "fused_linear_cross_entropy"):
        for mode in {r["mode"] for r in kernels if r["op"] == op}:
            by = {r["provider"]: r for r in kernels if r["op"] == op and r["mode"] == mode}
            assert set(by) == {"evo", "torch", "torch.compile", "liger"}, (op, mode)
            for name in ("evo", "torch", "torch.compile"):  # liger: where it imports, some of its kernels
                row = by[name]                               # fail in the interpreter; the row says so
                assert "error" not in row and row["ms"] > 0 and row["max_rel_err"] < 0.05, row
                assert ("GB_s" in row and "copy_share" in row) or ("TFLOP_s" in row and "matmul_share" in row)
            assert "ms" in by["liger"] or by["liger"]["error"]
    flce = next(r for r in kernels if r["op"] == "fused_linear_cross_entropy" and r["provider"] == "evo")
    t, h, v = (int(n) for n in flce["shape"].split("x"))
    assert flce["TFLOP_s"] * flce["ms"] * 1e9 == pytest.approx(6 * t * h * v)  # the FLOP formula

    attention = [r for r in rows if r["benchmark"] == "attention"]
    assert {r["provider"] for r in attention} == {"evo", "evo-copy", "sdpa-flash", "sdpa-default"}
    assert not [r for r in attention if r["provider"].startswith("evo") and "error" in r]
    for row in attention:  # 4 b hq s^2 d, halved when causal; forward + backward 3.5 times that
        if "seqlen" == row["size_name"] and "ms" in row:
            b, s, hq, d = (int(n) for n in row["shape"].split("x"))
            fwd = 4 * b * hq * s * s * d / (2 if "causal" in row["op"] else 1)
            assert row["TFLOP_s"] * row["ms"] * 1e9 == pytest.approx(fwd * (3.5 if row["mode"] == "fwd+bwd" else 1))
    assert [r for r in attention if "varlen" in r["op"] and "ms" in r]

    tiles = [r for r in rows if r["benchmark"] == "attention_tiles"]  # one tile through the interpreter
    assert tiles and all("error" not in r and r["ms"] > 0 and r["config"].startswith("BLOCK_M=") for r in tiles)

    moe = [r for r in rows if r["benchmark"] == "moe"]
    for op, formula in (("moe_experts", lambda t, k, e, h, i: 18 * t * k * h * i),
                        ("grouped_mm", lambda m, k, n, e: 6 * m * k * n)):
        by = {r["provider"]: r for r in moe if r["op"] == op and r["size"] == 40}
        assert set(by) == {"evo", "torch._grouped_mm", "loop"} | ({"liger"} if op == "moe_experts" else set())
        for name in ("evo", "loop"):  # torch._grouped_mm: bf16 on a CPU where this torch has it; the row says
            row = by[name]
            assert "error" not in row and row["ms"] > 0 and row["max_rel_err"] < 0.05, row
            assert row["TFLOP_s"] * row["ms"] * 1e9 == pytest.approx(formula(*map(int, row["shape"].split("x"))))
        assert "ms" in by["torch._grouped_mm"] or by["torch._grouped_mm"]["error"]
    assert next(r for r in moe if r["op"] == "moe_experts" and r["provider"] == "evo")["tokens_per_s"] > 0

    e2e = {r["provider"]: r for r in rows if r["benchmark"] == "train_step"}
    assert set(e2e) == {"evo", "reference"}
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["loss_vs_reference"] < 2e-2 for r in e2e.values())
    assert {p.name for p in tmp_path.glob("*.png")} == {f"smoke-{n}.png" for n in ("kernels", "attention", "moe",
                                                                                     "end_to_end")}
    assert (tmp_path / "smoke.md").read_text().count("## ") == 6  # peaks, kernels, attention, tiles, moe, train_step


def test_goals_met_missed_or_not_measured():
    from bench import goals

    def row(benchmark, op, mode, provider="evo", **numbers):
        return {"benchmark": benchmark, "op": op, "mode": mode, "provider": provider, **numbers}

    causal, full = "attention d128 causal 16/16 heads", "attention d128 full 16/16 heads"
    rows = [row("attention", causal, "fwd+bwd", size=8192, TFLOP_s=400.0),
            row("attention", causal, "fwd+bwd", "sdpa-flash", size=8192, TFLOP_s=380.0),
            row("attention", causal, "fwd+bwd", size=16384, TFLOP_s=300.0),
            row("attention", causal, "fwd+bwd", "sdpa-flash", size=16384, TFLOP_s=400.0),
            row("attention", full, "fwd", size=16384, TFLOP_s=470.0),
            row("kernels", "rms_norm", "fwd", shape="4096x16384", copy_share=0.85),
            row("kernels", "fused_linear_cross_entropy", "fwd+bwd", shape="8192x4096x128256", peak_MiB=300.0, ms=9.0),
            row("kernels", "fused_linear_cross_entropy", "fwd+bwd", "torch", shape="8192x4096x128256",
                peak_MiB=6000.0, ms=10.0),
            row("moe", "moe_experts", "fwd+bwd", shape="16384x8x128x2048x768", TFLOP_s=300.0),
            row("moe", "moe_experts", "fwd+bwd", "torch._grouped_mm", shape="16384x8x128x2048x768", TFLOP_s=200.0),
            row("moe", "moe_experts", "fwd+bwd", "liger", shape="8192x8x128x2048x768", TFLOP_s=900.0),  # not the shape
            row("context", "ring per-block attention", "fwd+bwd", "ring", shape="16384x16/4x128, context 4",
                TFLOP_s=270.0, vs_single_process=0.9),
            row("context", "ring per-block attention", "fwd+bwd", "ring", shape="1056x4/2x32, context 4",
                vs_single_process=0.1),  # a CPU's row: not the goal's shape
            row("checkpointing", "checkpointing", "none", case="llama-1b bf16, 16384-token row", ms_per_step=100.0),
            row("checkpointing", "checkpointing", "full", case="llama-1b bf16, 16384-token row", ms_per_step=130.0,
                peak_extra_bytes=1000),
            row("checkpointing", "checkpointing", "selective", case="llama-1b bf16, 16384-token row", ms_per_step=110.0,
                peak_extra_bytes=1100, kept_attention_bytes=200)]
    verdicts = {g["goal"]: g["verdict"] for g in goals.evaluate(rows)}
    assert verdicts["MoE experts fwd+bwd >= 400 TFLOP/s (Qwen3-30B-A3B experts, 16k tokens, bf16)"].startswith(
        "missed (-25%")
    assert verdicts["MoE experts fwd+bwd >= 1.2x torch._grouped_mm"].startswith("met (+25%")
    assert verdicts["attention fwd+bwd d128 causal 8k >= SDPA flash"].startswith("met (+5%")
    assert verdicts["attention fwd+bwd d128 causal 16k >= SDPA flash"].startswith("missed (-25%")
    assert verdicts["attention fwd d128 non-causal 16k >= 470 TFLOP/s"].startswith("met (+0%")
    assert verdicts["RMSNorm fwd >= 90% of copy bandwidth"].startswith("missed (-6%")
    assert verdicts["cross-entropy >= 70% of copy bandwidth"] == "not measured"
    assert verdicts["fused linear cross-entropy memory <= 10% of naive"].startswith("met (-50%")
    assert verdicts["fused linear cross-entropy time <= 1.0x naive"].startswith("met (-10%")
    assert verdicts["end-to-end MFU >= 50% (Llama-style 1B, seq 4096, bf16)"] == "not measured"
    assert verdicts["ring per-block attention >= 90% of single-process attention TFLOP/s"].startswith("met (+0%")
    assert verdicts["selective checkpointing step time <= 1.05x no checkpointing (1B, seq 16k)"].startswith(
        "missed (+5%")  # 1.10 against 1.05
    assert verdicts["selective checkpointing memory <= full checkpointing's + the kept attention outputs"].startswith(
        "met (-8%")  # 1100 against 1200
    assert goals.markdown(goals.evaluate(rows)).count("\n") == 14  # no kernel report rows: its goals not listed


def test_compiler_goals_read_from_the_kernel_report_rows():
    from bench import goals

    def row(kernel, mask, ips, spills=0, default=False, wgmma=True, mma_sync=False):
        return {"benchmark": "kernel_report", "kernel": kernel, "mask": mask, "head_dim": 128, "default": default,
                "instructions_per_score": ips, "spill_bytes": spills, "wgmma": wgmma, "mma_sync": mma_sync,
                "wgmma_serialized": False}

    rows = [row("attention_fwd", "full", 0.24), row("attention_fwd", "full", 0.2, spills=8),  # spilling: not best
            row("attention_fwd", "full", 0.3, default=True), row("attention_bwd_dkdv", "causal", 0.6, spills=80),
            row("attention_bwd_dq", "causal", 0.3, wgmma=False, mma_sync=True),
            row("attention_bwd_delta", "causal", 0.0, wgmma=False)]  # no dot: not counted
    verdicts = {g["goal"]: (g["measured"], g["verdict"]) for g in goals.evaluate(rows)}
    best = verdicts["attention fwd best non-causal tile <= 0.25 SASS instructions per score (sm_90a, no spills)"]
    assert best[0] == 0.24 and best[1].startswith("met (-4%")
    assert verdicts["attention fwd EVO_AUTOTUNE=0 tile <= 0.31 instructions per score"][1].startswith("met")
    assert verdicts["attention backward candidates spill <= 64 bytes"] == (80, "missed (+25% against the goal)")
    assert verdicts["every attention kernel with a dot on wgmma, none serialized, no mma.sync"] == (1, "missed (1 of 5)")
