"""Pipeline parallelism: how layers split into stages, the bad-input lines, and the acceptance test:
``configs/tiny.py`` (4 layers, fp32, 8 steps) under pp=2 with each schedule (1F1B, interleaved 1F1B, ZBH1,
ZBV), with activation checkpointing, with tied embeddings, and composed with isp, msp and dp x tp, against
one process on the same data. Per-step loss, gradient norm and validation loss agree within 1e-5 relative,
final weights per tensor within 1e-5 in ||diff|| / ||w||, greedy generation gives the same tokens on every
rank; each pipeline rank holds exactly its stages' parameter names."""

import pytest
import torch

from tests.dist import run_distributed
from tests.helpers import run_script, small_sections
from tests.parallel.layouts import assert_same_training, merged, train_layouts
from tests.test_launch import free_port
from evo.config import config_from_dict
from evo.errors import ConfigError
from evo.parallel.pipeline import rank_stages, split_layers

TINY_NAMES = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
              "feed_forward.w2.weight")


def test_layers_split_evenly_and_the_remainder_goes_to_the_middle_stages():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(10, 4) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert split_layers(9, 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]  # no middle stage: the first one (the last runs the head)
    assert split_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # two groups of 4, each over 2 stages
    assert split_layers(12, 2, 2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_ranks_hold_interleaved_stages_or_the_v():
    assert [rank_stages(r, 2, 1, "1F1B") for r in (0, 1)] == [[0], [1]]
    assert [rank_stages(r, 2, 2, "1F1B") for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [rank_stages(r, 4, 2, "ZBH1") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [rank_stages(r, 2, 2, "ZBV") for r in (0, 1)] == [[0, 3], [1, 2]]


@pytest.mark.parametrize("model, data, pipeline, line", [
    (dict(num_layers=2), {}, dict(size=4),
     "'parallel.pipeline.size' (4) is larger than the layers a chunk group has to split ('model.num_layers' 2 / "
     "'model.num_chunks' 1 = 2)"),
    (dict(num_layers=4, num_chunks=3), dict(micro_num=4), dict(size=2),
     "'model.num_chunks' (3) must divide 'model.num_layers' (4)"),
    (dict(num_layers=4, num_chunks=1), dict(micro_num=4), dict(size=2, mode="ZBV"),
     "'parallel.pipeline.mode' 'ZBV' runs exactly two chunks per rank (the V): set 'model.num_chunks' to 2, got 1"),
    (dict(num_layers=4), dict(micro_num=1), dict(size=2),
     "'data.micro_num' (1) must be >= 'parallel.pipeline.size' (2)"),
    (dict(num_layers=4, num_chunks=2), dict(micro_num=5), dict(size=2),
     "'data.micro_num' (5) must be a multiple of micro_num // 'parallel.pipeline.size' (2)"),
    (dict(num_layers=4, compile=True), dict(micro_num=2), dict(size=2, mode="ZBH1"),
     "'model.compile' = True with 'parallel.pipeline.mode' 'ZBH1'"),
    (dict(num_layers=4), dict(micro_num=2), dict(size=2, mode="GPipe"),
     "'parallel.pipeline.mode' must be one of 1F1B, ZBH1, ZBV; got 'GPipe'"),
])
def test_bad_pipeline_settings_are_one_line_naming_keys_and_numbers(model, data, pipeline, line):
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(model=model, data=data, parallel=dict(pipeline=pipeline)))
    assert str(err.value).startswith(line)


def test_heads_isp_cannot_split_are_refused_with_a_pipeline_too():
    with pytest.raises(ConfigError, match=r"'parallel.tensor.size' \(3\) must divide 'model.num_attention_heads'"):
        config_from_dict(small_sections(model=dict(num_layers=4), parallel=dict(tensor=dict(size=3, mode="isp"),
                                                                                pipeline=dict(size=2))))


def test_a_pipeline_larger_than_the_model_under_torchrun_is_one_line_and_exit_2(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "scripts/train.py", "--config", "configs/tiny.py", "parallel.pipeline.size=2",
                        "model.num_layers=1", f"monitor.run_folder={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})
    line = ("evo: error: 'parallel.pipeline.size' (2) is larger than the layers a chunk group has to split "
            "('model.num_layers' 1 / 'model.num_chunks' 1 = 1): every stage needs a layer")
    lines = result.stderr.splitlines()
    assert result.returncode != 0 and lines[0] == line, result.stderr[-2000:]
    assert "exitcode  : 2" in result.stderr and "exitcode  : 1" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: micro_num 2 (against pp layouts of 2 processes), 4 (dp=2), and 2 with tied embeddings."""
    folder = tmp_path_factory.mktemp("single")
    refs = train_layouts(0, 1, str(folder), [dict(micro_num=2), dict(micro_num=4), dict(micro_num=2, tied=True)])
    return {"plain": refs[0], "dp2": refs[1], "tied": refs[2]}


def expected_names(layers: list[int], first: bool, last: bool) -> set[str]:
    names = {f"layers.{i}.{n}" for i in layers for n in TINY_NAMES}
    return names | ({"tok_embeddings.weight"} if first else set()) | ({"norm.weight", "output.weight"} if last else set())


# (layout, the layers each pipeline rank holds) for the tiny model's 4 layers, written out by hand
TWO_PROCESS = [
    (dict(pp=2), [[0, 1], [2, 3]]),
    (dict(pp=2, chunks=2), [[0, 2], [1, 3]]),  # interleaved 1F1B: stages 0, 2 and 1, 3
    (dict(pp=2, schedule="ZBH1"), [[0, 1], [2, 3]]),
    (dict(pp=2, schedule="ZBV", chunks=2), [[0, 3], [1, 2]]),  # the V: stages 0, 3 and 1, 2
    (dict(pp=2, checkpoint=1.0), [[0, 1], [2, 3]]),
    (dict(pp=2, tied=True), [[0, 1], [2, 3]]),
    (dict(pp=2, schedule="ZBV", chunks=2, tied=True), [[0, 3], [1, 2]]),
]


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_pipeline_schedules_train_as_one_process(single, tmp_path):
    layouts = [layout for layout, _ in TWO_PROCESS]
    ranks = run_distributed(train_layouts, 2, str(tmp_path), layouts)
    for i, (layout, held) in enumerate(TWO_PROCESS):
        ref = single["tied" if layout.get("tied") else "plain"]
        run = merged(ranks, i)
        assert_same_training(run, ref, str(layout))
        zbv = layout.get("schedule") == "ZBV"
        for rank in (0, 1):
            names = set(ranks[rank][i]["local_numel"])
            assert names == expected_names(held[rank], rank == 0, rank == (0 if zbv else 1)), (layout, rank)
            assert ranks[rank][i]["generated"] == ref["generated"], (layout, rank)
        if layout.get("tied"):  # the head's copy of the table stayed equal to the embedding's
            assert torch.equal(run["weights"]["output.weight"], run["weights"]["tok_embeddings.weight"]), layout


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_pipeline_composes_with_isp_and_msp_on_four_processes(single, tmp_path):
    layouts = [dict(pp=2, tp=2, mode="isp", weight=2), dict(pp=2, tp=2, mode="msp", chunks=2)]
    ranks = run_distributed(train_layouts, 4, str(tmp_path), layouts)
    for i, layout in enumerate(layouts):
        assert_same_training(merged(ranks, i), single["plain"], str(layout))
        for rank in range(4):
            assert ranks[rank][i]["generated"] == single["plain"]["generated"], (layout, rank)
    packed = single["plain"]["packed_length"]
    for rank in range(4):  # isp: each rank's layers see half of every training row, on both stages
        assert set(ranks[rank][0]["layer_tokens"]) == {packed // 2}, rank


@pytest.mark.slow
def test_dp_tp_pp_on_eight_processes_trains_as_one_process(single, tmp_path):
    layout = dict(pp=2, tp=2, mode="msp", zero1=2)
    ranks = run_distributed(train_layouts, 8, str(tmp_path), [layout])
    assert_same_training(merged(ranks, 0), single["dp2"], str(layout))
    for rank in range(8):  # rank = tp + 2 dp + 4 pp: ranks 0-3 hold layers 0, 1; ranks 4-7 layers 2, 3
        assert set(ranks[rank][0]["local_numel"]) == expected_names([0, 1] if rank < 4 else [2, 3], rank < 4,
                                                                    rank >= 4), rank
