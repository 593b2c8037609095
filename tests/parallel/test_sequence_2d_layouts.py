"""Training under InternEvo's 2D sequence parallelism (``parallel.sequence_2D``) matches one process: the tiny
model's packed rows (documents crossing every shard edge) split over context groups, alone and with head groups,
a double ring, the all-gather variant with a sliding window, ZeRO's weight groups and a pipeline."""

import pytest

from tests.dist import run_distributed
from tests.parallel.layouts import assert_same_training, merged, train_layouts


def two_d(head=1, context=2, window=1, **rest):
    return dict(head_size=head, context_size=context, window_size=window, **rest)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: micro_num 2 (the layouts below keep one data rank) and 4 (two data ranks); and with a sliding
    window."""
    folder = tmp_path_factory.mktemp("single")
    runs = train_layouts(0, 1, str(folder), [dict(micro_num=2), dict(micro_num=4), dict(sliding_window=40),
                                             dict(moe="GShard")])
    return {"tp": runs[0], "dp2": runs[1], "window": runs[2], "moe": runs[3]}


@pytest.mark.slow  # about a minute: two layouts on two processes
def test_context_two_trains_as_one_process(single, tmp_path):
    layouts = [dict(tp=2, mode="isp", sequence_2D=two_d()),
               dict(tp=2, mode="isp", sequence_2D=two_d(kv_exchange="all_gather"), checkpoint=1.0)]
    ranks = run_distributed(train_layouts, 2, str(tmp_path), layouts)
    for i, layout in enumerate(layouts):
        assert_same_training(ranks[0][i], single["tp"], str(layout))
        for rank in (0, 1):  # each rank's layers hold half the row; generation (whole rows) as one process
            assert set(ranks[rank][i]["layer_tokens"]) == {single["tp"]["packed_length"] // 2}
            assert ranks[rank][i]["generated"] == single["tp"]["generated"]


@pytest.mark.slow  # about two minutes: five layouts on four processes
def test_four_process_2d_layouts_train_as_one_process(single, tmp_path):
    layouts = [dict(tp=4, mode="isp", sequence_2D=two_d(context=4, window=2)),  # the double ring
               dict(tp=4, mode="isp", sequence_2D=two_d(context=4, window=2, device_placement_strategy=dict(
                   head_first=False, interleaved=True))),  # interleaved windows: [0, 2] [1, 3]
               dict(tp=4, mode="isp", sequence_2D=two_d(head=2, context=2)),  # head 2 x context 2
               dict(tp=2, mode="isp", weight=4, sequence_2D=two_d()),  # dp 2, ZeRO over weight groups of 4
               dict(tp=2, mode="isp", pp=2, sequence_2D=two_d())]  # a pipeline of two stages
    ranks = run_distributed(train_layouts, 4, str(tmp_path), layouts)
    refs = [single["tp"], single["tp"], single["tp"], single["dp2"], single["tp"]]
    for i, (layout, ref) in enumerate(zip(layouts, refs)):
        assert_same_training(merged(ranks, i), ref, str(layout))  # a pipeline rank holds its stage's weights
    assert set(ranks[0][0]["layer_tokens"]) == {single["tp"]["packed_length"] // 4}


@pytest.mark.slow
def test_sliding_window_and_moe_train_as_one_process(single, tmp_path):
    """A sliding window through the all-gather variant; GShard's capacity and the load-balancing loss taken over
    the whole row (the router's statistics summed over the sequence group, places in the row's order)."""
    layouts = [dict(tp=2, mode="isp", sliding_window=40, sequence_2D=two_d(kv_exchange="all_gather")),
               dict(tp=2, mode="isp", moe="GShard", sequence_2D=two_d())]
    ranks = run_distributed(train_layouts, 2, str(tmp_path), layouts)
    assert_same_training(ranks[0][0], single["window"], str(layouts[0]))
    assert_same_training(ranks[0][1], single["moe"], str(layouts[1]))
