"""Expert parallelism's pieces (evo/parallel/expert.py) on gloo: the groups against InternEvo's, and a MoE layer's
routed experts spread over 2 and 4 ranks against one process computing every rank's tokens with all the experts:
outputs, the tokens' and routing weights' gradients, and each rank's expert gradients (the sum over every rank's
tokens of the full model's gradient, its experts' rows); the all-to-all moves exactly the rows routed to another
rank's experts."""

import pytest
import torch
import torch.distributed as dist

from evo.kernels import reference
from evo.parallel import expert
from tests.dist import run_distributed


def test_expert_groups_are_internevos():
    # Initializer_Expert_Data's docstring (internlm/core/context/process_group_initializer.py): world 8, tp 2, ep 2
    assert expert.expert_groups(8, pp=1, tp=2, ep=2) == ([[0, 2], [4, 6], [1, 3], [5, 7]],
                                                         [[0, 4], [2, 6], [1, 5], [3, 7]])
    # one tensor rank, two pipeline stages of 4: runs of consecutive ranks in each stage
    assert expert.expert_groups(8, pp=2, tp=1, ep=4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0], [1], [2], [3], [4],
                                                                                          [5], [6], [7]])
    assert expert.expert_groups(8, pp=1, tp=1, ep=2)[1] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="expert groups of 4 do not divide the 2 data ranks"):
        expert.expert_groups(8, pp=2, tp=2, ep=4)


