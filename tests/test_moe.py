"""The MoE block (evo/model/moe.py) against transformers' own sparse blocks, the independent reference: Qwen3-MoE,
Mixtral and Qwen2-MoE (its gated shared expert) on the same weights in fp64, output and every gradient within
1e-10, and each layer's aux loss against transformers' load_balancing_loss_func. transformers' routers compute their
softmax in fp32 even for fp64 input; the test gives them an fp64 one (their code otherwise, op for op). Also: which
layers are sparse, GShard's capacity against a loop over InternEvo's rule, determinism, recording, the config's
refusals."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from evo.config import ModelConfig, config_from_dict
from evo.errors import ConfigError
from evo.model.decoder import build_model
from evo.model.moe import MoEBlock, gshard_keep, is_moe_layer, moe_blocks
from tests.helpers import small_sections

H, I_EXPERT, I_SHARED, E, K, TOKENS = 16, 12, 20, 6, 2, 40


def fp64_router(renormalize):
    """transformers' TopKRouter.forward with its softmax in the input's dtype (fp64 here) instead of fp32."""
    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(logits, dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if renormalize(self):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, idx
    return forward


def hf_block(family: str, monkeypatch):
    """transformers' sparse block of ``family`` (random fp64 weights; eager experts) and evo's config for it."""
    kw = dict(hidden_size=H, num_experts_per_tok=K, experts_implementation="eager")
    if family == "mixtral":
        from transformers.models.mixtral import modeling_mixtral as mod
        from transformers import MixtralConfig
        cfg = MixtralConfig(num_local_experts=E, intermediate_size=I_EXPERT, **kw)
        monkeypatch.setattr(mod.MixtralTopKRouter, "forward", fp64_router(lambda r: True))
        block, norm, shared = mod.MixtralSparseMoeBlock(cfg), True, 0
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as mod
        from transformers import Qwen3MoeConfig
        cfg = Qwen3MoeConfig(num_experts=E, moe_intermediate_size=I_EXPERT, norm_topk_prob=True, **kw)
        monkeypatch.setattr(mod.Qwen3MoeTopKRouter, "forward", fp64_router(lambda r: r.norm_topk_prob))
        block, norm, shared = mod.Qwen3MoeSparseMoeBlock(cfg), True, 0
    else:
        from transformers.models.qwen2_moe import modeling_qwen2_moe as mod
        from transformers import Qwen2MoeConfig
        cfg = Qwen2MoeConfig(num_experts=E, moe_intermediate_size=I_EXPERT, shared_expert_intermediate_size=I_SHARED,
                             norm_topk_prob=False, **kw)
        monkeypatch.setattr(mod.Qwen2MoeTopKRouter, "forward", fp64_router(lambda r: r.norm_topk_prob))
        block, norm, shared = mod.Qwen2MoeSparseMoeBlock(cfg), False, 1
    gen = torch.Generator().manual_seed(len(family))
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    ours = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=2, vocab_size=8, num_experts=E, top_k=K,
                       moe_intermediate_size=I_EXPERT, num_shared_experts=shared,
                       shared_expert_intermediate_size=I_SHARED if shared else None, shared_expert_gate=bool(shared),
                       moe_layer_kwargs=dict(normalize_expert_weights=norm), dtype="torch.float64")
    return block, ours


def evo_block_with(block, cfg):
    """evo's block holding ``block``'s weights: experts' gate_up_proj (E, 2I, H), gate rows first, split into w1 and
    w3; down_proj as w2; Qwen2-MoE's shared expert and its gate."""
    from evo.model.decoder import FeedForward

    shared = FeedForward(cfg, cfg.shared_expert_intermediate_size) if cfg.num_shared_experts else None
    ours = MoEBlock(cfg, shared).double()
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        ours.experts.w1.copy_(block.experts.gate_up_proj[:, :I_EXPERT])
        ours.experts.w3.copy_(block.experts.gate_up_proj[:, I_EXPERT:])
        ours.experts.w2.copy_(block.experts.down_proj)
        if shared is not None:
            for evo_name, hf_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                getattr(shared, evo_name).weight.copy_(getattr(block.shared_expert, hf_name).weight)
            ours.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return ours


