"""The model on the Triton kernels (interpreter on CPU) against the same model on the reference kernels."""

import pytest
import torch

from tests.helpers import small_sections
from evo import kernels
from evo.config import config_from_dict
from evo.data.builtin import dummy_corpus
from evo.data.packing import PackedRows
from evo.model import build_model
from tests.kernels.oracle import DEVICE


def train_three_steps(backend):
    cfg = config_from_dict(small_sections()).model  # 2 layers, hidden 64, GQA
    model = build_model(cfg, DEVICE, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = PackedRows(dummy_corpus(50, 32, cfg.vocab_size, seed=1), seq_len=32, micro_bsz=2)
    losses, grads = [], []
    with kernels.use_backend(backend):
        for step in range(3):
            row = rows[step]
            ids, labels = torch.from_numpy(row["input_ids"]).to(DEVICE), torch.from_numpy(row["labels"]).to(DEVICE)
            cu = torch.from_numpy(row["cu_seqlens"]).to(DEVICE)
            token_loss = model(ids, cu, int((cu[1:] - cu[:-1]).max()), labels=labels)
            loss = token_loss.sum() / (labels != -100).sum()
            opt.zero_grad()
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
    return losses, grads


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_triton_backend_matches_reference_for_three_steps():
    ref_losses, ref_grads = train_three_steps("torch")
    tri_losses, tri_grads = train_three_steps("triton")
    assert tri_losses == pytest.approx(ref_losses, rel=1e-5)
    for step, (a, b) in enumerate(zip(tri_grads, ref_grads)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 8, device="cpu"), torch.ones(8, device="cpu"))
