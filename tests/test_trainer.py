import json
import math
import shutil

import pytest
import torch

from tests.helpers import small_sections
from evo import (TrainerBuilder, build_train_loader_with_data_type, build_valid_loader_with_data_type,
                 initialize_distributed_env, initialize_model_and_parallel_communicator)
from evo.config import GradScalerConfig
from evo.optim import DynamicLossScaler, MixedPrecisionOptimizer, lr_factor
from evo.config import LrSchedulerConfig
from evo.errors import CheckpointError, ConfigError
from evo.monitor import logger
from evo.parallel.context import ParallelContext


def make_trainer(tmp_path, seed=7, folder="run", **sections):
    sections.setdefault("monitor", {}).setdefault("run_folder", str(tmp_path / folder))
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


def unscaled_step(trainer):
    """Run trainer.step() and return (grad norm, the master gradients AdamW was given): with clipping off,
    the unscaled gradients."""
    seen = {}
    adam_step = trainer.optimizer.optimizer.step

    def spy():
        seen.update({n: m.grad.clone() for n, m in trainer.optimizer.masters.items()})
        adam_step()

    trainer.optimizer.optimizer.step = spy
    try:
        norm = trainer.step()
    finally:
        trainer.optimizer.optimizer.step = adam_step
    return norm, seen


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
    # the next, finite step (at the backed-off scale) updates with the unscaled gradients: they and the norm
    # match an fp32 model's on the same batch (AdamW is nearly scale-invariant, so only this catches a
    # missing or doubled unscale)
    trainer.execute_schedule(trainer.load_new_batch())
    norm, grads = unscaled_step(trainer)
    assert math.isfinite(norm) and trainer.inf_nan_skip_batches == 1
    reference = make_trainer(tmp_path / "fp32", hybrid_zero_optimizer=dict(clip_grad_norm=0.0))
    reference.load_new_batch()
    reference.execute_schedule(reference.load_new_batch())
    ref_norm, ref_grads = unscaled_step(reference)
    assert norm == pytest.approx(ref_norm, rel=1e-2)
    diff = torch.linalg.vector_norm(torch.cat([(grads[n] - ref_grads[n]).flatten() for n in ref_grads]))
    assert float(diff) <= 1e-2 * ref_norm
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


def test_loss_scaler_stays_within_min_and_max_scale():
    cfg = GradScalerConfig(max_scale=16.0, hysteresis=1)
    cfg.fp16.initial_scale, cfg.fp16.min_scale, cfg.fp16.growth_interval = 8.0, 4.0, 1
    s = DynamicLossScaler(cfg, True)
    s.update(True)
    s.update(True)
    assert s.scale == 4.0  # backed off to fp16.min_scale, not below
    for expected in (8.0, 16.0, 16.0):
        s.update(False)
        assert s.scale == expected  # grown to max_scale, not past it
    # a saved scale outside this config's caps is brought within them; a disabled (bf16) scaler's state is
    # not taken over
    s.load_state_dict({"scale": 2.0**20, "growth_tracker": 0, "hysteresis_tracker": 1, "enabled": True})
    assert s.scale == 16.0
    s.load_state_dict({"scale": 1.0, "growth_tracker": 0, "hysteresis_tracker": 1, "enabled": False})
    assert s.scale == 16.0


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


def test_step_flops_by_hand_for_a_known_packing(tmp_path):
    """tflops for two packed rows of known documents, against a hand count: weight matmuls 6 * N * tokens with
    N counted from the shapes, attention 6 * layers * heads * head_dim * (2 * causal pairs - s) per document,
    the pairs cut by the sliding window of 5 keys (counted query by query)."""
    trainer = make_trainer(tmp_path, model=dict(head_dim=24, intermediate_size=100, sliding_window=5))
    inputs, labels = trainer.load_new_batch()
    inputs["cu_seqlens"] = [torch.tensor([0, 3, 20, 64], dtype=torch.int32), torch.tensor([0, 64], dtype=torch.int32)]
    inputs["type_ids"][:] = 0  # every token real
    layers, hidden, heads, kv_heads, head_dim, ffn, vocab = 2, 64, 4, 2, 24, 100, 300
    per_layer = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden + 3 * hidden * ffn
    n = layers * per_layer + vocab * hidden  # the output head; the input embedding is a lookup
    pairs = sum(2 * sum(min(i + 1, 5) for i in range(s)) - s for s in (3, 17, 44, 64))
    expected = 6 * n * 128 + 6 * layers * heads * head_dim * pairs
    out = trainer.execute_schedule((inputs, labels))
    record = trainer._step_record(out, 0.0, seconds=0.5)
    assert record["tflops"] == pytest.approx(expected / 0.5 / 1e12, rel=1e-12)