def case(rank: int, tokens: int, k: int, experts: int, hidden: int, inter: int):
    """Rank ``rank``'s tokens, routing and weights, and the experts every rank shares (seeded): fp64."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, experts, (tokens, k), generator=gen)
    weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64)
    shared = torch.Generator().manual_seed(7)
    w1, w3 = (torch.randn(experts, inter, hidden, generator=shared, dtype=torch.float64) / 3 for _ in "13")
    w2 = torch.randn(experts, hidden, inter, generator=shared, dtype=torch.float64) / 3
    return x, ids, weights, w1, w3, w2


SHAPE = dict(k=2, experts=8, hidden=12, inter=10)


def _expert_parallel(rank: int, world: int, tokens_per_rank: list[int]) -> dict:
    x, ids, weights, w1, w3, w2 = case(rank, tokens_per_rank[rank], **SHAPE)
    local = SHAPE["experts"] // world
    mine = slice(rank * local, (rank + 1) * local)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1[mine], w3[mine], w2[mine])]
    sent = []
    real = dist.all_to_all_single

    def counting(out, inp, output_split_sizes=None, input_split_sizes=None, group=None):
        if input_split_sizes is not None and inp.dim() == 2 and inp.shape[1] == SHAPE["hidden"]:
            sent.append(list(input_split_sizes))
        return real(out, inp, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes, group=group)

    dist.all_to_all_single = counting
    try:
        out = expert.expert_parallel_experts(leaves[0], ids, leaves[1], *leaves[2:], group=dist.group.WORLD)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(rank), dtype=out.dtype))
    finally:
        dist.all_to_all_single = real
    return {"out": out.detach(), "grads": [t.grad for t in leaves], "sent": sent}


@pytest.mark.parametrize("world, tokens", [(2, [13, 9]), (4, [7, 0, 11, 3])])
def test_expert_parallel_layer_equals_one_process(world, tokens):
    got = run_distributed(_expert_parallel, world, tokens)
    local = SHAPE["experts"] // world
    expert_grads = [torch.zeros(SHAPE["experts"], *shape, dtype=torch.float64)
                    for shape in ((SHAPE["inter"], SHAPE["hidden"]),) * 2 + ((SHAPE["hidden"], SHAPE["inter"]),)]
    for rank in range(world):
        x, ids, weights, w1, w3, w2 = case(rank, tokens[rank], **SHAPE)
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w3, w2)]
        out = reference.moe_experts(leaves[0], ids, leaves[1], *leaves[2:])
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(rank), dtype=out.dtype))
        torch.testing.assert_close(got[rank]["out"], out.detach(), rtol=1e-12, atol=1e-12)
        for g, want in zip(got[rank]["grads"][:2], (leaves[0].grad, leaves[1].grad)):
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
        for total, leaf in zip(expert_grads, leaves[2:]):
            total += leaf.grad
        # rows to each rank in the forward, then the same rows' gradients back in the backward (the reverse
        # exchange sends the received counts): exactly the assignments routed to each rank's experts
        to_rank = torch.bincount(ids.reshape(-1) // local, minlength=world).tolist()
        assert got[rank]["sent"][0] == to_rank
    for rank in range(world):
        mine = slice(rank * local, (rank + 1) * local)
        for g, total in zip(got[rank]["grads"][2:], expert_grads):
            torch.testing.assert_close(g, total[mine], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- training layouts
STEPS = 4  # top-k routing is discontinuous: tests/parallel/test_moe_layouts.py says why MoE layouts compare 4 steps
TWO = [dict(expert=2, moe="Dropless"), dict(expert=2, moe="GShard", shared=True, checkpoint=1.0)]
FOUR = [dict(expert=2, moe="Dropless"),  # expert groups [0, 1] [2, 3], each expert's shards over [0, 2] or [1, 3]
        dict(expert=4, moe="GShard", shared=True),  # one expert group: every rank holds 2 of the 8 experts whole
        dict(expert=2, pp=2, moe="Dropless"),  # expert groups within each stage
        dict(expert=2, pp=2, chunks=2, moe="Dropless"),  # interleaved 1F1B
        dict(expert=2, pp=2, schedule="ZBV", chunks=2, moe="GShard"),
        dict(expert=2, tp=2, mode="msp", moe="Dropless"),  # groups [0, 2] [1, 3]: each tensor rank's own tokens
        dict(expert=2, tp=2, mode="fsp", moe="GShard", checkpoint=1.0),
        dict(expert=2, tp=2, mode="mtp", moe="GShard", shared=True),  # each tensor rank half of the shared tokens
        dict(expert=2, tp=2, mode="isp", moe="Dropless"),
        dict(expert=2, tp=2, mode="isp", weight=2, moe="GShard", shared=True)]


def one_process(layout: dict, world: int) -> dict:
    data_ranks = world // (layout.get("pp", 1) * layout.get("tp", 1))
    return dict(micro_num=2 * data_ranks, moe=layout["moe"], shared=layout.get("shared", False),
                chunks=layout.get("chunks", 1), steps=STEPS)


def assert_same_first_gradients(run: dict, single: dict, what: str) -> None:
    """After the first step, every router and expert gradient within 1e-5 relative (the tensor's norm)."""
    assert run["first_grads"] and set(run["first_grads"]) == set(single["first_grads"]), what
    for name, want in single["first_grads"].items():
        error = float((run["first_grads"][name] - want).norm() / want.norm())
        assert error <= 1e-5, f"{what}: {name} gradient off by {error:.2g} relative"


@pytest.mark.slow  # about 2.5 minutes on the 2-core machine: two and four processes
def test_expert_parallel_layouts_train_as_one_process(tmp_path):
    """configs/tiny_moe.py's experts (tests/parallel/layouts.py) spread over expert groups of 2 and 4, with ZeRO
    over the data ranks (the expert-data groups shard each rank's experts), GShard's capacity, a gated shared
    expert, activation checkpointing, pipeline stages (1F1B, interleaved, ZBV) and every tensor mode (msp, fsp, mtp, isp with and
    without weight groups): per-step loss, gradient norm (each expert counted once: pytorch/pytorch#160285 doubled
    it) and moe_loss, validation and the final weights within 1e-5 of one process's, and every router and expert
    gradient of the first step within 1e-5 relative; each rank holds 1 / (data x tensor ranks) of every expert
    tensor, and the same of its Adam state."""
    from tests.parallel.layouts import assert_same_training, merged, train_layouts

    for world, layouts in ((2, TWO), (4, FOUR)):
        singles = train_layouts(0, 1, str(tmp_path / f"single{world}"), [one_process(la, world) for la in layouts])
        ranks = run_distributed(train_layouts, world, str(tmp_path / f"run{world}"),
                                [dict(layout, steps=STEPS) for layout in layouts])
        for i, (layout, single) in enumerate(zip(layouts, singles)):
            run, what = merged(ranks, i), f"{world} ranks {layout}"
            assert_same_training(run, single, what, steps=STEPS)
            assert_same_first_gradients(run, single, what)
            moe = [[r["moe_loss"] for r in out["records"] if "loss" in r] for out in (run, single)]
            assert moe[0] == pytest.approx(moe[1], rel=1e-5), layout
            sharing = world // layout.get("pp", 1)  # the ranks of a stage: expert group x expert-data x tensor
            for rank in range(world):
                sizes, adam = ranks[rank][i]["local_numel"], ranks[rank][i]["optimizer_numel"]
                experts = [n for n in sizes if ".experts." in n]
                assert experts or layout.get("pp"), (layout, rank)
                for name in experts:
                    assert sizes[name] * sharing == single["weights"][name].numel() == adam[name] * sharing


def _mtp_block(rank: int, world: int) -> dict:
    """4 ranks as tp=2 x dp=2 under mtp: ranks 0, 1 share tokens, as do 2, 3; expert groups [0, 2] and [1, 3]. The
    expert-parallel block's routed experts with the tensor pair's tokens, and the rows each rank dispatched."""
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    data, tensor = rank // 2, rank % 2
    x, ids, weights, w1, w3, w2 = case(data, 10, **SHAPE)  # 10 tokens: pieces of 5
    mine = slice(data * 4, data * 4 + 4)  # 8 experts over the expert group's 2 ranks: its data rank's half
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1[mine], w3[mine], w2[mine])]
    block = expert.ExpertParallelBlock()
    block.expert_group, block.tensor_group = ep_groups[tensor], tp_groups[data]
    rows = []
    real = expert.expert_parallel_experts
    expert.expert_parallel_experts = lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k)
    try:
        out = block.routed(leaves[0], ids, leaves[1], *leaves[2:])
    finally:
        expert.expert_parallel_experts = real
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(data), dtype=out.dtype))
    return {"out": out.detach(), "grads": [t.grad for t in leaves], "rows": rows}