def grads_by_hf_name(ours):
    """evo's parameter gradients under the names of transformers' parameters they correspond to."""
    g = {"gate.weight": ours.gate.weight.grad,
         "experts.gate_up_proj": torch.cat([ours.experts.w1.grad, ours.experts.w3.grad], dim=1),
         "experts.down_proj": ours.experts.w2.grad}
    if ours.shared_experts is not None:
        for evo_name, hf_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            g[f"shared_expert.{hf_name}.weight"] = getattr(ours.shared_experts, evo_name).weight.grad
        g["shared_expert_gate.weight"] = ours.shared_expert_gate.weight.grad
    return g


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_the_block_equals_transformers_forward_and_backward(family, monkeypatch):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    block, cfg = hf_block(family, monkeypatch)
    ours = evo_block_with(block, cfg)
    x = torch.randn(2, TOKENS // 2, H, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    cot = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x_hf, x_evo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = block(x_hf)
    (out_hf * cot).sum().backward()
    out_evo = ours(x_evo)  # aux_grad_scale 0: the aux loss adds no gradient
    (out_evo * cot).sum().backward()
    assert (out_evo - out_hf).abs().max() < 1e-10
    assert (x_evo.grad - x_hf.grad).abs().max() < 1e-10
    ours_grads = grads_by_hf_name(ours)
    assert set(ours_grads) == {n for n, _ in block.named_parameters()}
    for name, p in block.named_parameters():
        assert (ours_grads[name] - p.grad).abs().max() < 1e-10, name
    logits = block.gate(x.reshape(-1, H))[0]
    (record,) = ours.records
    expected = load_balancing_loss_func((logits,), E, K)
    assert abs(record.aux.item() - expected.item()) < 1e-6  # (transformers sums it in fp32)
    _, ids = torch.topk(torch.softmax(logits, -1), K)
    assert record.counts.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()


def test_the_aux_loss_reaches_the_router_scaled_by_aux_grad_scale(monkeypatch):
    """The block's output is unchanged by the aux loss; its gradient adds aux_grad_scale x d(aux)/d(router)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    block, cfg = hf_block("qwen3_moe", monkeypatch)
    ours = evo_block_with(block, cfg)
    x = torch.randn(TOKENS, H, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ours.aux_grad_scale = 0.37
    ours(x).sum().backward()
    weight = block.gate.weight.detach().clone().requires_grad_()
    logits = F.linear(x, weight)
    probs = torch.softmax(logits, -1)  # load_balancing_loss_func's math in fp64 (it sums in fp32)
    counts = torch.bincount(torch.topk(probs, K).indices.reshape(-1), minlength=E).double()
    aux = E * (counts / TOKENS * probs.mean(0)).sum()
    assert abs(aux.item() - load_balancing_loss_func((logits,), E, K).item()) < 1e-6
    (aux_grad,) = torch.autograd.grad(aux, weight)
    ours_no_aux = evo_block_with(block, cfg)
    ours_no_aux(x).sum().backward()
    expected = ours_no_aux.gate.weight.grad + 0.37 * aux_grad
    assert (ours.gate.weight.grad - expected).abs().max() < 1e-12


def loop_gshard_keep(ids, experts, capacity):
    """InternEvo's GShard places, written out: choice by choice, tokens in order within a choice."""
    taken = [0] * experts
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for j in range(ids.shape[1]):
        for t in range(ids.shape[0]):
            e = int(ids[t, j])
            keep[t, j] = taken[e] < capacity
            taken[e] += 1
    return keep


@pytest.mark.parametrize("capacity", [1, 3, 7, 100])
def test_gshard_places_go_choice_by_choice(capacity):
    ids = torch.randint(0, 5, (23, 3), generator=torch.Generator().manual_seed(capacity))
    assert torch.equal(gshard_keep(ids, 5, capacity), loop_gshard_keep(ids, 5, capacity))


def test_gshard_drops_and_renormalises():
    cfg = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=2, vocab_size=8, num_experts=4, top_k=2,
                      moe_type="GShard", moe_layer_kwargs=dict(capacity_factor=0.5, min_capacity=1),
                      moe_intermediate_size=8, dtype="torch.float64")
    block = MoEBlock(cfg).double()
    torch.nn.init.normal_(block.gate.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits, weights, ids, dropped = block.route(x)
    capacity = math.ceil(32 / 4 * 0.5 * 2)  # 8 places per expert for 64 assignments
    keep = loop_gshard_keep(ids, 4, capacity)
    assert dropped.item() == (~keep).sum().item() > 0
    assert torch.equal(weights > 0, keep)
    kept_any = keep.any(-1)
    assert torch.allclose(weights[kept_any].sum(-1), torch.ones(int(kept_any.sum()), dtype=torch.float64))
    assert (weights[~kept_any] == 0).all()


def test_gshard_without_dropping_and_its_evaluation_capacity():
    """drop_tokens=False (InternEvo's): room for every assignment; eval_capacity_factor in evaluation."""
    kwargs = dict(capacity_factor=0.25, min_capacity=1, eval_capacity_factor=4.0)
    cfg = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=2, vocab_size=8, num_experts=4, top_k=2,
                      moe_type="GShard", moe_layer_kwargs=kwargs, moe_intermediate_size=8, dtype="torch.float64")
    block = MoEBlock(cfg).double()
    torch.nn.init.normal_(block.gate.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert block.route(x)[3].item() > 0  # training: capacity ceil(32 / 4 * 0.25 * 2) = 4 places, drops
    block.eval()
    assert block.route(x)[3].item() == 0  # evaluation: 64 places per expert
    block.train()
    block.drop_tokens = False
    assert block.route(x)[3].item() == 0


def test_sparse_layers_follow_huggingface_rule():
    cfg = ModelConfig(num_layers=6, hidden_size=H, num_attention_heads=2, vocab_size=8, num_experts=4, top_k=2,
                      decoder_sparse_step=2, mlp_only_layers=[3])
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, False, False, True]
    dense = ModelConfig(num_layers=2, hidden_size=H, num_attention_heads=2, vocab_size=8)
    assert not any(is_moe_layer(dense, i) for i in range(2))


