"""Vocab-parallel cross-entropy, both backends: each of 2 gloo ranks holds half the vocabulary; every rank's loss,
returned z-loss and accuracy count, its logits / weight / bias shard's gradient (that shard's part of the full
one) and its hidden gradient (complete on every rank) must equal a single-process computation on the full
vocabulary: plain torch.nn.functional.cross_entropy math in fp64, written here (for precomputed_lse, flash-attn's
own semantics, the single-process reference evo.kernels.reference, checked in test_loss.py and test_reference.py).
One spawn runs both backends: the Triton module (through the interpreter on CPU) and the reference's
vocab-parallel path (_vocab_parallel_loss)."""

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist import run_distributed
from evo.kernels import loss as tri
from evo.kernels import reference as ref
from tests.kernels.oracle import DEVICE

ROWS, HIDDEN, VOCAB, WORLD = 24, 16, 1000, 2
SHARD = VOCAB // WORLD
IGNORE = -100
CONFIGS = [  # (label_smoothing, z_loss, logit_scale, reduction, precomputed_lse, bias)
    (0.0, 0.0, 1.0, "mean", False, False),
    (0.1, 1e-3, 1.0, "mean", False, True),
    (0.0, 1e-3, 0.7, "none", False, False),
    (0.2, 0.0, 1.3, "sum", False, True),
    (0.0, 1e-2, 1.0, "sum", True, False),  # flash-attn: under a process group, precomputed_lse is the shard's lse
]
LSE_SHIFT = 0.1  # added to each shard's precomputed lse (so to the combined one): its use shows in the loss
BACKENDS = {"triton": tri, "reference": ref}


def inputs():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, HIDDEN, generator=gen, device="cpu")
    w = torch.randn(VOCAB, HIDDEN, generator=gen, device="cpu") / 4
    bias = torch.randn(VOCAB, generator=gen, device="cpu") / 4
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen, device="cpu")
    labels[3] = labels[13] = IGNORE
    labels[4], labels[5] = SHARD - 1, SHARD  # the last of rank 0's shard, the first of rank 1's
    # rows 6..11 labelled with their argmax (a margin >= 0.09 in fp64): 3 in each shard, so the accuracy count is
    # not 0 (where a doubled or a shard-local count would go unnoticed)
    labels[6:12] = (h.double() @ w.double().T)[6:12].argmax(-1)
    return h.to(DEVICE), w.to(DEVICE), bias.to(DEVICE), labels.to(DEVICE)  # gloo reduces CUDA tensors too


def cotangent(loss):
    """The gradient fed to backward: the same on every rank, not 1 (a loss whose backward ignored it would show),
    per token with reduction='none'."""
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(loss.shape, generator=gen, device="cpu") + 0.5).to(loss.device, loss.dtype)


def sharded(rank, world_size):
    """This rank's results for each backend and config (the one spawn of this module); a backend that raises
    gets its traceback instead, which fails its own test only."""
    h, w, bias, labels = inputs()
    results = {}
    for name, module in BACKENDS.items():
        try:
            results[name] = [one_config(module, rank, h, w, bias, labels, config) for config in CONFIGS]
        except Exception:
            results[name] = traceback.format_exc()
    return results


def one_config(module, rank, h, w, bias, labels, config):
    smoothing, z_loss, scale, reduction, precomputed, with_bias = config
    lo, hi = rank * SHARD, (rank + 1) * SHARD
    opts = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction, logit_scale=scale,
                process_group=dist.group.WORLD)
    w_local = w[lo:hi].clone().requires_grad_()
    b_local = bias[lo:hi].clone().requires_grad_() if with_bias else None
    logits = F.linear(h, w[lo:hi], bias[lo:hi] if with_bias else None).detach().requires_grad_()
    lse_local = torch.logsumexp(logits.detach(), -1) + LSE_SHIFT if precomputed else None
    if precomputed and module is ref:  # documented: the reference has no vocab-parallel precomputed_lse
        with pytest.raises(NotImplementedError, match="precomputed_lse"):
            ref.cross_entropy(logits, labels, return_z_loss=True, precomputed_lse=lse_local, **opts)
        lse_local = None  # the reference's case is then the plain one
    ce, z_part = module.cross_entropy(logits, labels, return_z_loss=True, precomputed_lse=lse_local, **opts)
    ce.backward(cotangent(ce))
    alone = module.cross_entropy(logits.detach(), labels, precomputed_lse=lse_local, **opts)  # no z-loss asked
    hh = h.clone().requires_grad_()
    chunk = dict(vocab_chunk=128) if module is tri else {}  # several chunks per shard
    flce, correct = module.fused_linear_cross_entropy(hh, w_local, labels, bias=b_local, return_accuracy=True,
                                                      **chunk, **opts)
    flce.backward(cotangent(flce))
    return {"ce": ce.detach().cpu(), "z": z_part.cpu(), "dlogits": logits.grad.cpu(), "flce": flce.detach().cpu(),
            "dh": hh.grad.cpu(), "dw": w_local.grad.cpu(), "db": b_local.grad.cpu() if with_bias else None,
            "correct": int(correct), "z_requires_grad": z_part.requires_grad, "alone": alone}