# ---------------------------------------------------------------------------------------------- resuming
def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def step_values(folder, *keys):
    return {r["step"]: tuple(r[k] for k in keys) for r in metrics(folder) if "loss" in r}


def trained(tmp_path, folder, **sections):
    """A finished 4-step run with checkpoints every 2 steps (losses also in its metrics.jsonl)."""
    sections.setdefault("ckpt", {}).setdefault("checkpoint_every", 2)
    trainer = make_trainer(tmp_path, folder=folder, **sections)
    trainer.fit()
    return trainer


def resumed(tmp_path, folder, path, content=("all",), **sections):
    sections.setdefault("ckpt", {})["load_ckpt_info"] = dict(path=str(path), content=content)
    return make_trainer(tmp_path, folder=folder, **sections)


def test_bf16_resume_continues_exactly_from_the_fp32_masters(tmp_path):
    bf16 = dict(model=dict(dtype="torch.bfloat16"), hybrid_zero_optimizer=dict(clip_grad_norm=0.0))
    reference = trained(tmp_path, "ref", **bf16)
    saved = torch.load(tmp_path / "ref" / "checkpoints" / "2" / "train_state.pt", weights_only=False)
    assert saved["step"] == 2
    trainer = resumed(tmp_path, "resumed", tmp_path / "ref" / "checkpoints" / "2", **bf16)
    masters = trainer.optimizer.masters
    # the masters carry what bf16 cannot: loading them from the bf16 model would round them
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())
    for name, p in trainer.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, masters[name].bfloat16()), name
    trainer.fit()
    keys = ("loss", "grad_norm", "lr")
    assert step_values(tmp_path / "resumed", *keys) == {s: v for s, v in step_values(tmp_path / "ref", *keys).items()
                                                        if s > 2}
    for name, m in reference.optimizer.masters.items():
        assert torch.equal(masters[name], m), name
        assert torch.equal(trainer.model.get_parameter(name), reference.model.get_parameter(name)), name


def test_fp16_loss_scaler_state_survives_a_resume(tmp_path):
    fp16 = dict(model=dict(dtype="torch.float16"), ckpt=dict(checkpoint_every=3),
                grad_scaler=dict(fp16=dict(initial_scale=2.0**10, growth_interval=2), hysteresis=3))
    trained(tmp_path, "ref", **fp16)
    saved = torch.load(tmp_path / "ref" / "checkpoints" / "3" / "train_state.pt", weights_only=False)["scaler"]
    assert saved["scale"] == 2.0**11 and saved["growth_tracker"] == 1  # grown once, one clean step since
    trainer = resumed(tmp_path, "resumed", tmp_path / "ref" / "checkpoints" / "3", **fp16)
    assert trainer.scaler.state_dict() == saved
    trainer.fit()
    scales = step_values(tmp_path / "ref", "loss_scale", "loss")
    assert scales[4][0] == 2.0**12  # the growth at step 4 needs the clean step counted before the checkpoint
    assert step_values(tmp_path / "resumed", "loss_scale", "loss") == {4: scales[4]}


