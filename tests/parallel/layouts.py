"""Train ``configs/tiny.py`` (fp32, a few steps) under a parallel layout, in a process of a gloo group
(tests/dist.py), and report what the equivalence tests compare: per-step loss and gradient norm, the
final weights gathered whole, and each rank's local parameter and optimizer-state sizes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tests.helpers import ROOT
from tests.resume import captured_log, read_records

STEPS = 8
REL = 1e-5  # the acceptance tolerance: per-step loss and gradient norm, final weights (||diff|| / ||w||)


def tiny_sections(folder: Path, micro_num: int = 2, **parallel) -> dict:
    from evo.config import read_config_file

    raw = read_config_file(ROOT / "configs" / "tiny.py")
    raw["JOB_NAME"] = folder.name
    # rows per rank: a dp=2 layout reads the global batch (and validation batch) of one process with twice these
    # evaluation mid-run too: training continues after forwards without backward (FSDP2 must reshard)
    steps = parallel.get("steps", STEPS)
    raw["data"].update(total_steps=steps, micro_num=micro_num, valid_micro_num=2 * micro_num, valid_every=steps // 2,
                       valid_max_batches=2)
    raw["lr_scheduler"] = dict(warmup_ratio=0.25, eta_min=3e-4)
    raw["ckpt"] = dict(enable_save_ckpt=False)
    raw["monitor"] = dict(run_folder=str(folder), sample_prompt=None)
    raw["model"]["checkpoint"] = parallel.get("checkpoint", False)
    raw["model"]["num_chunks"] = parallel.get("chunks", 1)
    raw["model"]["tie_word_embeddings"] = parallel.get("tied", False)
    if parallel.get("moe"):  # configs/tiny_moe.py's experts, GShard's capacity with moe="GShard"
        raw["model_type"] = "QWEN3MOE"
        raw["model"].update(num_experts=8, top_k=2, moe_intermediate_size=64, moe_type=parallel["moe"])
        if parallel.get("shared"):  # Qwen2-MoE's gated shared expert
            raw["model"].update(num_shared_experts=1, shared_expert_gate=parallel["shared"] != "ungated")
        raw["loss"] = dict(moe_loss_coeff=0.1)  # large enough that a mis-scaled aux gradient shows
        # an expert that saw few tokens has gradient entries near Adam's eps, where g / (|g| + eps) turns the
        # layouts' last-bit differences into visible ones: a larger eps keeps steps comparable at 1e-5
        raw["adam"] = dict(raw["adam"], adam_eps=1e-6)
    raw["parallel"] = dict(zero1=dict(size=parallel.get("zero1", -1)),
                           tensor=dict(size=parallel.get("tp", 1), mode=parallel.get("mode", "mtp")),
                           pipeline=dict(size=parallel.get("pp", 1), mode=parallel.get("schedule", "1F1B")),
                           weight=dict(size=parallel.get("weight", 1)),
                           expert=dict(size=parallel.get("expert", 1)),
                           timeout_s=120)
    if parallel.get("sequence_2D"):  # isp's group as head x context (evo.parallel.sequence_2d)
        raw["parallel"]["sequence_2D"] = dict(parallel["sequence_2D"], enable=True)
    if parallel.get("sliding_window"):
        raw["model"]["sliding_window"] = parallel["sliding_window"]
    if parallel.get("selective"):  # Selective Checkpoint++ ("offload": its kept tensors on the CPU)
        raw["selective_checkpoint"] = True
        raw["selective_checkpoint_offload"] = parallel["selective"] == "offload"
    if parallel.get("offload_layers"):  # cpu_offloading of the first layers' activations
        raw["cpu_offloading"] = dict(enable=True, num_layers=parallel["offload_layers"])
    if parallel.get("cpu_offload"):  # the optimizer state on the CPU
        raw["hybrid_zero_optimizer"] = dict(raw.get("hybrid_zero_optimizer", {}), cpu_offload=True)
    return raw


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered whole (a DTensor's full tensor, a plain tensor itself), detached and copied."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(rank: int, world_size: int, sections: dict, seed: int = 1024) -> dict:
    """The documented flow on this rank; returns what rank 0 logged, the final weights gathered whole, this
    rank's structure (local sizes, the calls the loss received) and a greedy generation on this rank."""
    from evo import kernels
    from evo.generate import generate_ids
    from evo.parallel.shards import local_numel
    from evo.initialize import (build_train_loader_with_data_type, build_valid_loader_with_data_type,
                                initialize_distributed_env, initialize_model_and_parallel_communicator)
    from evo.trainer import TrainerBuilder

    if world_size > 1:  # torchrun's variables, in this worker only (one process runs in pytest's own)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    state = initialize_distributed_env(config=sections, launcher="torch" if world_size > 1 else "local", seed=seed)
    before = read_records(state.run_folder / "metrics.jsonl")  # what a resumed run must keep
    model = initialize_model_and_parallel_communicator()
    train_dl, types = build_train_loader_with_data_type()
    with captured_log() as log:  # the trainer's own lines: which checkpoint it loaded
        trainer = TrainerBuilder(model, train_dl, build_valid_loader_with_data_type(), dataset_types=types)
    loss_calls = []
    loss_fn = kernels.fused_linear_cross_entropy

    def recording(hidden, weight, labels, *args, **kwargs):  # what the loss receives: (tokens, vocab rows, group)
        loss_calls.append((hidden.shape[0], weight.shape[0], kwargs.get("process_group") is not None))
        return loss_fn(hidden, weight, labels, *args, **kwargs)

    layer_tokens = []  # the tokens a decoder layer's input holds on this rank, per training forward
    from evo.model.decoder import decoder_layers

    hook = decoder_layers(model)[0].register_forward_pre_hook(
        lambda module, args: layer_tokens.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
    kernels.fused_linear_cross_entropy = recording
    first_grads = {}  # the router's and experts' gradients of the first step, gathered whole
    optimizer_step = trainer.optimizer.step

    def recording_step():
        if trainer.step_count == 0:
            first_grads.update({n: whole(m.grad) for n, m in trainer.optimizer.masters.items()
                                if m.grad is not None and ("feed_forward.gate." in n or ".experts." in n)})
        return optimizer_step()

    trainer.optimizer.step = recording_step
    try:
        trainer.fit()
    finally:
        kernels.fused_linear_cross_entropy = loss_fn
        hook.remove()
    prompt = list(range(40, 52))
    generated = [generate_ids(model, prompt, 10, temperature=0.0, use_cache=cache) for cache in (True, False)]
    optimizer_state = trainer.optimizer.state_dict()
    out = {"weights": {n: whole(p) for n, p in model.named_parameters()},
           "local_numel": {n: local_numel(p) for n, p in model.named_parameters()},
           "optimizer_numel": {n: local_numel(s) for n, s in optimizer_state["exp_avg"].items()},
           "masters": {n: whole(m) for n, m in optimizer_state["master"].items()},
           "loss_calls": loss_calls, "generated": generated, "packed_length": state.config.data.packed_length,
           "layer_tokens": layer_tokens, "log": "\n".join(log), "records_before": before, "first_grads": first_grads}
    if rank == 0:
        records = read_records(state.run_folder / "metrics.jsonl")
        out["records"] = records
        out["loss"] = [r["loss"] for r in records if "loss" in r]
        out["grad_norm"] = [r["grad_norm"] for r in records if "grad_norm" in r]
        out["val_loss"] = [r["val/python_loss"] for r in records if "val/python_loss" in r]
        assert out["val_loss"] or not trainer.val_dls, "no validation record"
    return out


def saved_activation_bytes(rank: int, world_size: int) -> list[int]:
    """Bytes autograd saves for backward in one forward of the tiny model under tp=2 msp, then fsp."""
    from evo.config import config_from_dict
    from evo.parallel import build_context, build_parallel_model

    raw = tiny_sections(Path("unused"))
    out = []
    for mode in ("msp", "fsp"):
        cfg = config_from_dict({"model": raw["model"]}).model
        ctx = build_context(world_size, rank, 0, torch.device("cpu"), 1, 2, -1, mode)
        model = build_parallel_model(cfg, ctx, seed=0)
        ids = torch.randint(0, cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0))
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=torch.roll(ids, -1)).sum()
        loss.backward()  # fsp's recomputation must work too
        out.append(sum(saved))
    return out


