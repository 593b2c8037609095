"""Vocab-parallel cross-entropy: each of 2 gloo ranks holds half the vocabulary; the loss and the
gradients must equal the single-process full-vocab ones."""

import torch
import torch.distributed as dist

from dist import run_distributed
from evo.kernels import loss as tri
from oracle import DEVICE

ROWS, HIDDEN, VOCAB = 24, 16, 1000


def inputs():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, HIDDEN, generator=gen, device="cpu")
    w = torch.randn(VOCAB, HIDDEN, generator=gen, device="cpu") / 4
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen, device="cpu")
    labels[3] = -100
    return h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)  # gloo reduces CUDA tensors too


def sharded(rank, world_size, smoothing, z_loss):
    h, w, labels = inputs()
    shard = VOCAB // world_size
    w_local = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    logits = (h @ w_local.T).detach().requires_grad_()
    ce = tri.cross_entropy(logits, labels, label_smoothing=smoothing, z_loss=z_loss, process_group=dist.group.WORLD)
    ce.backward()
    h = h.clone().requires_grad_()
    flce, correct = tri.fused_linear_cross_entropy(h, w_local, labels, label_smoothing=smoothing, z_loss=z_loss,
                                                   process_group=dist.group.WORLD, return_accuracy=True,
                                                   vocab_chunk=128)
    flce.backward()
    return {"ce": ce.detach().cpu(), "dlogits": logits.grad.cpu(), "flce": flce.detach().cpu(), "dh": h.grad.cpu(),
            "dw": w_local.grad.cpu(), "correct": int(correct)}


def test_vocab_parallel_matches_full_vocab():
    h, w, labels = inputs()
    for smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-3)):
        results = run_distributed(sharded, 2, smoothing, z_loss)
        logits = (h @ w.T).requires_grad_()
        full = tri.cross_entropy(logits, labels, label_smoothing=smoothing, z_loss=z_loss)
        full.backward()
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        full_fl, correct = tri.fused_linear_cross_entropy(hh, ww, labels, label_smoothing=smoothing, z_loss=z_loss,
                                                          return_accuracy=True)
        full_fl.backward()
        for r in results:
            torch.testing.assert_close(r["ce"], full.cpu())
            torch.testing.assert_close(r["flce"], full_fl.cpu())
            torch.testing.assert_close(r["dh"], hh.grad.cpu())
            assert r["correct"] == int(correct)
        torch.testing.assert_close(torch.cat([r["dlogits"] for r in results], 1), logits.grad.cpu())
        torch.testing.assert_close(torch.cat([r["dw"] for r in results], 0), ww.grad.cpu())