def test_resuming_the_scheduler_without_the_sampler_continues_the_step_and_the_schedule(tmp_path):
    schedule = dict(lr_scheduler=dict(warmup_ratio=0.5, eta_min=1e-5))
    trained(tmp_path, "ref", **schedule)
    ref = step_values(tmp_path / "ref", "lr", "num_consumed_tokens")
    checkpoint = tmp_path / "ref" / "checkpoints" / "2"
    trainer = resumed(tmp_path, "sched", checkpoint, content=("model", "optimizer", "scheduler"), **schedule)
    assert trainer.step_count == 2 and trainer.num_consumed_tokens == ref[2][1]
    first = trainer.load_new_batch()  # the data starts over: the first batch of a fresh loader
    fresh = make_trainer(tmp_path, folder="fresh", **schedule)
    assert torch.equal(first[0]["input_ids"], fresh.load_new_batch()[0]["input_ids"])
    trainer.fit()
    got = step_values(tmp_path / "sched", "lr", "num_consumed_tokens")
    assert sorted(got) == [3, 4] and {s: got[s][0] for s in got} == {s: ref[s][0] for s in (3, 4)}
    assert got[4][1] == ref[4][1]  # consumed tokens continue from the checkpoint's count

    # as InternEvo's load_scheduler: this config's adam.lr, at the checkpoint's point of the schedule
    faster = resumed(tmp_path, "lr", checkpoint, content=("scheduler",), adam=dict(lr=2e-3), **schedule)
    faster.fit()
    factor = lr_factor(LrSchedulerConfig(total_steps=4, warmup_ratio=0.5, eta_min=1e-5), 2e-3)
    assert {s: v[0] for s, v in step_values(tmp_path / "lr", "lr").items()} == pytest.approx(
        {s: 2e-3 * factor(s - 1) for s in (3, 4)}, rel=1e-12)

    # the sampler alone: the data position (and random states), a run of its own from step 1
    data_only = resumed(tmp_path, "data", checkpoint, content=("model", "sampler"), **schedule)
    assert data_only.step_count == 0 and data_only.num_consumed_tokens == 0
    reference = make_trainer(tmp_path, folder="order", **schedule)
    for _ in range(2):
        reference.load_new_batch()
    assert torch.equal(data_only.load_new_batch()[0]["input_ids"], reference.load_new_batch()[0]["input_ids"])


