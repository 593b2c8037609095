"""Triton MoE kernels (through the interpreter on CPU): the routing metadata against a Python loop over the
assignments, and grouped_mm against the per-group matmuls of its definition (fp64 exact, the oracle's bounds),
forward and backward, on ragged and empty groups; and against torch._grouped_mm, the spec, where it runs here."""

import pytest
import torch

import evo.kernels as K
from evo.kernels import moe as tri
from evo.kernels import reference as ref
from tests.kernels.interpreter_bf16 import interpreter_max_slack, round_as_interpreter
from tests.kernels.oracle import assert_oracle, run_with_grads


def loop_routing(ids, num_experts):
    """The routing written out: each expert's assignments in token order, experts one after another."""
    flat = ids.reshape(-1).tolist()
    per_expert = [[a for a, e in enumerate(flat) if e == expert] for expert in range(num_experts)]
    order = [a for assignments in per_expert for a in assignments]
    slots = [0] * len(flat)
    for row, a in enumerate(order):
        slots[a] = row
    counts = [len(x) for x in per_expert]
    ends = [sum(counts[:e + 1]) for e in range(num_experts)]
    return counts, ends, slots, order


@pytest.mark.parametrize("tokens, k, experts", [(37, 2, 6), (1, 1, 1), (600, 4, 8), (5, 3, 16)])
@pytest.mark.parametrize("impl", [tri.moe_routing, ref.moe_routing])
def test_routing_sorts_assignments_by_expert_stably(tokens, k, experts, impl):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, k), generator=gen)
    if experts > 2:
        ids[ids == 1] = 0  # expert 1 gets no token
        ids[ids == experts - 1] = 0  # nor does the last
    got = impl(ids.to(torch.get_default_device()), experts)
    assert [t.dtype for t in got] == [torch.int32, torch.int32, torch.int64, torch.int64]
    assert [t.tolist() for t in got] == list(loop_routing(ids, experts))


def test_routing_takes_int32_ids_and_refuses_ids_out_of_range(monkeypatch):
    ids = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    assert [t.tolist() for t in tri.moe_routing(ids, 3)] == list(loop_routing(ids, 3))
    with pytest.raises(ValueError, match=r"expert id 3 \(assignment 2\) is outside \[0, 3\)"):
        ref.moe_routing(torch.tensor([[0, 1], [3, 0]]), 3)
    monkeypatch.setenv("EVO_DEBUG", "1")
    with K.use_backend("triton"), pytest.raises(ValueError, match="expert id -1"):
        K.moe_routing(torch.tensor([[0, -1]]), 3)
    with pytest.raises(ValueError, match="integer expert ids"):
        K.moe_routing(torch.zeros(2, 2), 3)


def exact_grouped_mm(a, b, offs):
    """The definition: each group's rows times its matrix, in the dtype given (fp64 here)."""
    ends = offs.tolist()
    return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends))])


def plain_grouped_mm(a, b, offs):
    """The same-dtype PyTorch loop: the error a plain implementation makes in the input dtype (bf16 matmuls
    accumulate in fp32 and round once, as the kernel does)."""
    return exact_grouped_mm(a, b, offs)


GROUPS = {"ragged": [5, 0, 17, 1, 40, 0], "first and last empty": [0, 33, 2, 0], "one": [29], "all empty but one":
          [0, 0, 18, 0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("transposed_b", [False, True])
def test_grouped_mm_forward_and_backward(sizes, dtype, transposed_b):
    gen = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    m, k, n = sum(sizes), 24, 20
    a = torch.randn(m, k, generator=gen).to(dtype).to(torch.get_default_device())
    b = torch.randn(len(sizes), k, n, generator=gen).to(dtype).to(a.device)
    if transposed_b:  # as the model passes a Linear-style (G, N, K) weight: a strided view, not a copy
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    offs = torch.tensor(sizes, device=a.device).cumsum(0).to(torch.int32)
    k_out, k_grad = run_with_grads(lambda x, w: tri.grouped_mm(x, w, offs), [a, b])
    p_out, p_grad = run_with_grads(lambda x, w: plain_grouped_mm(x, w, offs), [a, b])
    e_out, e_grad = run_with_grads(lambda x, w: exact_grouped_mm(x, w, offs), [a.double(), b.double()])
    rounded = round_as_interpreter(exact_grouped_mm(a.float(), b.float(), offs), dtype)  # rounded as the kernel's store
    assert_oracle("out", k_out[0], rounded, e_out[0], dtype, max_slack=interpreter_max_slack(k_out[0], e_out[0]))
    for name, kg, pg, eg in zip(("da", "db"), k_grad, p_grad, e_grad):
        assert_oracle(name, kg, pg, eg, dtype, grad=True, max_slack=interpreter_max_slack(kg, eg))
    empty = [g for g, size in enumerate(sizes) if size == 0]
    assert not k_grad[1][empty].any()  # an empty group's db is zero, not left uninitialised


def test_grouped_mm_matches_torch_grouped_mm():
    """torch._grouped_mm is the spec; on a CPU it runs fp32 with aligned strides and a dense cotangent."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(46, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)
    offs = torch.tensor([9, 9, 30, 46], dtype=torch.int32)
    ours, ours_grad = run_with_grads(lambda x, w: K.grouped_mm(x, w, offs), [a, b])
    with K.use_backend("triton"):
        tri_out, tri_grad = run_with_grads(lambda x, w: K.grouped_mm(x, w, offs), [a, b])
    spec, spec_grad = run_with_grads(lambda x, w: torch._grouped_mm(x, w, offs=offs), [a.cpu(), b.cpu()])
    for got, grads in ((ours, ours_grad), (tri_out, tri_grad)):
        torch.testing.assert_close(got[0].cpu(), spec[0], rtol=1e-5, atol=1e-5)
        for g, s in zip(grads, spec_grad):
            torch.testing.assert_close(g.cpu(), s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offs, message", [([3, 9], "ending at a's rows"), ([5, 3, 10], "non-decreasing"),
                                           ([-1, 10], "non-decreasing")])
def test_grouped_mm_refuses_bad_offsets(offs, message):
    a, b = torch.randn(10, 4), torch.randn(len(offs), 4, 3)
    with pytest.raises(ValueError, match=message):
        K.grouped_mm(a, b, torch.tensor(offs, dtype=torch.int32))


def test_grouped_mm_refuses_bad_shapes_and_dtypes():
    a, b, offs = torch.randn(10, 4), torch.randn(2, 4, 3), torch.tensor([4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        K.grouped_mm(a, b, offs.long())
    with pytest.raises(ValueError, match=r"one end per group"):
        K.grouped_mm(a, b, offs[:1])
    with pytest.raises(ValueError, match=r"a \(M, K\) and b \(G, K, N\)"):
        K.grouped_mm(a, b.transpose(1, 2), offs)
    with pytest.raises(ValueError, match="one floating dtype"):
        K.grouped_mm_unchecked(a, b.double(), offs)


def test_grouped_mm_writes_db_in_the_weights_layout():
    """A Linear-style weight w (G, N, K) enters as b = w.transpose(1, 2): its gradient is written in w's layout, so
    autograd keeps it as w.grad without copying."""
    w = torch.randn(3, 6, 8, requires_grad=True)
    a = torch.randn(9, 8)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    out = tri.grouped_mm(a, w.transpose(1, 2), offs)
    out.backward(torch.randn(out.shape))
    assert w.grad.is_contiguous()
    expected = exact_grouped_mm(a.double(), w.detach().double().transpose(1, 2), offs)
    assert torch.allclose(out.double(), expected, atol=1e-5)