def moe_config(**model):
    return config_from_dict({**small_sections(model=dict(num_experts=4, top_k=2, **model)), "model_type": "QWEN3MOE"})


def test_a_model_trains_its_experts_deterministically_and_records_once_per_forward():
    cfg = moe_config(dtype="torch.float32", checkpoint=True)
    grads = []
    for _ in range(2):
        model = build_model(cfg.model, seed=3)
        for layer in model.layers:
            layer.checkpointed = True  # the recompute in backward reruns the router: it must not record again
        for block in moe_blocks(model):
            block.aux_grad_scale = 0.5
        ids = torch.randint(0, cfg.model.vocab_size, (96,), generator=torch.Generator().manual_seed(4))
        model(ids, labels=ids).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert [len(b.records) for b in moe_blocks(model)] == [1] * cfg.model.num_layers
        with torch.no_grad():
            model(ids)
        assert [len(b.records) for b in moe_blocks(model)] == [1] * cfg.model.num_layers  # evaluation: none
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert grads[0]["layers.0.feed_forward.experts.w1"].abs().sum() > 0
    assert grads[0]["layers.0.feed_forward.gate.weight"].abs().sum() > 0


@pytest.mark.parametrize("model, model_type, message", [
    (dict(num_experts=4, top_k=5), "QWEN3MOE", r"'model.top_k' must be between 1 and 'model.num_experts' \(4\), got 5"),
    (dict(num_experts=4, top_k=2), "INTERNLM2", r"model_type 'INTERNLM2' is a dense model: set model_type to one of"),
    (dict(top_k=2), "INTERNLM2", r"'model.top_k' is set on a dense model"),
    (dict(num_experts=4, moe_type="Switch"), "QWEN3MOE", r"'model.moe_type' must be one of Dropless, GShard"),
    (dict(num_experts=4, moe_layer_kwargs=dict(scoring_fn="sigmoid")), "QWEN3MOE",
     r"unknown key 'model.moe_layer_kwargs.scoring_fn': did you mean 'scoring_func'\?"),
    (dict(num_experts=4, moe_gate_k=2, top_k=3), "QWEN3MOE", r"'model.moe_gate_k' \(2\) is the older name of"),
    (dict(num_experts=4, shared_expert_gate=True), "QWEN2MOE", r"set 'model.num_shared_experts' >= 1"),
    (dict(shared_expert_gate=True), "LLAMA2", r"'model.shared_expert_gate' is set on a dense model"),
])
def test_bad_moe_configs_are_refused_in_one_line(model, model_type, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**small_sections(model=model), "model_type": model_type})


