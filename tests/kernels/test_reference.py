"""The reference kernels (the CPU path) against independent formulations of the same math, in fp64."""

import math

import pytest
import torch
import torch.nn.functional as F

from evo import kernels
from evo.kernels import reference as ref


def test_rms_norm_and_fused_add():
    x, r, w = torch.randn(3, 5, 123, dtype=torch.float64), torch.randn(3, 5, 123, dtype=torch.float64), torch.randn(123)
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 123 + 1e-6) * w
    torch.testing.assert_close(ref.rms_norm(x, w), expected)
    normed, summed = ref.fused_add_rms_norm(x, r, w)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed, ref.rms_norm(x + r, w))


def naive_rotary(x, pos, base_angles, rot, interleaved):
    """x (t, h, d); rotates channel pairs by pos * angle, pair layout per GPT-NeoX or GPT-J."""
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(rot // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
            theta = pos[t] * base_angles[i]
            c, s = math.cos(theta), math.sin(theta)
            out[t, :, a] = x[t, :, a] * c - x[t, :, b] * s
            out[t, :, b] = x[t, :, a] * s + x[t, :, b] * c
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_varlen_positions_restart_and_partial_dim(interleaved):
    d, rot = 16, 12
    angles = [10000 ** (-2 * i / rot) for i in range(rot // 2)]
    table = torch.tensor([[p * a for a in angles] for p in range(64)], dtype=torch.float64)
    x = torch.randn(1 + 7 + 20, 2, d, dtype=torch.float64)
    cu = torch.tensor([0, 1, 8, 28], dtype=torch.int32)
    pos = [0] + list(range(7)) + list(range(20))
    expected = naive_rotary(x, [p + 3 for p in pos], angles, rot, interleaved)
    got = ref.apply_rotary_emb(x, table.cos(), table.sin(), interleaved, cu_seqlens=cu, max_seqlen=20, seqlen_offsets=3)
    torch.testing.assert_close(got, expected)
    # batched layout with per-batch offsets
    xb = torch.randn(2, 5, 2, d, dtype=torch.float64)
    offs = torch.tensor([0, 4])
    got = ref.apply_rotary_emb(xb, table.cos(), table.sin(), interleaved, seqlen_offsets=offs)
    for b in range(2):
        torch.testing.assert_close(got[b], naive_rotary(xb[b], [p + int(offs[b]) for p in range(5)], angles, rot,
                                                        interleaved))
    y = xb.clone()
    assert ref.apply_rotary_emb(y, table.cos(), table.sin(), interleaved, inplace=True) is y


def naive_attention(q, k, v, causal, window=(-1, -1), softcap=0.0):
    """Loops over (head, query); GQA by index arithmetic; bottom-right aligned masks."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[:2]
    out = torch.zeros_like(q)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(sq):
            allowed = []
            for j in range(sk):
                ok = True
                if causal and j > i + sk - sq:
                    ok = False
                if window[0] >= 0 and j < i + sk - sq - window[0]:
                    ok = False
                if window[1] >= 0 and j > i + sk - sq + window[1]:
                    ok = False
                allowed.append(ok)
            if not any(allowed):
                continue
            s = (k[:, kh] @ q[i, h]) / math.sqrt(d)
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~torch.tensor(allowed), -math.inf)
            out[i, h] = torch.softmax(s, 0) @ v[:, kh]
    return out


@pytest.mark.parametrize("causal, window, softcap", [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0),
                                                      (True, (3, 0), 0.0), (False, (2, 1), 5.0)])
def test_varlen_attention_matches_naive(causal, window, softcap):
    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 8, 19], dtype=torch.int32)
    q, k, v = (torch.randn(19, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    got, lse, _ = ref.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=causal, window_size=window,
                                             softcap=softcap, return_attn_probs=True)
    assert lse.shape == (4, 19)
    fast = ref.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=causal, window_size=window, softcap=softcap)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = naive_attention(q[a:b], k[a:b], v[a:b], causal, window, softcap)
        torch.testing.assert_close(got[a:b], expected)
        torch.testing.assert_close(fast[a:b], expected)


def test_causal_cross_attention_is_bottom_right_aligned_and_empty_rows_are_zero():
    q, k, v = torch.randn(1, 5, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8, dtype=torch.float64), \
        torch.randn(1, 3, 2, 8, dtype=torch.float64)
    out = ref.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out[0], naive_attention(q[0], k[0], v[0], True))
    assert torch.all(out[0, :2] == 0)  # queries 0 and 1 see no key


@pytest.mark.parametrize("smoothing, z_loss, reduction", [(0.0, 0.0, "mean"), (0.1, 0.0, "sum"), (0.0, 1e-4, "none"),
                                                          (0.1, 1e-4, "mean")])
def test_cross_entropy_against_torch(smoothing, z_loss, reduction):
    logits = torch.randn(23, 100, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 100, (23,))
    labels[[2, 5]] = -7
    got = ref.cross_entropy(logits, labels, ignore_index=-7, label_smoothing=smoothing, z_loss=z_loss,
                            reduction=reduction)
    per_token = F.cross_entropy(logits, labels, ignore_index=-7, label_smoothing=smoothing, reduction="none")
    lse = torch.logsumexp(logits, -1)
    per_token = per_token + torch.where(labels != -7, z_loss * lse**2, torch.zeros_like(lse))
    expected = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / 21}[reduction]
    torch.testing.assert_close(got, expected)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = ref.cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0


def test_fused_linear_cross_entropy_and_accuracy():
    gen = torch.Generator().manual_seed(5)
    h, w, b = (torch.randn(*shape, generator=gen) for shape in ((9, 16), (50, 16), (50,)))
    logits = h @ w.T + b
    labels = (logits.argmax(-1) + 1) % 50  # every prediction wrong ...
    labels[[1, 4, 7]] = logits.argmax(-1)[[1, 4, 7]]  # ... but three
    labels[[0, 4]] = -100  # one of them ignored
    loss, correct = ref.fused_linear_cross_entropy(h, w, labels, bias=b, return_accuracy=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert int(correct) == 2


def test_swiglu():
    g, u = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    torch.testing.assert_close(ref.swiglu(g, u), g / (1 + torch.exp(-g)) * u)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("EVO_KERNEL_BACKEND", raising=False)
    assert kernels.backend() == "auto"
    with kernels.use_backend("torch"):
        assert kernels.backend() == "torch"
    monkeypatch.setenv("EVO_KERNEL_BACKEND", "triton")
    assert kernels.backend() == "triton"
    monkeypatch.setenv("EVO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="EVO_KERNEL_BACKEND must be one of auto, triton, torch"):
        kernels.backend()
    with pytest.raises(ValueError):
        with kernels.use_backend("fast"):
            pass
    with kernels.use_backend("torch"):  # the context wins over the environment
        x = torch.randn(2, 8)
        torch.testing.assert_close(kernels.rms_norm(x, torch.ones(8)), ref.rms_norm(x, torch.ones(8)))
