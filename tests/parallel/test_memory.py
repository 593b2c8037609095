"""bench/parallel.py's ``computed_memory`` (no process started: shapes on the meta device, the split of
``tensor_parallel_plan()``) against what the tiny model's layouts measure when built in gloo processes:
``memory_estimate`` and the counted bytes of parameters, gradients, optimizer state and the compute copy held
from forward to backward; the 7B claims of docs/parallel.md; and the one-GPU FSDP2 comparison run end to end on
the CPU (a GPU run is rare and short: it must not crash there)."""

import pytest
import torch

from bench import parallel as bench

# (world, layout, dtype): fp32 as configs/tiny.py trains, bf16 for the 16-bit compute copy
LAYOUTS = [(1, dict(tp=1, zero1=1), None), (1, dict(tp=1, zero1=1), "torch.bfloat16"),
           (2, dict(zero1=1), None), (2, dict(zero1=2), None), (2, dict(tp=2, mode="mtp"), None),
           (2, dict(zero1=2), "torch.bfloat16"), (2, dict(tp=2, mode="msp"), "torch.bfloat16")]


@pytest.fixture(scope="module")
def measured():
    jobs = {1: [], 2: []}
    for world, layout, dtype in LAYOUTS:
        jobs[world].append(dict(layout=layout, dtype=dtype))
    one = [bench.measure_layout(0, 1, **job) for job in jobs.pop(1)]  # one process: no process group needed
    two = bench.measured(jobs)[2]
    return one + two


def test_computed_memory_equals_measured_tiny_layouts(measured):
    for (world, layout, dtype), got in zip(LAYOUTS, measured):
        cfg = bench.tiny_config(dtype).model
        want = bench.computed_memory(cfg, world, layout.get("tp", 1), layout.get("zero1", 1))
        what = f"world {world} {layout} {dtype or 'fp32'}"
        mem = got["memory_estimate"]
        assert set(mem) == {k for k in bench.MEMORY_KEYS if k in want}, what
        for key, value in mem.items():
            assert want[key] == value, f"{what}: {key} computed {want[key]}, memory_estimate {value}"
        assert ("compute_weights" in mem) == (world > 1 or dtype is not None), what
        # counted: parameters are the fp32 masters under FSDP2, the model in its dtype in one process
        master = mem["master_weights"]
        assert got["param_bytes"] == (master if world > 1 or dtype is None else master // 2), what
        assert got["gradient_bytes"] == mem["gradients"] == master, what
        assert got["optimizer_state_bytes"] == mem["optimizer_state"] == 2 * master, what
        # the compute copy held after a forward: every parameter's tensor-parallel part in model.dtype (FSDP2),
        # the 16-bit model (one process), nothing (one fp32 process)
        assert got["held_compute_bytes"] == mem.get("compute_weights", 0), what


def test_zero_and_tensor_parallel_shares_of_a_7b():
    cfg = bench.model_config("internlm2_7b")
    one = bench.computed_memory(cfg)
    zero8 = bench.computed_memory(cfg, world=8, zero1=-1)
    tp2 = bench.computed_memory(cfg, world=2, tp=2)
    # by hand, InternLM2-7B (hidden 4096, 32 layers, 8 kv heads of 128, ffn 14336, vocab 92544, untied head):
    # a layer holds q 4096^2 + k, v 2 x 1024 x 4096 + o 4096^2 + three 4096 x 14336 + two norms of 4096
    # = 218,112,000; the model 32 x that + embedding and head 2 x 92544 x 4096 + the final norm 4096
    assert one["params"] == 7_737_708_544
    # ZeRO over 8: fp32 masters, gradients and two moments (16 bytes a parameter) / 8, plus the whole bf16 copy
    # a forward gathers (2 bytes): 4 bytes a parameter, 30,950,834,176
    assert zero8["total"] == 30_950_834_176
    # tp=2: fp32 masters of half of everything but the 32 x 2 + 1 norms (266,240 weights, whole on both ranks):
    # (7,737,708,544 - 266,240) / 2 + 266,240 = 3,868,987,392 weights, 4 bytes each
    assert tp2["master_weights"] == 15_475_949_568
    assert one["master_weights"] == 4 * one["params"]
    assert zero8["optimizer_state"] * 8 == one["optimizer_state"]  # every dim 0 of this model divides by 8
    norms = cfg.num_layers * 2 * cfg.hidden_size * 4  # fp32 norm weights: replicated over tensor ranks
    assert tp2["layer_weights"] == (one["layer_weights"] - norms) // 2 + norms
    assert zero8["compute_weights"] == one["compute_weights"] == 2 * one["params"]  # gathered: not sharded by ZeRO
    whole = (norms // 4 + cfg.hidden_size) * 2  # bf16 norm weights, the final norm's too: whole on each tensor rank
    assert tp2["compute_weights"] == (one["compute_weights"] - whole) // 2 + whole  # tp splits the compute copy
    assert zero8["total"] == one["total"] // 8 + one["compute_weights"] * 7 // 8


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_fsdp_wrapping_runs_on_cpu(dtype):
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=300,
                 multiple_of=32)
    rows = bench.fsdp_wrapping("cpu", shape, dtype, tokens=64, micro_num=2, steps=1, warmup=1, repeats=1)
    assert [r["case"] for r in rows] == ["one cpu, no FSDP2", "one cpu, FSDP2, 1-rank mesh"]
    assert all(r["tokens_per_s"] > 0 and r["tokens_per_step"] == 128 for r in rows)
    assert rows[0]["cost_pct"] == 0.0
    assert not torch.distributed.is_initialized()  # the group it made is gone


def test_registered_in_the_harness():
    from bench import run

    assert "parallel" in run.BENCHMARKS


@pytest.mark.slow  # about 15 s: two and four gloo processes
def test_expert_parallel_memory_is_computed_and_its_all_to_all_moves_the_routed_rows():
    """configs/tiny_moe.py under expert groups of 2 and 4 (ZeRO over the data ranks): memory_estimate, the counted
    compute copy and computed_memory(..., ep=) agree, the compute copy holding 1 / ep of the routed experts; the
    all-to-all bytes are within 10% of the evenly spread formula (a fresh router spreads tokens nearly evenly)."""
    from bench import expert
    from evo.model import build_model
    from tests.dist import run_distributed

    cfg = bench.tiny_config(None, "tiny_moe")
    experts = sum(p.numel() for n, p in build_model(cfg.model, "meta").named_parameters() if ".experts.w" in n)
    for world, eps in ((2, (1, 2)), (4, (2, 4))):
        jobs = [dict(layout=dict(zero1=-1, expert=ep), config="tiny_moe") for ep in eps]
        ranks = run_distributed(bench.measure_layouts, world, jobs)
        for i, ep in enumerate(eps):
            got = bench.merge_ranks([r[i] for r in ranks])
            want = bench.computed_memory(cfg.model, world, 1, -1, ep=ep)
            for key, value in got["memory_estimate"].items():
                assert want[key] == value, (world, ep, key)
            assert got["held_compute_bytes"] == want["compute_weights"], (world, ep)
            every = bench.computed_memory(cfg.model, world, 1, -1)
            assert every["compute_weights"] - want["compute_weights"] == 4 * experts * (ep - 1) // ep  # fp32
            formula = expert.formula_bytes(cfg, ep)
            assert got["all_to_all_bytes"] == 0 if ep == 1 else abs(got["all_to_all_bytes"] / formula - 1) < 0.1
