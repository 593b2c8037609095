import math

import pytest
import torch

from helpers import small_sections
from evo import (TrainerBuilder, build_train_loader_with_data_type, build_valid_loader_with_data_type,
                 initialize_distributed_env, initialize_model_and_parallel_communicator)
from evo.config import GradScalerConfig
from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer, lr_factor
from evo.config import LrSchedulerConfig
from evo.parallel.context import ParallelContext


def make_trainer(tmp_path, seed=7, **sections):
    sections.setdefault("monitor", {})["run_folder"] = str(tmp_path / "run")
    initialize_distributed_env(config=small_sections(**sections), launcher="local", seed=seed)
    model = initialize_model_and_parallel_communicator()
    train_dl, types = build_train_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, build_valid_loader_with_data_type(), dataset_types=types)
    return trainer


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch(tmp_path):
    trainer = make_trainer(tmp_path, data=dict(micro_num=3))
    batch = trainer.load_new_batch()
    inputs, labels = batch
    labels[1, :20] = -100  # micro-batches with different label counts: a mean of means would differ
    out = trainer.execute_schedule(batch)
    accumulated = grads_of(trainer.model)  # fp32 model: the masters are the parameters
    loss = float(out["loss_sums"].sum()) / out["label_count"]

    # one big batch: all rows concatenated into one packed sequence set, one backward of the token mean
    model = trainer.model
    model.zero_grad()
    offsets, cus = 0, []
    for cu in inputs["cu_seqlens"]:
        cus.append(cu[:-1] + offsets)
        offsets += int(cu[-1])
    cu_all = torch.cat(cus + [torch.tensor([offsets], dtype=torch.int32)])
    token_loss = model(inputs["input_ids"].reshape(-1), cu_all, labels=labels.reshape(-1))
    big = token_loss.sum() / (labels != -100).sum()
    big.backward()
    assert loss == pytest.approx(big.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_step_clips_to_clip_grad_norm_and_reports_the_unclipped_norm(tmp_path):
    trainer = make_trainer(tmp_path, hybrid_zero_optimizer=dict(clip_grad_norm=0.01))
    trainer.execute_schedule(trainer.load_new_batch())
    grads = [p.grad for p in trainer.model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    seen = {}
    adam_step = trainer.optimizer.optimizer.step

    def spy():
        seen["norm"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.model.parameters()])).item()
        adam_step()

    trainer.optimizer.optimizer.step = spy
    norm = trainer.step()
    assert norm == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01 and seen["norm"] == pytest.approx(0.01, rel=1e-4)


def test_fp16_overflow_skips_the_step_and_backs_off(tmp_path):
    trainer = make_trainer(tmp_path, model=dict(dtype="torch.float16"), hybrid_zero_optimizer=dict(clip_grad_norm=0.0),
                           grad_scaler=dict(hysteresis=1))
    assert trainer.scaler.enabled and trainer.scaler.scale == 2.0**16
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.execute_schedule(trainer.load_new_batch())
    trainer.optimizer.masters["norm.weight"].grad[0] = float("inf")
    norm = trainer.step()
    assert math.isinf(norm) or math.isnan(norm)
    assert trainer.inf_nan_skip_batches == 1 and trainer.step_count == 1
    assert trainer.scaler.scale == 2.0**15  # backed off
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing updated
    # the next, finite step updates, and the fp16 model follows its fp32 masters
    trainer.execute_schedule(trainer.load_new_batch())
    assert math.isfinite(trainer.step())
    assert trainer.inf_nan_skip_batches == 1
    assert not torch.equal(trainer.model.norm.weight, before["norm.weight"])
    torch.testing.assert_close(trainer.model.norm.weight.float(), trainer.optimizer.masters["norm.weight"],
                               rtol=1e-3, atol=1e-3)


def test_nan_is_skipped_in_bf16_too():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    opt = MixedPrecisionOptimizer(model, small_adam(), 0.0, DynamicLossScaler(GradScalerConfig(), False),
                                  ParallelContext())
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    model.bias.grad = torch.zeros_like(model.bias)
    before = model.weight.detach().clone()
    updated, norm = opt.step()
    assert not updated and math.isnan(norm) and torch.equal(model.weight, before)


def small_adam():
    from evo.config import AdamConfig

    return AdamConfig(lr=0.1)


def test_loss_scaler_hysteresis_and_growth():
    cfg = GradScalerConfig()
    cfg.fp16.growth_interval, cfg.hysteresis = 3, 2
    s = DynamicLossScaler(cfg, True)
    s.update(True)
    assert s.scale == 2.0**16  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 2.0**15
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**16


def test_lr_schedule_warmup_then_cosine_to_eta_min():
    f = lr_factor(LrSchedulerConfig(total_steps=100, warmup_ratio=0.1, eta_min=1e-4), base_lr=1e-3)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_metrics_per_step(tmp_path):
    trainer = make_trainer(tmp_path, data=dict(total_steps=2))
    record = trainer.train()
    assert record["step"] == 2
    assert record["num_consumed_tokens"] == 2 * 2 * 64  # steps x micro_num x (seq_len x micro_bsz)
    assert record["tokens/dummy"] == 2 * 64
    assert record["loss/dummy"] == pytest.approx(record["loss"])
    assert record["loss"] == pytest.approx(math.log(300), rel=0.05)  # random tokens stay near uniform
    assert record["tgs"] > 0 and record["tflops"] > 0 and record["lr"] > 0