def train_layouts(rank: int, world_size: int, folder: str, layouts: list[dict]) -> list[dict]:
    return [train(rank, world_size, tiny_sections(Path(folder) / f"layout{i}", **layout))
            for i, layout in enumerate(layouts)]


FAMILY_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, head_dim=24,
                    vocab_size=300, multiple_of=32, dtype="torch.float32", qk_norm=True, qkv_bias=True, o_bias=True,
                    mlp_bias=True, tie_word_embeddings=False)


def family_gradients(rank: int, world_size: int, modes: list[str]) -> list[tuple]:
    """Per tensor mode (tp = world size): the per-token loss of one packed row and every parameter's gradient,
    gathered whole, for a model with the previous issue's features (head_dim apart, biases, q/k norms)."""
    from evo.config import config_from_dict
    from evo.parallel import ParallelContext, build_context, build_parallel_model

    cfg = config_from_dict({"model": FAMILY_MODEL}).model
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    out = []
    for mode in modes:
        ctx = ParallelContext() if mode == "one" else build_context(world_size, rank, 0, torch.device("cpu"), 1,
                                                                    world_size, 1, mode)
        model = build_parallel_model(cfg, ctx, seed=11)
        loss = model(ids, cu, 44, labels=torch.roll(ids, -1))
        loss.sum().backward()
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
        out.append((loss.detach(), grads))
    return out


