"""Models start sharded: ``configs/internlm2_7b.py`` under tp=8 and under ZeRO over 8 is built on the meta
device and parallelized on 8 ranks; no rank holds more than its share of any weight. On a small model, the
materialized shards of every layout hold exactly the values one process draws (same seed)."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.dist import run_distributed
from tests.helpers import ROOT

TP_SPLIT = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight",
            "tok_embeddings.weight", "output.weight")


def shard_sizes(rank, world_size, layouts):
    """Per layout: {name: (local numel, full numel)} of this rank's parameters, built on meta."""
    from evo.config import load_config
    from evo.model import DecoderModel
    from evo.parallel import build_context, memory_estimate, parallelize

    cfg = load_config(ROOT / "configs" / "internlm2_7b.py").model
    out = []
    for tp, zero1 in layouts:
        ctx = build_context(world_size, rank, 0, torch.device("cpu"), 1, tp, zero1, "msp")
        with torch.device("meta"):
            model = DecoderModel(cfg)
        parallelize(model, ctx, cfg)
        sizes = {n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel(), tuple(p.shape))
                 for n, p in model.named_parameters()}
        out.append((sizes, memory_estimate(model, ctx, cfg)))
    return out


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_internlm2_7b_builds_sharded_on_eight_ranks():
    ranks = run_distributed(shard_sizes, 8, [(8, 1), (1, -1)])
    shapes = {n: shape for n, (_, shape) in ranks[0][0][0].items()}
    full = sum(torch.Size(shape).numel() for shape in shapes.values())
    assert full == 7_737_708_544
    for rank, ((tp8, tp8_mem), (zero8, zero8_mem)) in enumerate(ranks):
        for name, (local, shape) in tp8.items():  # tp=8: every matrix split in 8, norms replicated
            n = torch.Size(shape).numel()
            assert local == (n // 8 if name.endswith(TP_SPLIT) else n), (rank, name)
        for name, (local, shape) in zero8.items():  # ZeRO over 8: this rank's block of rows, nothing more
            rows, chunk = shape[0], -(-shape[0] // 8)
            assert local == max(0, min(chunk, rows - rank * chunk)) * (torch.Size(shape).numel() // rows), name
        held = sum(local for local, _ in zero8.values())
        assert held <= full / 8 * 1.001
        # per rank: fp32 masters and gradients 4 bytes a held parameter each, AdamW's two moments 8
        assert zero8_mem["optimizer_state"] == 8 * held and zero8_mem["master_weights"] == 4 * held
        assert tp8_mem["master_weights"] == 4 * sum(local for local, _ in tp8.values())


def same_values(rank, world_size, layouts):
    """The tiny model's parameters, gathered whole, right after a sharded build under each layout."""
    from evo.config import config_from_dict
    from evo.parallel import build_context, build_parallel_model

    cfg = config_from_dict({"model": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2,
                                          vocab_size=300, multiple_of=32, dtype="torch.bfloat16", qk_norm=True,
                                          qkv_bias=True)}).model
    out = []
    for tp, zero1, mode in layouts:
        model = build_parallel_model(cfg, build_context(world_size, rank, 0, torch.device("cpu"), 1, tp, zero1, mode),
                                     seed=5)
        out.append({n: p.full_tensor() for n, p in model.named_parameters()})
    return out


def test_every_layout_starts_from_the_values_of_one_process():
    from evo.config import config_from_dict
    from evo.model import build_model

    layouts = [(2, 1, "mtp"), (2, 1, "msp"), (1, -1, "mtp"), (1, 1, "mtp")]
    ranks = run_distributed(same_values, 2, layouts)
    cfg = config_from_dict({"model": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2,
                                          vocab_size=300, multiple_of=32, dtype="torch.float32", qk_norm=True,
                                          qkv_bias=True)}).model
    one = dict(build_model(cfg, "cpu", seed=5).named_parameters())
    for layout, weights in zip(layouts, ranks[0]):
        assert weights.keys() == one.keys()
        for name, w in weights.items():  # fp32 masters under FSDP2: exactly what one process draws in fp32
            assert torch.equal(w, one[name]), (layout, name)
