"""Vocab-parallel cross-entropy: each of 2 gloo ranks holds half the vocabulary; the loss, the returned z-loss,
the gradients and the accuracy count must equal the single-process reference (evo.kernels.reference) on the
full vocabulary, itself checked against plain math in test_loss.py and test_reference.py."""

import torch
import torch.distributed as dist

from dist import run_distributed
from evo.kernels import loss as tri
from evo.kernels import reference as ref
from oracle import DEVICE

ROWS, HIDDEN, VOCAB = 24, 16, 1000
CONFIGS = [  # (label_smoothing, z_loss, logit_scale, reduction, precomputed_lse)
    (0.0, 0.0, 1.0, "mean", False),
    (0.1, 1e-3, 1.0, "mean", False),
    (0.0, 1e-3, 0.7, "none", False),
    (0.0, 1e-2, 1.0, "sum", True),  # flash-attn: under a process group, precomputed_lse is the shard's lse
]
LSE_SHIFT = 0.1  # added to each shard's precomputed lse (so to the combined one): its use shows in the loss


def inputs():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, HIDDEN, generator=gen, device="cpu")
    w = torch.randn(VOCAB, HIDDEN, generator=gen, device="cpu") / 4
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen, device="cpu")
    labels[3] = -100
    labels[4], labels[5] = VOCAB // 2 - 1, VOCAB // 2  # the last of rank 0's shard, the first of rank 1's
    return h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)  # gloo reduces CUDA tensors too


def sharded(rank, world_size):
    h, w, labels = inputs()
    shard = VOCAB // world_size
    results = []
    for smoothing, z_loss, scale, reduction, precomputed in CONFIGS:
        opts = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction, logit_scale=scale,
                    process_group=dist.group.WORLD)
        w_local = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        logits = (h @ w_local.T).detach().requires_grad_()
        lse_local = torch.logsumexp(logits.detach(), -1) + LSE_SHIFT if precomputed else None
        ce, z_part = tri.cross_entropy(logits, labels, return_z_loss=True, precomputed_lse=lse_local, **opts)
        ce.backward(torch.ones_like(ce))
        hh = h.clone().requires_grad_()
        flce, correct = tri.fused_linear_cross_entropy(hh, w_local, labels, return_accuracy=True, vocab_chunk=128,
                                                       **opts)
        flce.backward(torch.ones_like(flce))
        results.append({"ce": ce.detach().cpu(), "z": z_part.cpu(), "dlogits": logits.grad.cpu(),
                        "flce": flce.detach().cpu(), "dh": hh.grad.cpu(), "dw": w_local.grad.cpu(),
                        "correct": int(correct)})
    return results


def close(a, b):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)


def test_vocab_parallel_matches_the_single_process_reference():
    h, w, labels = inputs()
    per_rank = run_distributed(sharded, 2)
    for i, (smoothing, z_loss, scale, reduction, precomputed) in enumerate(CONFIGS):
        opts = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction, logit_scale=scale)
        logits = (h.double() @ w.double().T).requires_grad_()
        lse = torch.logsumexp(logits.detach(), -1) + LSE_SHIFT if precomputed else None
        full, z_full = ref.cross_entropy(logits, labels, return_z_loss=True, precomputed_lse=lse, **opts)
        full.backward(torch.ones_like(full))
        hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
        full_fl, correct = ref.fused_linear_cross_entropy(hh, ww, labels, return_accuracy=True, **opts)
        full_fl.backward(torch.ones_like(full_fl))
        results = [r[i] for r in per_rank]
        for r in results:
            close(r["ce"], full.detach().cpu())
            close(r["z"], z_full.cpu())
            close(r["flce"], full_fl.detach().cpu())
            close(r["dh"], hh.grad.cpu())
            assert r["correct"] == int(correct)
        close(torch.cat([r["dlogits"] for r in results], 1), logits.grad.cpu())
        close(torch.cat([r["dw"] for r in results], 0), ww.grad.cpu())
