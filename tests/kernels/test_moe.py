"""Triton MoE kernels (through the interpreter on CPU): the routing metadata against a Python loop over the
assignments, and grouped_mm against the per-group matmuls of its definition (fp64 exact, the oracle's bounds),
forward and backward, on ragged and empty groups; and against torch._grouped_mm, the spec, where it runs here."""

import pytest
import torch

import evo.kernels as K
from evo.kernels import moe as tri
from evo.kernels import reference as ref
from tests.kernels.interpreter_bf16 import interpreter_max_slack, round_as_interpreter
from evo.kernels.triton_utils import interpreting
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


def loop_experts(x, ids, weights, w1, w3, w2, rnd=lambda t: t):
    """The routed experts as transformers' Mixtral block computes them: expert by expert, its tokens' outputs
    weighted and added into place (no sorting, no grouped GEMM). ``rnd`` is applied to each intermediate."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, choice = torch.where(ids == e)
        v = x[token]
        h = rnd(torch.nn.functional.silu(rnd(v @ w1[e].T)) * rnd(v @ w3[e].T))
        out = out.index_add(0, token, rnd(rnd(h @ w2[e].T) * weights[token, choice, None].to(h.dtype)))
    return out


class RoundedAsInterpreter(torch.autograd.Function):
    """Identity in fp32 whose value and gradient are rounded to bf16 as the interpreter's stores round them."""

    @staticmethod
    def forward(ctx, t):
        return round_as_interpreter(t, torch.bfloat16).float()

    @staticmethod
    def backward(ctx, grad):
        return round_as_interpreter(grad, torch.bfloat16).float()


def plain_experts(floats, ids, dtype):
    """The loop in ``dtype``: the error a plain implementation makes. Under the interpreter, bf16 is the loop in fp32
    rounded toward zero wherever the kernels store (the interpreter's rule; tests/kernels/interpreter_bf16.py), the
    gradients rounded likewise, and the results rounded to bf16 as the kernels' last stores round them."""
    if dtype != torch.bfloat16 or not interpreting():
        return run_with_grads(lambda x, w, a, b, c: loop_experts(x, ids, w, a, b, c), floats)
    out, grads = run_with_grads(lambda x, w, a, b, c: loop_experts(x, ids, w, a, b, c, RoundedAsInterpreter.apply),
                                [t.float() for t in floats])
    return (out[0].to(dtype),), (grads[0].to(dtype), grads[1].to(dtype),
                                 *(round_as_interpreter(g, dtype) for g in grads[2:]))


def experts_case(tokens, k, experts, hidden, inter, seed, drop=()):
    """x, ids (experts in ``drop`` get no token), weights (a zero among them, as GShard's dropped assignments),
    w1, w3, w2: random, in fp64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, experts, (tokens, k), generator=gen)
    for e in drop:
        ids[ids == e] = (e + 1) % experts
    weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64)
    weights[:1, -1] = 0.0
    w1, w3 = (torch.randn(experts, inter, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5 for _ in "13")
    w2 = torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64) / inter ** 0.5
    return x, ids, weights, w1, w3, w2


EXPERT_CASES = {"ragged, two experts empty": (29, 3, 6, 24, 20, (1, 5)), "top-1": (17, 1, 4, 16, 40, ()),
                "one token": (1, 2, 3, 8, 16, ()), "no token": (0, 2, 3, 8, 16, ())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", EXPERT_CASES.values(), ids=EXPERT_CASES.keys())
def test_moe_experts_forward_and_backward(case, dtype):
    """The fused Triton experts (gather, SwiGLU and weighting inside the GEMMs) against the per-expert loop: in fp64
    for the exact values, in the input dtype for the error a plain implementation makes; gradients of x, the
    routing weights and the three expert weights (an expert with no token gets zeros)."""
    x, ids, weights, w1, w3, w2 = experts_case(*case[:5], seed=sum(case[:5]), drop=case[5])
    device = torch.get_default_device()
    ids = ids.to(device)
    floats = [t.to(dtype).to(device) for t in (x, weights, w1, w3, w2)]
    kernel = lambda x, w, a, b, c: tri.moe_experts(x, ids, w, a, b, c)  # noqa: E731
    loop = lambda x, w, a, b, c: loop_experts(x, ids, w, a, b, c)  # noqa: E731
    k_out, k_grad = run_with_grads(kernel, floats)
    p_out, p_grad = plain_experts(floats, ids, dtype)
    e_out, e_grad = run_with_grads(loop, [t.double() for t in floats])
    assert_oracle("out", k_out[0], p_out[0], e_out[0], dtype, max_slack=interpreter_max_slack(k_out[0], e_out[0]))
    for name, kg, pg, eg in zip(("dx", "dweights", "dw1", "dw3", "dw2"), k_grad, p_grad, e_grad):
        assert kg.dtype == dtype and kg.shape == eg.shape, name
        assert_oracle(name, kg, pg, eg, dtype, grad=True, max_slack=interpreter_max_slack(kg, eg))
    for e in case[5]:
        assert not k_grad[2][e].any() and not k_grad[3][e].any() and not k_grad[4][e].any()


def test_moe_experts_reference_is_the_loop_and_both_backends_check_arguments():
    x, ids, weights, w1, w3, w2 = experts_case(31, 2, 5, 12, 10, seed=4, drop=(3,))
    ref_out, ref_grad = run_with_grads(lambda *t: ref.moe_experts(t[0], ids, *t[1:]), [x, weights, w1, w3, w2])
    loop_out, loop_grad = run_with_grads(lambda *t: loop_experts(t[0], ids, *t[1:]), [x, weights, w1, w3, w2])
    for got, want in zip(ref_out + ref_grad, loop_out + loop_grad):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    bad = {r"x \(T, H\) and expert_ids and weights": (x, ids, weights[:, :1], w1, w3, w2),
           r"w1 and w3 \(E, I, H\) and w2 \(E, H, I\)": (x, ids, weights, w1, w3, w2.transpose(1, 2)),
           "one floating dtype": (x, ids, weights, w1.float(), w3, w2),
           "integer expert_ids": (x, ids.double(), weights, w1, w3, w2)}
    for message, args in bad.items():
        for backend in ("torch", "triton"):
            with K.use_backend(backend), pytest.raises(ValueError, match=message):
                K.moe_experts(*args)


def test_moe_experts_saves_no_token_copy_for_backward():
    """What the fused experts keep for backward besides their inputs: the routing and gate and up, (T*k, I) each;
    the unfused reference also keeps x in expert order and the experts' outputs, (T*k, H) each."""
    tokens, k, experts, hidden, inter = 40, 4, 5, 32, 8
    x, ids, weights, w1, w3, w2 = (t.float() if t.is_floating_point() else t
                                   for t in experts_case(tokens, k, experts, hidden, inter, seed=2))
    leaves = [t.requires_grad_() for t in (x, weights, w1, w3, w2)]
    inputs = {t.untyped_storage().data_ptr() for t in leaves}

    def saved_bytes(fn):  # the storages saved for backward, each once, the inputs' own excepted
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in inputs:
                storages[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(leaves[0], ids, *leaves[1:])
        return sum(storages.values())

    rows = tokens * k
    routing = rows * (4 + 8 + 8) + experts * 4  # each row's weight (fp32), token and slot (int64); the offsets
    assert saved_bytes(tri.moe_experts) <= 2 * rows * inter * 4 + routing
    assert saved_bytes(ref.moe_experts) >= 2 * rows * hidden * 4  # the contrast: the same math unfused
