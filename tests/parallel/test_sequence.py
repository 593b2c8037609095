"""Ulysses' exchange (evo/parallel/sequence.py) on 2 gloo ranks: attention over sequence shards, through
seq_to_head -> varlen attention on the full row with local heads (GQA) -> head_to_seq, gives each rank its
rows of one process's attention over the whole packed row, forward and backward; documents cross the shard
boundary."""

import torch

from tests.dist import run_distributed

TOKENS, HEADS, KV_HEADS, D = 24, 4, 2, 8
CU = [0, 5, 17, 24]  # the second document spans both ranks' shards (12 tokens each)


def inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(TOKENS, h, D, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)] + \
        [torch.randn(TOKENS, HEADS, D, generator=g)]  # q, k, v, the output gradient


def attention(q, k, v):
    from evo.kernels import reference

    cu = torch.tensor(CU, dtype=torch.int32)
    return reference.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)


def sharded(rank, world_size):
    import torch.distributed as dist

    from evo.parallel.sequence import head_to_seq, seq_to_head

    q, k, v, grad = inputs()
    n = TOKENS // world_size
    mine = slice(rank * n, (rank + 1) * n)
    local = [t[mine].clone().requires_grad_() for t in (q, k, v)]
    group = dist.group.WORLD
    full = [seq_to_head(t, group) for t in local]  # every token, this rank's head group
    assert full[0].shape == (TOKENS, HEADS // world_size, D) and full[1].shape == (TOKENS, KV_HEADS // world_size, D)
    out = head_to_seq(attention(*full), group)
    out.backward(grad[mine])
    return out.detach(), [t.grad for t in local]


def test_ulysses_exchange_gives_the_full_attention():
    q, k, v, grad = inputs()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*ref)
    out.backward(grad)
    n = TOKENS // 2
    for rank, (local_out, grads) in enumerate(run_distributed(sharded, 2)):
        mine = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(local_out, out.detach()[mine])
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r.grad[mine])
