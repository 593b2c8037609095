"""Selective Checkpoint++ and the offloads (evo/model/selective.py, issue 28): attention runs once per checkpointed
layer and step, and the gradients equal those without checkpointing (bit for bit where both take the same attention
backward: Triton's; within 1e-6 on the reference, whose backward from (out, lse) is its own formula); the kept
tensors and cpu_offloading's activations really go to the CPU (counted); the optimizer state on the CPU in one
process trains as without."""

import json
from pathlib import Path

import pytest
import torch

from evo import kernels
from evo.config import config_from_dict
from evo.parallel import MemoryOptions, ParallelContext, build_parallel_model
from tests.helpers import small_sections


def gradients(backend: str, checkpoint: bool, memory: MemoryOptions):
    """One forward and backward of a 2-layer model on a packed row of two documents: (loss, gradients, the
    attention forward calls, the model)."""
    cfg = config_from_dict(small_sections(model=dict(checkpoint=checkpoint))).model
    model = build_parallel_model(cfg, ParallelContext(), seed=3, memory=memory)
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    calls, real = [], kernels.flash_attn_varlen_func

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kernels.flash_attn_varlen_func = counting
    try:
        with kernels.use_backend(backend):
            loss = model(ids, cu, 44, labels=torch.roll(ids, -1)).sum()
            loss.backward()
    finally:
        kernels.flash_attn_varlen_func = real
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls), model


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # interpreter: 5 s
@pytest.mark.parametrize("offload", [False, True])
def test_selective_checkpointing_runs_attention_once_and_keeps_the_gradients(backend, offload):
    plain = gradients(backend, False, MemoryOptions())
    full = gradients(backend, True, MemoryOptions())
    selective = gradients(backend, True, MemoryOptions(selective_checkpoint=True,
                                                       selective_checkpoint_offload=offload))
    layers = 2
    assert plain[2] == layers and full[2] == 2 * layers  # full checkpointing runs attention again in backward
    assert selective[2] == layers  # ... selective does not
    assert torch.equal(selective[0], plain[0])
    for name, g in plain[1].items():
        if backend == "triton":  # the same attention backward (the Triton kernels from out and lse)
            assert torch.equal(selective[1][name], g), name
        else:
            assert float((selective[1][name] - g).norm() / g.norm()) <= 1e-6, name
    model = selective[3]
    for layer in model.layers:
        assert layer.keeps_attention and layer.offloads_kept == offload
        slot = layer.last_kept
        assert not slot.filled  # taken by the recomputation
        assert (slot.offloaded_bytes > 0) == offload  # out and lse went to the CPU and back
        if offload:
            assert slot.offloaded_bytes == 64 * 4 * (16 * 4 + 4)  # tokens x heads x (head_dim fp32 + lse)


def test_cpu_offloading_moves_the_first_layers_activations_and_changes_nothing():
    plain = gradients("torch", False, MemoryOptions())
    offloaded = gradients("torch", False, MemoryOptions(offloaded_layers=1))
    assert torch.equal(offloaded[0], plain[0])
    assert all(torch.equal(offloaded[1][n], g) for n, g in plain[1].items())
    first, second = offloaded[3].layers
    assert first.offloaded and not second.offloaded
    assert first.offload_hooks.moved > 64 * 64 * 4  # at least one (tokens, hidden) fp32 activation went to the CPU
    assert not hasattr(second, "offload_hooks")


def one_process_run(folder: Path, **layout):
    from tests.parallel.layouts import tiny_sections, train

    sections = tiny_sections(folder, **layout)
    sections["data"].update(total_steps=3, valid_every=3)
    return train(0, 1, sections), json.loads((folder / "config.json").read_text())


@pytest.mark.slow  # about 20 s: three short runs of the tiny model
def test_one_process_with_optimizer_state_on_the_cpu_and_every_saver_trains_as_without(tmp_path):
    """The offloads change where tensors wait, nothing else: bit for bit the run without them. Selective
    checkpointing itself against full checkpointing: per-step loss and gradient norm within 1e-5; on the CPU's
    reference ops its attention backward (the explicit formula from out and lse) differs from autograd's by about
    5e-7 relative, which AdamW's normalization carries into the weights (hence 1e-4 there)."""
    from tests.parallel.layouts import assert_same_training

    full, _ = one_process_run(tmp_path / "full", checkpoint=1.0)
    selective, _ = one_process_run(tmp_path / "selective", checkpoint=1.0, selective=True)
    saving, saved = one_process_run(tmp_path / "saving", checkpoint=1.0, selective="offload", offload_layers=2,
                                    cpu_offload=True)
    assert saving["loss"] == selective["loss"] and saving["grad_norm"] == selective["grad_norm"]
    assert all(torch.equal(w, selective["weights"][n]) for n, w in saving["weights"].items())
    assert_same_training(selective, full, "selective against full checkpointing", steps=3, evaluations=1,
                         weights_rel=1e-4)
    assert saved["selective_checkpoint"] is True and saved["selective_checkpoint_offload"] is True
    assert saved["cpu_offloading"] == {"enable": True, "num_layers": 2}
    assert saved["hybrid_zero_optimizer"]["cpu_offload"] is True