def test_under_mtp_each_tensor_rank_takes_its_piece_of_the_shared_tokens():
    """No repeated expert work: each tensor rank dispatches half of the tokens the pair shares; the pair's outputs
    and the tokens' and weights' gradients are one process's; each expert's gradient summed over the tensor ranks
    that hold it (FSDP2 sums them, with the expert-data ranks) is one process's."""
    got = run_distributed(_mtp_block, 4)
    totals = None
    for data in (0, 1):
        x, ids, weights, w1, w3, w2 = case(data, 10, **SHAPE)
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w3, w2)]
        out = reference.moe_experts(leaves[0], ids, leaves[1], *leaves[2:])
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(data), dtype=out.dtype))
        totals = [leaf.grad for leaf in leaves[2:]] if totals is None else [t + leaf.grad for t, leaf in
                                                                             zip(totals, leaves[2:])]
        for rank in (2 * data, 2 * data + 1):
            assert got[rank]["rows"] == [5]
            torch.testing.assert_close(got[rank]["out"], out.detach(), rtol=1e-12, atol=1e-12)
            for g, want in zip(got[rank]["grads"][:2], (leaves[0].grad, leaves[1].grad)):
                torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    for data in (0, 1):  # experts [4 d, 4 d + 4) on ranks 2 d and 2 d + 1: each got its tensor rank's halves
        for j, total in enumerate(totals):
            summed = got[2 * data]["grads"][2 + j] + got[2 * data + 1]["grads"][2 + j]
            torch.testing.assert_close(summed, total[4 * data:4 * data + 4], rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # about 40 s: one, two and four processes
def test_a_checkpoint_at_one_expert_size_continues_at_another(tmp_path):
    """2 steps at expert size 2 (2 ranks), saved; from that checkpoint one process (every expert whole), expert
    size 4 (4 ranks, the same global batch) and dp 2 x tp 2 msp (experts whole, replicated) continue to step 4: each equals the uninterrupted one-process run
    (1e-5 relative, tests/parallel/test_resume.py's check). DCP reshards the experts between sizes. (Four steps in
    all: later, a token whose k-th and (k+1)-th router scores are within the layouts' last-bit differences may
    choose another expert, tests/parallel/test_moe_layouts.py.)"""
    from tests.parallel.test_resume import assert_continues, part

    moe = dict(moe="Dropless")
    first = part(2, tmp_path / "ep2", dict(moe, expert=2), 2, 4)
    saved = tmp_path / "ep2" / "checkpoints" / "2"
    straight = part(1, tmp_path / "straight", dict(moe, micro_num=4), 4, 4)
    one = part(1, tmp_path / "ep1", dict(moe, micro_num=4), 4, 4, saved)
    four = part(4, tmp_path / "ep4", dict(moe, expert=4, micro_num=1), 4, 4, saved)
    tensor = part(4, tmp_path / "tp", dict(moe, tp=2, mode="msp"), 4, 4, saved)  # experts whole, split over tp
    assert_continues(first, one, straight, "expert size 2 -> one process")
    assert_continues(first, four, straight, "expert size 2 -> 4")
    assert_continues(first, tensor, straight, "expert size 2 -> dp 2 x tp 2, experts whole")
