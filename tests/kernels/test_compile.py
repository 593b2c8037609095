"""The Triton kernels under torch.compile: custom-op contracts, whole graphs, and a compiled model.

Dynamo sees each Triton launch as a custom op ``torch.ops.evo.*`` (evo/kernels/triton_utils.OpaqueOp);
autograd stays with the kernels' autograd.Functions, which Dynamo traces. ``fullgraph=True`` makes a
graph break an error, so these tests fail if any kernel call falls out of the compiled graph. On the
CPU the kernels run through Triton's interpreter and the graphs use the aot_eager backend (Dynamo,
AOTAutograd, fake tensors, functionalization; no code generation) except where a test names inductor.
"""

import pytest
import torch

from evo import kernels
from evo.kernels import triton_utils
from tests.kernels.oracle import DEVICE, run_with_grads

# torch's compile stack imports torch.jit code that warns about its own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# load every Triton module, so that all the custom ops are registered
for _module in set(kernels._TRITON.values()):
    kernels._triton_module(_module)


def _op_samples():
    """Sample arguments for each custom op (small: the interpreter runs them several times)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    x, res, w = rand(6, 40), rand(6, 40), rand(40)
    cos, sin = rand(12, 4), rand(12, 4)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    logits = rand(5, 300)
    labels = torch.tensor([3, -100, 299, 0, 150], device=DEVICE)
    q, k, v = rand(12, 4, 16), rand(12, 2, 16), rand(12, 2, 16)
    offs3, offs_first_empty, offs_last_empty = (torch.tensor(o, dtype=torch.int32, device=DEVICE)
                                                for o in ([2, 2, 9], [0, 4, 9], [0, 9, 9]))
    token_rows = torch.tensor([3, 0, 1, 1, 2, 0, 3, 2, 0], device=DEVICE)  # the rows of a 4-row operand, sorted order
    attn = (7, 7, 0.25, -1, 0, 0.0)  # max_q, max_k, scale, left, right (causal), softcap
    out, lse = triton_utils.OPAQUE_OPS["flash_attn_fwd"].fn(q, k, v, cu, cu, *attn)
    return {
        "rms_norm_fwd": [(x, None, w, 1e-6), (x, res, w, 1e-5), (x.bfloat16(), res, w, 1e-5)],
        "rms_norm_bwd": [(rand(6, 40), x, w, rand(6).abs() + 0.5, None, torch.float32, False),
                         (rand(6, 40, dtype=torch.bfloat16), res, w, rand(6).abs() + 0.5, rand(6, 40), torch.bfloat16,
                          True)],
        "swiglu_fwd": [(x, res)],
        "swiglu_bwd": [(x, res, rand(6, 40))],
        "rotary": [(rand(2, 12, 3, 10), cos, sin, False, False, None, 2, None, None),
                   (rand(12, 3, 8), cos, sin, True, True, torch.tensor([1, 0], dtype=torch.int32, device=DEVICE), 0,
                    cu, 7)],
        "ce_stats": [(logits, labels, 0, 1.0), (logits, labels, 100, 0.7)],
        "ce_grad": [(logits, labels, rand(5), rand(5), 0, 300, 0.1, 1e-4, 1.0, torch.float32),
                    (logits, labels, rand(5), rand(5), 100, 600, 0.0, 0.0, 0.7, torch.bfloat16)],
        "flash_attn_fwd": [(q, k, v, cu, cu, *attn)],
        "flash_attn_bwd": [(rand(12, 4, 16), q, k, v, out, lse, cu, cu, *attn)],
        # 2 batch rows of 3 queries against cache rows 2 and 0 (of 3): keys 1..6 and 0..3 (k and v offsets, counts)
        "moe_routing": [(torch.tensor([2, 0, 2, 3, 0, 0], device=DEVICE), 5)],  # grouped GEMMs: 9 rows, 3 groups
        "grouped_mm_fwd": [(rand(9, 8), rand(3, 8, 6), offs3, None, None, None, None),
                           (rand(9, 8), rand(3, 6, 8).transpose(1, 2), offs_first_empty, None, None, None, None),
                           (rand(4, 8), rand(3, 8, 6), offs3, token_rows, rand(9), None, None),  # gathered, scaled
                           (rand(9, 8), rand(3, 6, 8).transpose(1, 2), offs3, None, None, rand(9, 8),
                            rand(3, 6, 8).transpose(1, 2))],  # two products
        "grouped_mm_db": [(rand(9, 8), rand(9, 6), offs3, rand(3, 8, 6), None, False),
                          (rand(9, 8), rand(9, 6), offs_last_empty, rand(3, 6, 8).transpose(1, 2), None, False),
                          (rand(4, 8), rand(9, 6), offs3, rand(3, 8, 6), token_rows, True),  # a's rows gathered
                          (rand(9, 8), rand(4, 6), offs3, rand(3, 8, 6), token_rows, False)],  # dout's
        "moe_swiglu_fwd": [(rand(4, 8), token_rows, rand(3, 6, 8), rand(3, 6, 8), offs3)],
        "moe_swiglu_bwd": [(rand(9, 6), rand(9, 6), rand(9, 6), rand(9))],
        "flash_attn_kvcache_fwd": [(rand(2, 3, 4, 16), rand(3, 8, 2, 16), rand(3, 8, 2, 16),
                                    torch.tensor([[2 * 256 + 32, 0], [2 * 256 + 32, 0], [6, 4]], device=DEVICE),
                                    0.25, 4, 0, 0.0)],
    }


def test_every_custom_op_passes_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation against the real one, and AOT dispatch
    with static and dynamic shapes, for every op evo registers."""
    samples = _op_samples()
    assert set(samples) == set(triton_utils.OPAQUE_OPS), "every registered custom op needs sample arguments here"
    for name, cases in samples.items():
        for args in cases:
            torch.library.opcheck(triton_utils.OPAQUE_OPS[name].op, args)