def test_a_complete_run_is_left_alone_and_a_longer_one_continues(tmp_path, caplog):
    trained(tmp_path, "run")
    folder = tmp_path / "run"
    state = lambda: {p: (p.read_bytes(), p.stat().st_mtime_ns)  # noqa: E731
                     for p in folder.rglob("*") if p.is_file() and p.name != "train.log"}
    files = state()
    again = make_trainer(tmp_path)
    logger.addHandler(caplog.handler)  # evo's logger does not propagate to the root logger caplog watches
    try:
        assert again.step_count == 4 and again.fit() == {}
    finally:
        logger.removeHandler(caplog.handler)
    assert any(f"run '{folder}' is complete: it trained 4 steps" in r.getMessage() for r in caplog.records)
    assert state() == files  # nothing written (train.log gets the message)
    longer = make_trainer(tmp_path, data=dict(total_steps=6))
    assert longer.step_count == 4
    # the schedule now spans 6 steps: its lr at step 5 is not the 4-step schedule's, and the log says so
    stretched = [line for line in (folder / "train.log").read_text().splitlines() if "step 5 runs at lr" in line]
    assert len(stretched) == 1 and "lr_scheduler.total_steps 6" in stretched[0]
    longer.fit()
    assert [r["step"] for r in metrics(folder) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_continues_the_lr_schedule_exactly(tmp_path):
    """Resumed with the same config, the next step's lr is the one the checkpoint's schedule had (no warning);
    with another adam.lr the schedule continues from the same step with the new lr, and the log says so."""
    trained(tmp_path, "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # resume mid-schedule, from step 2 of 4
    saved = torch.load(tmp_path / "run" / "checkpoints" / "2" / "train_state.pt", weights_only=False)
    log = tmp_path / "run" / "train.log"

    def warned():
        return [line for line in log.read_text().splitlines() if "step 3 runs at lr" in line]

    same = make_trainer(tmp_path)
    assert same.step_count == 2
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(saved["scheduler"]["_last_lr"][0], rel=1e-12)
    assert not warned()
    lower = make_trainer(tmp_path, adam=dict(lr=5e-4))
    expected = 5e-4 * lr_factor(lower.cfg.lr_scheduler, 5e-4)(2)
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(saved["scheduler"]["_last_lr"][0])
    assert len(warned()) == 1 and "adam.lr 0.0005" in warned()[0]


def test_a_fresh_start_over_existing_checkpoints_is_refused(tmp_path):
    trained(tmp_path, "run")
    with pytest.raises(CheckpointError) as err:
        make_trainer(tmp_path, ckpt=dict(auto_resume=False))
    folder = tmp_path / "run" / "checkpoints"
    assert str(err.value).startswith(f"'{folder}' holds checkpoints up to step 4 and ckpt.auto_resume is False: "
                                     "this run would start at step 1 and overwrite them.")
    with pytest.raises(CheckpointError, match="would start at step 3 and overwrite them"):  # behind the newest
        make_trainer(tmp_path, ckpt=dict(auto_resume=False, load_ckpt_info=dict(path=str(folder / "2"))))
    assert sorted(p.name for p in folder.iterdir()) == ["2", "4"]


def test_a_run_folder_holding_another_run_is_refused(tmp_path):
    trained(tmp_path, "run")
    with pytest.raises(ConfigError) as err:
        make_trainer(tmp_path, adam=dict(weight_decay=0.5), data=dict(total_steps=8))
    folder = tmp_path / "run"
    assert str(err.value) == (
        f"run folder '{folder}' holds another run ('{folder / 'checkpoints' / '4' / 'config.json'}' differs from this "
        f"config: adam.weight_decay: 0.01 there, 0.5 here): use another JOB_NAME (or monitor.run_folder) for this config, "
        f"or remove '{folder}' to start afresh")
    # what may change between the invocations of one run is accepted
    make_trainer(tmp_path, data=dict(total_steps=8, valid_every=2, skip_batches="5"), monitor=dict(log_every=2),
                 model=dict(checkpoint=True), parallel=dict(zero1=dict(size=1)))


def test_metrics_stay_strict_json_when_a_type_has_no_tokens_and_a_step_is_skipped(tmp_path):
    sections = small_sections(model=dict(dtype="torch.float16"), data=dict(total_steps=1),
                              grad_scaler=dict(fp16=dict(initial_scale=2.0**40), max_scale=2.0**40),
                              monitor=dict(run_folder=str(tmp_path / "run")))
    initialize_distributed_env(config=sections, launcher="local", seed=1)
    model = initialize_model_and_parallel_communicator()
    train_dl, _ = build_train_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, {}, dataset_types=["dummy", "absent"])
    trainer.fit()

    def reject(name):
        raise ValueError(name)

    (record,) = [json.loads(line, parse_constant=reject) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert record["inf_nan_skip_batches"] == 1 and record["grad_norm"] is None  # overflowed at scale 2**40
    assert "loss/absent" not in record and record["tokens/absent"] == 0 and record["loss/dummy"] > 0


def test_mfu_uses_the_gpu_peak_for_the_compute_dtype(monkeypatch):
    from evo.monitor import peak_tflops

    assert peak_tflops(torch.device("cpu"), "torch.bfloat16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert peak_tflops(cuda, "torch.bfloat16") == 989.4 and peak_tflops(cuda, "torch.tf32") == 494.7
    assert peak_tflops(cuda, "torch.float32") is None  # plain fp32 has no tensor-core peak to compare with
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(cuda, "torch.bfloat16") == 756.0  # the PCIe part, not the SXM part's 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert peak_tflops(cuda, "torch.float16") == 312.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_tflops(cuda, "torch.bfloat16") is None


def test_mfu_on_a_cpu_only_when_its_peak_is_given(tmp_path):
    plain = make_trainer(tmp_path, folder="plain", data=dict(total_steps=1))
    plain.fit()
    given = make_trainer(tmp_path, folder="given", data=dict(total_steps=1), monitor=dict(peak_tflops=0.5))
    given.fit()
    (a,) = [r for r in metrics(tmp_path / "plain") if "loss" in r]
    (b,) = [r for r in metrics(tmp_path / "given") if "loss" in r]
    assert "mfu" not in a and b["mfu"] == pytest.approx(b["tflops"] / 0.5, rel=1e-12)
    with pytest.raises(ConfigError, match=r"'monitor.peak_tflops' must be > 0"):
        make_trainer(tmp_path, folder="bad", monitor=dict(peak_tflops=0))
