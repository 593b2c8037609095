"""The acceptance test of data, ZeRO and tensor parallelism: ``configs/tiny.py`` in fp32, 8 steps, trained
under each layout, against one process trained on the same data (a layout with dp=2 against one process taking
``data.micro_num`` doubled). Per-step loss and gradient norm agree within 1e-5 relative, final weights per tensor
within 1e-5 in ||diff|| / ||w||, the final validation loss too, and the structure is checked so that a layout that
silently did nothing could not pass: local parameter and optimizer-state sizes, the vocab shard the loss receives,
and the activation bytes fsp saves against msp."""

import math

import pytest
import torch

from tests.dist import run_distributed
from tests.parallel.layouts import STEPS, assert_same_training, train_layouts

TWO_PROCESS_LAYOUTS = [dict(tp=2, mode="mtp"), dict(tp=2, mode="msp"), dict(tp=2, mode="fsp"),
                       dict(zero1=1), dict(zero1=2),  # dp=2 without and with ZeRO
                       dict(tp=2, mode="fsp", checkpoint=1.0), dict(zero1=2, checkpoint=0.5),  # activation checkpointing
                       dict(tp=2, mode="isp"), dict(tp=2, mode="isp", weight=2, checkpoint=1.0)]  # intern sequence
SPLIT = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight",
         "tok_embeddings.weight", "output.weight")  # split across tensor-parallel ranks (rows or columns)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: micro_num 2 (to compare with tp layouts), 4 (dp=2) and 8 (dp=4)."""
    folder = tmp_path_factory.mktemp("single")
    counts = (2, 4, 8)
    return dict(zip(counts, train_layouts(0, 1, str(folder), [dict(micro_num=n) for n in counts])))


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_two_process_layouts_train_as_one_process(single, tmp_path):
    ranks = run_distributed(train_layouts, 2, str(tmp_path), TWO_PROCESS_LAYOUTS)
    for i, layout in enumerate(TWO_PROCESS_LAYOUTS):
        tp = layout.get("tp", 1)
        ref = single[2 if tp > 1 else 4]
        assert_same_training(ranks[0][i], ref, str(layout))
        full = {n: w.numel() for n, w in ref["weights"].items()}
        for rank in (0, 1):  # generation on every rank: the same tokens as one process, with and without cache
            assert ranks[rank][i]["generated"] == ref["generated"], f"{layout} rank {rank}"
        if layout.get("mode") == "isp":  # each rank's layers see half the row; weights whole, or halved (w = 2)
            for rank in (0, 1):
                run = ranks[rank][i]
                assert set(run["layer_tokens"]) == {ref["packed_length"] // 2}
                for name, n in full.items():
                    rows = ref["weights"][name].shape[0]
                    w = layout.get("weight", 1)
                    expected = n if w == 1 else max(0, min(-(-rows // 2), rows - rank * -(-rows // 2))) * (n // rows)
                    assert run["local_numel"][name] == run["optimizer_numel"][name] == expected, (layout, name)
            continue
        for rank in (0, 1):
            run = ranks[rank][i]
            for name, n in full.items():
                local, state = run["local_numel"][name], run["optimizer_numel"][name]
                assert state == local, f"{layout}: optimizer state of {name} is not sharded as the parameter"
                if tp > 1:
                    expected = n // tp if name.endswith(SPLIT) else n
                    assert local == expected, f"{layout} rank {rank}: {name} holds {local} of {n}"
                elif layout["zero1"] == 1:
                    assert local == n, f"{layout}: ZeRO off, yet {name} is sharded"
        if tp == 1 and layout["zero1"] == 2:  # each rank holds its half of the rows (the last may hold fewer)
            for name, n in full.items():
                rows = ref["weights"][name].shape[0]
                parts = [ranks[r][i]["local_numel"][name] for r in (0, 1)]
                assert sum(parts) == n and parts[0] == math.ceil(rows / 2) * (n // rows), f"{layout}: {name} {parts}"
        if tp > 1:  # the loss gets (tokens, vocab / tp) logits: the local vocab shard of the head, and the group
            vocab = ref["weights"]["output.weight"].shape[0]
            tokens = ref["packed_length"]
            for rank in (0, 1):
                calls = ranks[rank][i]["loss_calls"]
                assert calls and all(w_rows == vocab // tp and grouped for _, w_rows, grouped in calls)
                assert all(rows == tokens for rows, _, _ in calls[:STEPS * 2])  # training: every token of the row


def test_fsp_saves_fewer_activation_bytes_than_msp():
    from tests.parallel.layouts import saved_activation_bytes

    (msp, fsp), _ = run_distributed(saved_activation_bytes, 2)
    # fsp keeps the sequence shard (tokens / 2) instead of the gathered input of every column-parallel layer
    assert fsp < msp * 0.9, (msp, fsp)


@pytest.mark.slow  # about 40 s: three layouts on four processes
def test_four_process_layouts_train_as_one_process(single, tmp_path):
    """dp=2 x tp=2 msp; dp=4 with zero groups of 2 (HSDP: sharded in [0, 1] and [2, 3], replicated across); dp=2 x
    isp s=2 with one weight group of 4."""
    ranks = run_distributed(train_layouts, 4, str(tmp_path),
                            [dict(tp=2, mode="msp"), dict(zero1=2), dict(tp=2, mode="isp", weight=4)])
    assert_same_training(ranks[0][0], single[4], "dp=2 x tp=2 msp")
    assert_same_training(ranks[0][1], single[8], "dp=4 zero1=2")
    # isp: weight groups of 4 cross both sequence groups and both data ranks (InternEvo's layout)
    assert_same_training(ranks[0][2], single[4], "dp=2 x isp s=2 w=4")
    assert all(r[2]["local_numel"]["layers.0.attention.wq.weight"] * 4 == 256 * 256 for r in ranks)
    for i, ref in ((0, single[4]), (1, single[8])):
        assert [r[i]["generated"] for r in ranks] == [ref["generated"]] * 4
    full = {n: w.numel() for n, w in single[8]["weights"].items()}
    for rank in range(4):  # HSDP: each parameter split in two, rank r holding the same half as rank r +- 2
        local = ranks[rank][1]["local_numel"]
        assert all(local[n] < n_full for n, n_full in full.items() if n_full > 1)
        assert local == ranks[(rank + 2) % 4][1]["local_numel"]
        assert all(local[n] + ranks[rank ^ 1][1]["local_numel"][n] == n_full for n, n_full in full.items())


def test_family_features_under_tensor_parallelism_give_one_process_gradients():
    """head_dim apart from hidden / heads, q/k/v, output and MLP biases, per-head q/k norms (whose weight gradient
    sums over the heads of every rank): loss and every gradient under tp=2 equal one process's."""
    from tests.parallel.layouts import family_gradients

    (one,) = family_gradients(0, 1, ["one"])
    modes = ["mtp", "msp", "fsp"]
    for mode, (loss, grads) in zip(modes, run_distributed(family_gradients, 2, modes)[1]):
        torch.testing.assert_close(loss, one[0], rtol=1e-5, atol=1e-6, msg=mode)
        assert grads.keys() == one[1].keys()
        for name, g in grads.items():  # atol scaled by the tensor's size: fp32 sums over the batch in another
            ref = one[1][name]  # order leave a few 1e-6 on a bias gradient of 20 (seen on this machine's CPU)
            atol = 1e-6 * max(1.0, ref.abs().max().item())
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=atol, msg=f"{mode}: {name}")


@pytest.mark.parametrize("pipeline", [1, 2])  # dp=2 (ZeRO), or two pipeline stages (the last one computes the loss)
def test_fp16_loss_scaling_under_zero_and_pipeline_matches_one_process(tmp_path, pipeline):
    """Loss, gradient norm and final fp32 master weights of one process (rel 1e-5), with the loss scale and skipped
    steps exactly; AdamW would hide a gradient off by a factor from the loss and weights alike, the gradient norm
    does not. (The masters agree only because one process starts its masters from the fp32 initial values, as
    FSDP2 does: from their fp16 rounding they were 3e-4 apart after three steps.)"""
    from tests.parallel.layouts import fp16_runs

    one = fp16_runs(0, 1, str(tmp_path / "one"))
    ranks = run_distributed(fp16_runs, 2, str(tmp_path / "two"), pipeline)
    two = ranks[0]
    for i, ((a_run, a_weights), (b_run, _)) in enumerate(zip(one, two)):
        assert len(a_run) == len(b_run) == 3
        for a, b in zip(a_run, b_run):
            assert a["loss_scale"] == b["loss_scale"] and a["inf_nan_skip_batches"] == b["inf_nan_skip_batches"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a, b)
        b_weights = {name: w for rank in ranks for name, w in rank[i][1].items()}  # a pipeline stage's per rank
        assert b_weights.keys() == a_weights.keys()
        for name, w in a_weights.items():
            diff = float((b_weights[name].float() - w.float()).norm() / w.float().norm())
            assert diff <= 1e-5, f"final master {name} differs by {diff:.2e} relative"
    (plain, _), (overflow, _) = two
    assert [r["inf_nan_skip_batches"] for r in plain] == [0, 0, 0] and all(r["grad_norm"] > 0 for r in plain)
    # 2**40 overflows fp16 gradients: every rank skips the first step alike (one global norm), the scale halves
    assert overflow[0]["inf_nan_skip_batches"] == 1 and overflow[0]["loss_scale"] == 2**39


@pytest.mark.slow  # inductor compiles every layer: about a minute each
@pytest.mark.parametrize("layout", [dict(tp=2, mode="msp"), dict(pp=2)])  # pp: the compiled layers in 1F1B's stages
def test_compiled_layers_under_parallel_layouts_train_as_eager(tmp_path, layout):
    from tests.parallel.layouts import assert_same_training, compiled_runs, merged

    ranks = run_distributed(compiled_runs, 2, str(tmp_path), layout)
    # inductor's fused kernels round otherwise: gradients agree to 1e-5, and AdamW's first steps, which move a
    # weight by about lr whatever its gradient's size, turn that into up to 2.7e-5 in a weight after 3 steps
    # (measured); 1e-4 still sees any weight updated otherwise (3 steps move each by 5e-3 to 0.28 relative)
    assert_same_training(merged(ranks, 1), merged(ranks, 0), f"compiled {layout}", steps=3, evaluations=1,
                         weights_rel=1e-4)


def test_bf16_generation_under_zero_gives_the_tokens_of_one_process():
    """FSDP2 keeps fp32 masters and computes in bf16: the KV cache must be in bf16 and updated in place (a cast
    copy of it would lose every update), so the cached tokens match one process's, as the uncached ones do."""
    from tests.parallel.layouts import generations

    one = generations(0, 1, "torch.bfloat16")
    for rank in run_distributed(generations, 2, "torch.bfloat16"):
        assert rank == one