def test_one_process_optimizer_keeps_its_masters_and_state_on_the_cpu_apart_from_the_model():
    from evo.config import AdamConfig, GradScalerConfig
    from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer

    cfg = config_from_dict(small_sections()).model
    model = build_parallel_model(cfg, ParallelContext(), seed=0)
    opt = MixedPrecisionOptimizer(model, AdamConfig(lr=1e-2), 1.0, DynamicLossScaler(GradScalerConfig(), False),
                                  ParallelContext(), cpu_offload=True)
    ids = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    model(ids, labels=torch.roll(ids, -1)).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert opt.step()[0]
    for name, p in model.named_parameters():
        master = opt.masters[name]
        assert master is not p and master.device.type == "cpu" and master.dtype == torch.float32
        assert opt.optimizer.state[master]["exp_avg"].device.type == "cpu"
        assert torch.equal(p, master) and not torch.equal(p, before[name])  # stepped, and copied back


@pytest.mark.parametrize("sections, line", [
    (dict(cpu_offloading=dict(enable=True, num_layers=3)), "'cpu_offloading.num_layers' must be 0 to "
                                                           "'model.num_layers' (2), got 3"),
    (dict(selective_checkpoint_offload=True), "'selective_checkpoint_offload' = True needs 'selective_checkpoint' = "
                                              "True"),
    (dict(selective_checkpoint=True), "'selective_checkpoint' = True needs 'model.checkpoint' > 0"),
    (dict(cpu_offloading=dict(num_layers=1)), "'cpu_offloading.num_layers' = 1 with enable=False"),
    (dict(selective_checkpoint=1), "'selective_checkpoint' must be True or False, got 1"),
    (dict(cpu_offloading=dict(enable=True, num_layers=1), model=dict(small_sections()["model"], compile=True)),
     "'cpu_offloading' with 'model.compile' is not supported yet"),
])
def test_bad_memory_settings_are_one_line(sections, line):
    from evo.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({**small_sections(), **sections})
    assert str(err.value).startswith(line)


def test_a_bad_memory_setting_on_the_command_line_exits_2(tmp_path):
    from tests.helpers import run_script

    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "cpu_offloading=dict(enable=True, "
                        "num_layers=9)", f"monitor.run_folder={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "evo: error: 'cpu_offloading.num_layers' must be 0 to 'model.num_layers' (4), got 9")
    assert not (tmp_path / "run").exists()


def test_the_benchmark_counts_the_recomputed_attention_that_selective_checkpointing_saves():
    """bench/checkpointing.py's FLOP count: full checkpointing runs every layer's attention forward twice,
    selective once, and the difference is the formula's (layers x 4 x heads x head_dim x sum n (n + 1) / 2)."""
    from bench.checkpointing import child

    full, selective = (child(mode, "cpu", True, 1, tokens=300) for mode in ("full", "selective"))
    assert full["attention_forward_flops"] == 2 * selective["attention_forward_flops"]
    saved = full["attention_forward_flops"] - selective["attention_forward_flops"]
    assert saved == selective["formula_recompute_flops"] > 0
    assert selective["kept_attention_bytes"] == 4 * 300 * 4 * (64 * 4 + 4) and full["kept_attention_bytes"] == 0


@pytest.mark.parametrize("memory", [MemoryOptions(selective_checkpoint=True), MemoryOptions(
    selective_checkpoint=True, selective_checkpoint_offload=True, cpu_offload=True)])
def test_the_memory_estimate_and_the_dry_run_count_what_the_savers_keep_and_move(memory):
    from evo.parallel import memory_estimate
    from evo.parallel.parallelize import computed_memory

    cfg = config_from_dict(small_sections(model=dict(checkpoint=True))).model
    model = build_parallel_model(cfg, ParallelContext(), seed=0, memory=memory)
    estimate = memory_estimate(model, ParallelContext(), cfg, memory, tokens=64)
    kept = 2 * 64 * 4 * (16 * 4 + 4)  # layers x tokens x heads x (fp32 head_dim + lse)
    where = "_on_cpu" if memory.selective_checkpoint_offload else ""
    assert estimate[f"kept_attention{where}"] == kept
    state = ("master_weights", "gradients", "optimizer_state")
    if memory.cpu_offload:  # the fp32 state on the CPU, the fp32 model itself on the device
        assert all(f"{k}_on_cpu" in estimate and k not in estimate for k in state)
        assert estimate["on_cpu"] == kept + sum(estimate[f"{k}_on_cpu"] for k in state)
        assert estimate["total"] == estimate["compute_weights"]
    else:
        assert estimate["total"] == kept + sum(estimate[k] for k in state)
    assert {k: v for k, v in computed_memory(cfg, memory=memory, tokens=64).items()
            if k not in ("layer_weights", "params")} == estimate