def reduce(per_token, valid, reduction):
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / valid.sum()


def plain(logits, labels, smoothing, z_loss, scale, reduction):
    """(loss, z-loss part) from the full logits: F.cross_entropy's label smoothing is s * (lse - mean(x))."""
    x = logits * scale
    valid = labels != IGNORE
    ce = F.cross_entropy(x, labels, ignore_index=IGNORE, label_smoothing=smoothing, reduction="none")
    z_part = torch.where(valid, z_loss * torch.logsumexp(x, -1).square(), torch.zeros_like(ce))
    return reduce(ce + z_part, valid, reduction), reduce(z_part, valid, reduction).detach()


def expected(config, precomputed_lse):
    """The full-vocabulary results in fp64: cross-entropy (precomputed_lse: through the single-process reference,
    whose use of it is flash-attn's) and the fused linear one (plain math)."""
    smoothing, z_loss, scale, reduction, _, with_bias = config
    h, w, bias, labels = (t.cpu() for t in inputs())
    h, w, bias = h.double().requires_grad_(), w.double().requires_grad_(), bias.double().requires_grad_()
    b = bias if with_bias else None
    logits = F.linear(h, w, b).detach().requires_grad_()
    if precomputed_lse:
        lse = torch.logsumexp(logits.detach(), -1) + LSE_SHIFT
        ce, z_part = ref.cross_entropy(logits, labels, label_smoothing=smoothing, z_loss=z_loss, reduction=reduction,
                                       logit_scale=scale, return_z_loss=True, precomputed_lse=lse)
    else:
        ce, z_part = plain(logits, labels, smoothing, z_loss, scale, reduction)
    ce.backward(cotangent(ce))
    full_logits = F.linear(h, w, b)
    flce, _ = plain(full_logits, labels, smoothing, z_loss, scale, reduction)
    flce.backward(cotangent(flce))
    valid = labels != IGNORE
    correct = int(((full_logits.detach() * scale).argmax(-1) == labels)[valid].sum())
    return {"ce": ce.detach(), "z": z_part, "dlogits": logits.grad, "flce": flce.detach(), "dh": h.grad,
            "dw": w.grad, "db": bias.grad if with_bias else None, "correct": correct}


def close(name, a, b):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


class _Ranks(list):
    def __repr__(self):  # a failure report need not print every tensor
        return f"<{len(self)} ranks' results>"


@pytest.fixture(scope="module")
def per_rank():
    return _Ranks(run_distributed(sharded, WORLD))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_vocab_parallel_matches_the_full_vocabulary(per_rank, backend):
    for i, config in enumerate(CONFIGS):
        precomputed = config[4] and backend == "triton"
        want = expected(config, precomputed)
        assert 0 < want["correct"] < ROWS - 2  # the labels make the accuracy count informative
        results = [r[backend] for r in per_rank]
        for r in results:
            assert not isinstance(r, str), f"{backend} raised on a rank:\n{r}"
        results = [r[i] for r in results]
        where = f"{backend} {config}"
        for rank, r in enumerate(results):  # every rank: the full vocabulary's loss, hidden gradient and count
            for key in ("ce", "z", "flce", "dh"):
                close(f"{where} rank {rank} {key}", r[key], want[key])
            assert not r["z_requires_grad"], where
            close(f"{where} rank {rank} loss without return_z_loss", r["alone"], want["ce"])
            assert r["correct"] == want["correct"], (where, rank, r["correct"], want["correct"])
        # the shards' gradients, side by side, are the full one
        close(f"{where} dlogits", torch.cat([r["dlogits"] for r in results], 1), want["dlogits"])
        close(f"{where} dweight", torch.cat([r["dw"] for r in results], 0), want["dw"])
        if config[5]:
            close(f"{where} dbias", torch.cat([r["db"] for r in results], 0), want["db"])
