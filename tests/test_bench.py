"""The GPU benchmarks (bench/kernels.py, bench/attention.py) run end to end in smoke mode: tiny shapes,
on the CPU through Triton's interpreter. A GPU run is rare and short; a benchmark that crashes wastes
it. Marked slow (about 40 s)."""

import json

import pytest

from helpers import run_script

KERNEL_OPS = ["rms_norm fwd", "rms_norm bwd", "rotary fwd", "swiglu fwd+bwd", "cross_entropy fwd+bwd"]


@pytest.mark.slow
def test_gpu_benchmarks_run_at_smoke_shapes(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_script("bench/run.py", "--smoke", "--out", out, env={"TRITON_INTERPRET": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["machine"]["device"] == "cpu"
    rows = results["rows"]

    kernels = [r for r in rows if r["benchmark"] == "kernels"]
    for op in KERNEL_OPS:
        impls = {r["impl"]: r for r in kernels if r["op"] == op}
        assert set(impls) == {"evo", "torch", "torch.compile"}, op
        for row in impls.values():
            assert row["ms"] > 0 and row["GB_s"] > 0, row
    flce = {r["impl"]: r for r in kernels if r["op"] == "fused_linear_cross_entropy fwd+bwd"}
    assert set(flce) == {"evo", "torch (matmul + cross_entropy)"}
    t, h, v = (int(n) for n in flce["evo"]["shape"].split("x"))
    assert flce["evo"]["TFLOP_s"] * flce["evo"]["ms"] * 1e9 == pytest.approx(6 * t * h * v)

    attention = [r for r in rows if r["benchmark"] == "attention"]
    assert not [r for r in attention if r["impl"].startswith("evo") and "error" in r]
    cases = [r for r in attention if "seqlen" in r and "error" not in r]
    assert {r["impl"] for r in cases} == {"evo", "evo-tma", "sdpa-flash", "sdpa-default"}
    for row in cases:
        if row["impl"].startswith("evo"):
            assert row["max_abs_diff_vs_sdpa"] < 0.05, row  # bf16 outputs of O(1)
    for row in cases:  # the FLOP count: 4 b hq s^2 d, halved when causal; backward 2.5 times that
        batch = max(1, 64 // row["seqlen"])
        fwd = 4 * batch * row["heads_q"] * row["seqlen"] ** 2 * row["headdim"] / (2 if row["causal"] else 1)
        assert row["fwd_TFLOP_s"] * row["fwd_ms"] * 1e9 == pytest.approx(fwd)
        assert row["bwd_TFLOP_s"] * row["bwd_ms"] * 1e9 == pytest.approx(2.5 * fwd)
    assert [r for r in attention if r.get("case", "").startswith("varlen")]