def test_internevo_keys_are_read_or_named():
    cfg = config_from_dict({**small_sections(model=dict(num_experts=4, moe_gate_k=2)), "model_type": "MIXTRALMOE"})
    assert cfg.model.top_k == 2
    with pytest.warns(UserWarning, match="'model.moe_layer_kwargs.aux_loss_by_layer' has no effect"):
        moe_config(moe_layer_kwargs=dict(aux_loss_by_layer=False))
    with pytest.warns(UserWarning, match="'MegaBlock-Dropless' runs as 'Dropless'"):
        moe_config(moe_type="MegaBlock-Dropless")


def test_flops_count_the_active_experts_and_memory_counts_all():
    from evo.model.flops import whole_model_sizes

    cfg = moe_config(moe_intermediate_size=32, num_shared_experts=1, shared_expert_gate=True).model
    dense = dataclasses.replace(cfg, num_experts=1, top_k=1, num_shared_experts=0, shared_expert_gate=False,
                                intermediate_size=1)
    total, matmul = whole_model_sizes(cfg)
    h, layers = cfg.hidden_size, cfg.num_layers
    experts = 3 * h * 32  # w1, w3, w2 of one expert
    shared = 3 * h * 32 + h  # one shared expert (num_shared_experts x 32 wide) and its gate
    dense_total, dense_matmul = whole_model_sizes(dense)
    mlp = 3 * h * 1 * layers  # the dense model's width-1 MLPs, none in the MoE model
    assert matmul - (dense_matmul - mlp) == layers * (4 * h + 2 * experts + shared)  # router, top 2 of 4, shared
    assert total - (dense_total - mlp) == layers * (4 * h + 4 * experts + shared)  # every expert's weights


@pytest.mark.slow  # a training subprocess (make test stays under 10 minutes; .ci/run runs it after)
def test_the_tiny_moe_config_trains_and_reports_its_experts(tmp_path):
    import json

    from evo import load_model
    from tests.helpers import run_script

    result = run_script("scripts/train.py", "--config", "configs/tiny_moe.py", "data.total_steps=4",
                        "data.valid_every=2", "monitor.sample_prompt=None", f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 0, result.stderr[-3000:]
    # its checkpoint samples and loads as a dense one does (the model section read with its MoE model type)
    sampled = run_script("scripts/generate.py", "--ckpt", f"{tmp_path}/run/checkpoints", "--prompt", "def ",
                         "--tokens", "4")
    assert sampled.returncode == 0 and "tokens/s" in sampled.stderr, sampled.stderr[-3000:]
    model = load_model(tmp_path / "run" / "checkpoints", dtype=torch.bfloat16)
    assert len(moe_blocks(model)) == 4 and model.layers[0].feed_forward.experts.w1.dtype == torch.bfloat16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(r["moe_loss"] > 0 for r in steps)
    assert all(sorted(k for k in r if k.startswith("moe/load/")) == [f"moe/load/{i}" for i in range(4)] for r in steps)
    assert "moe_loss=" in result.stderr