def fp16_runs(rank: int, world_size: int, folder: str, pipeline: int = 1) -> list:
    """fp16 on a small model, 3 steps, the global batch of 4 rows split over the data-parallel ranks (world /
    ``pipeline``): with the default loss scale, and with one so large the first step overflows (hysteresis 1: the
    scale halves at once). Returns (rank 0's records, this rank's final fp32 master weights) of each."""
    from tests.helpers import small_sections

    out = []
    dp = world_size // pipeline
    for name, scale in (("plain", 2**16), ("overflow", 2**40)):
        sections = small_sections(model=dict(dtype="torch.float16"), data=dict(total_steps=3, micro_num=4 // dp),
                                  grad_scaler=dict(fp16=dict(initial_scale=scale), hysteresis=1, max_scale=2**40),
                                  parallel=dict(pipeline=dict(size=pipeline)),
                                  ckpt=dict(enable_save_ckpt=False), monitor=dict(run_folder=f"{folder}/{name}"))
        weights = train(rank, world_size, sections)["masters"]
        out.append((read_records(Path(f"{folder}/{name}/metrics.jsonl")) if rank == 0 else None, weights))
    return out


def compiled_runs(rank: int, world_size: int, folder: str, layout: dict) -> list:
    """``layout``, 3 steps, eager then with ``model.compile=True``: what ``train`` reports of each."""
    out = []
    for compile_ in (False, True):
        sections = tiny_sections(Path(folder) / f"compile{compile_}", **layout)
        sections["data"]["total_steps"] = 3
        sections["model"]["compile"] = compile_
        out.append(train(rank, world_size, sections))
    return out


def generations(rank: int, world_size: int, dtype: str) -> list:
    """Greedy tokens with and without the KV cache from the tiny model's first weights (seed 0) in ``dtype``,
    under ZeRO over every rank (one process: the plain model)."""
    from evo.config import config_from_dict
    from evo.generate import generate_ids
    from evo.parallel import ParallelContext, build_context, build_parallel_model

    raw = tiny_sections(Path("unused"))
    raw["model"]["dtype"] = dtype
    cfg = config_from_dict({"model": raw["model"]}).model
    ctx = build_context(world_size, rank, 0, torch.device("cpu"), 1, 1, -1, "mtp") if world_size > 1 else ParallelContext()
    model = build_parallel_model(cfg, ctx, seed=0)
    return [generate_ids(model, list(range(60, 75)), 12, temperature=0.0, use_cache=cache) for cache in (True, False)]


def merged(ranks: list, i: int) -> dict:
    """Run ``i`` of ``ranks`` (each rank's list of ``train`` results) as rank 0 logged it, with every rank's
    gathered weights together (a pipeline stage's rank holds only its stage's)."""
    run = dict(ranks[0][i])
    run["weights"] = {name: w for r in ranks for name, w in r[i]["weights"].items()}
    run["first_grads"] = {name: g for r in ranks for name, g in r[i]["first_grads"].items()}
    return run


def assert_same_training(run: dict, ref: dict, what: str, steps: int = STEPS, evaluations: int = 2,
                         weights_rel: float = REL) -> None:
    """``run`` trained as ``ref`` did: the same ``steps`` losses and gradient norms, ``evaluations`` validation
    losses (each within ``REL`` relative), and final weights (every parameter, within ``weights_rel``)."""
    for key, count in (("loss", steps), ("grad_norm", steps), ("val_loss", evaluations)):
        assert len(run[key]) == len(ref[key]) == count, f"{what}: {len(run[key])} and {len(ref[key])} {key} records"
        for step, (a, b) in enumerate(zip(run[key], ref[key]), 1):
            assert math.isclose(a, b, rel_tol=REL), f"{what}: {key} at step {step}: {a} against {b}"
    missing = ref["weights"].keys() - run["weights"].keys()  # (a pipeline's tied head is a copy one process lacks)
    assert not missing, f"{what}: no final {sorted(missing)}"
    for name, w in ref["weights"].items():
        diff = float((run["weights"][name] - w).norm() / w.norm())
        assert diff <= weights_rel, f"{what}: final {name} differs by {diff:.2e} relative"