def _cases():
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    labels = torch.tensor([3, -100, 299, 0, 150, 7, 42], device=DEVICE)
    offsets = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    expert_ids = torch.tensor([[0, 2], [2, 3], [0, 3], [3, 0], [2, 0], [0, 2], [3, 2]], device=DEVICE)  # 1: none
    return {
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w), (rand(5, 64), rand(64))),
        "fused_add_rms_norm": (lambda x, r, w: kernels.fused_add_rms_norm(x, r, w),
                               (rand(5, 64), rand(5, 64), rand(64))),
        "swiglu": (kernels.swiglu, (rand(3, 50), rand(3, 50))),
        "rotary": (lambda x, c, s: kernels.apply_rotary_emb(x, c, s), (rand(2, 12, 2, 16), rand(12, 4), rand(12, 4))),
        "rotary_varlen": (lambda x, c, s: kernels.apply_rotary_emb(x, c, s, interleaved=True, seqlen_offsets=offsets,
                                                                   cu_seqlens=cu, max_seqlen=7),
                          (rand(12, 2, 16), rand(12, 4), rand(12, 4))),
        "rotary_inplace": (lambda x, c, s: kernels.apply_rotary_emb(x * 1.0, c, s, inplace=True),
                           (rand(2, 12, 2, 16), rand(12, 4), rand(12, 4))),
        "rotary_inplace_leaf": (lambda x, c, s: kernels.apply_rotary_emb(x, c, s, inplace=True, seqlen_offsets=offsets),
                                (rand(2, 5, 2, 16), rand(12, 4), rand(12, 4))),
        "rotary_qkv_": (lambda qkv, c, s: kernels.apply_rotary_emb_qkv_(qkv, c, s, interleaved=True),
                        (rand(2, 6, 3, 2, 16), rand(12, 4), rand(12, 4))),
        "rotary_qkv_gqa": (lambda qkv, c, s: kernels.apply_rotary_emb_qkv_(qkv, c, s, c.flip(0), s.flip(0),
                                                                           seqlen_offsets=offsets, num_heads_q=2),
                           (rand(2, 6, 4, 16), rand(12, 3), rand(12, 3))),
        "rotary_kv_": (lambda kv, c, s: kernels.apply_rotary_emb_kv_(kv, c, s, seqlen_offsets=3),
                       (rand(2, 6, 2, 2, 16), rand(12, 4), rand(12, 4))),
        "cross_entropy": (lambda x: kernels.cross_entropy(x, labels, label_smoothing=0.1, z_loss=1e-4),
                          (rand(7, 300),)),
        "cross_entropy_none": (lambda x: kernels.cross_entropy(x, labels, reduction="none"), (rand(7, 300),)),
        "cross_entropy_scale_z_loss": (lambda x: sum(kernels.cross_entropy(x, labels, z_loss=1e-3, logit_scale=0.7,
                                                                           return_z_loss=True)), (rand(7, 300),)),
        "cross_entropy_precomputed_lse": (lambda x: kernels.cross_entropy(
            x, labels, z_loss=1e-3, precomputed_lse=torch.logsumexp(x.detach(), -1)), (rand(7, 300),)),
        "fused_linear_cross_entropy_scale": (lambda h, w: kernels.fused_linear_cross_entropy(
            h, w, labels, label_smoothing=0.1, z_loss=1e-3, logit_scale=1.3), (rand(7, 32), rand(300, 32))),
        "fused_linear_cross_entropy": (lambda h, w, b: kernels.fused_linear_cross_entropy(h, w, labels, b),
                                       (rand(7, 32), rand(300, 32), rand(300))),
        "fused_linear_cross_entropy_accuracy": (
            lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels, reduction="none", return_accuracy=True)[0],
            (rand(7, 32), rand(300, 32))),
        "flash_attn_varlen_func": (lambda q, k, v: kernels.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True),
                                   (rand(12, 4, 16), rand(12, 2, 16), rand(12, 2, 16))),
        "flash_attn_func": (lambda q, k, v: kernels.flash_attn_func(q, k, v, window_size=(3, 2), softcap=5.0),
                            (rand(2, 6, 4, 16), rand(2, 6, 2, 16), rand(2, 6, 2, 16))),
        "moe_experts": (lambda x, w, w1, w3, w2: kernels.moe_experts(x, expert_ids, w, w1, w3, w2),
                        (rand(7, 16), rand(7, 2), rand(4, 8, 16), rand(4, 8, 16), rand(4, 16, 8))),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_function_matches_eager(case):
    """Forward and backward of each public kernel, compiled whole (fullgraph) against eager, Triton backend."""
    torch._dynamo.reset()
    fn, inputs = CASES[case]
    with kernels.use_backend("triton"):
        eager_out, eager_grads = run_with_grads(fn, inputs)
        out, grads = run_with_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs)
    for a, b in zip(out + grads, eager_out + eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(eager_grads) > 0


def test_compiled_kvcache_step_matches_eager():
    """flash_attn_with_kvcache compiled whole (fullgraph): the in-place cache update (rotated k, v), the rotary of q
    and the kernel's custom op; the output, lse and both caches match eager's."""
    g = torch.Generator(device="cpu").manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    q, k, v, cos, sin = rand(2, 3, 4, 16), rand(2, 3, 2, 16), rand(2, 3, 2, 16), rand(12, 8), rand(12, 8)
    k_cache, v_cache = rand(2, 12, 2, 16), rand(2, 12, 2, 16)
    seqlens = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)

    def step(q, k, v, k_cache, v_cache):
        return kernels.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                               cache_seqlens=seqlens, causal=True, window_size=(5, 0), softcap=3.0,
                                               return_softmax_lse=True)

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        caches = (k_cache.clone(), v_cache.clone())
        with kernels.use_backend("triton"):
            run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
            out, lse = run(q, k, v, *caches)
        results.append((out, lse, *caches))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0][2], k_cache)  # the cache was written


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_in_place_rotary_of_a_non_leaf_input(packed):
    """In place on a non-leaf that enters the compiled graph as an input: AOTAutograd loses the graph of a Function
    that marks such an input dirty (the gradient came back unrotated), so the compiled path must not do that."""
    g = torch.Generator(device="cpu").manual_seed(3)
    shape = (2, 6, 3, 2, 16) if packed else (2, 6, 2, 16)
    x0, c, s = (torch.randn(*sh, generator=g).to(DEVICE) for sh in (shape, (12, 4), (12, 4)))

    def fn(x):
        return kernels.apply_rotary_emb_qkv_(x, c, s) if packed else kernels.apply_rotary_emb(x, c, s, inplace=True)

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        base = x0.clone().requires_grad_()
        x = base * 1.0
        with kernels.use_backend("triton"):
            out = (torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn)(x)
            (out * x0).sum().backward()
        results.append((out.detach(), x.detach(), base.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_inductor_compiles_around_the_custom_ops():
    """Inductor generates code for the torch ops around the kernels (C++ on this CPU) and calls the ops."""
    torch._dynamo.reset()

    def block(x, w, gate):
        return kernels.swiglu(kernels.rms_norm(x * 2.0, w), gate.sin())

    inputs = (torch.randn(4, 48, device=DEVICE), torch.rand(48, device=DEVICE) + 0.5, torch.randn(4, 48, device=DEVICE))
    with kernels.use_backend("triton"):
        eager_out, eager_grads = run_with_grads(block, inputs)
        out, grads = run_with_grads(torch.compile(block, fullgraph=True), inputs)
    for a, b in zip(out + grads, eager_out + eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_model_matches_eager_model():
    """A 2-layer model (every kernel: norms, rotary, varlen attention, SwiGLU, fused linear CE) compiled whole:
    its per-token losses and every parameter gradient match the eager model's."""
    from tests.helpers import small_sections
    from evo.config import config_from_dict
    from evo.model import build_model

    torch._dynamo.reset()
    cfg = config_from_dict(small_sections()).model
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    labels = torch.roll(ids, -1)
    labels[[9, 39]] = -100
    cu = torch.tensor([0, 10, 40], dtype=torch.int32, device=DEVICE)
    results = []
    for compiled in (False, True):
        model = build_model(cfg, DEVICE, seed=0)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        with kernels.use_backend("triton"):
            token_loss = run(ids, cu, 30, labels=labels)
            token_loss.sum().backward()
        results.append((token_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(eager_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # about 35 s through the interpreter; .ci/run runs it after `make test`
def test_compiled_moe_layers_train_as_eager_ones():
    """model.compile with MoE layers (each decoder layer through torch.compile, as evo.parallel.parallelize does),
    checkpointed, Triton backend: the same per-token losses and gradients as eager (the aux loss's included), one
    record per training forward, and the record (a side effect, outside the checkpointed function) the only graph
    break: the checkpointed function is traced whole."""
    from torch._dynamo.utils import counters

    from evo.config import config_from_dict
    from evo.model import build_model
    from evo.model.moe import moe_blocks
    from tests.helpers import small_sections

    cfg = config_from_dict({**small_sections(model=dict(num_experts=4, top_k=2, dtype="torch.float32")),
                            "model_type": "QWEN3MOE"}).model
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ops = set()

    def traced(gm, example_inputs):  # aot_eager, noting the ops of every graph (the checkpointed body's included)
        ops.update(str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = build_model(cfg, DEVICE, seed=3)
        for layer in model.layers:
            layer.checkpointed = True
            if compiled:
                layer.compile(backend=traced)
        for block in moe_blocks(model):
            block.aux_grad_scale = 0.5
        with kernels.use_backend("triton"):
            token_loss = model(ids, labels=ids)
            token_loss.sum().backward()
        assert [len(b.records) for b in moe_blocks(model)] == [1] * cfg.num_layers
        results.append((token_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    breaks = [reason for reason in counters["graph_break"] if "record" not in reason]
    assert counters["frames"]["ok"] >= 1 and not breaks, breaks
    assert {"evo.moe_swiglu_fwd", "evo.flash_attn_fwd"} <= {op.replace("::", ".").split(".default")[0] for op in ops}
    (eager_loss, eager), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name in eager:
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
