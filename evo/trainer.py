"""The training loop InternEvo documents, made explicit.

``Trainer.fit()`` = ``train()`` and then a final evaluation, checkpoint and sample. Each step:
``load_new_batch`` -> ``execute_schedule`` (token counts, then ``forward_backward_step``: the step's
``data.micro_num`` micro-batches through the layout's schedule object, ``evo.parallel.schedule``, plain
accumulation or a pipeline schedule) -> ``step`` -> ``evaluate_on_val_dls`` (every ``data.valid_every``) ->
``try_save_checkpoint``. The loop only: what to save and when, and resuming, is ``evo.checkpoint``'s
``CheckpointManager``; FLOPs ``evo.model.flops``; what one run is ``evo.run_folder``; folders of weights
``evo.weights``.

The loss of a step is the mean over every labelled token of the step, across its micro-batches and
data-parallel ranks (InternEvo averages per-micro-batch means instead): each micro-batch's summed
token loss is divided by the step's global label count before backward, so gradient accumulation
gives exactly the gradient of one big batch.

``TrainerBuilder`` is the entry point of the documented flow: it takes the launch state created by
``initialize_distributed_env`` and builds the optimizer, schedule and monitor around the model.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from evo.checkpoint import CheckpointManager
from evo.config import Config, strip_folder_prefix
from evo.data.packing import IGNORE_INDEX, batch_counts
from evo.errors import CheckpointError
from evo.model.decoder import max_seqlen_of
from evo.model.flops import step_flops, whole_model_sizes
from evo.model.moe import moe_blocks, router_metrics, router_stats, set_aux_grad_scale
from evo.monitor import Monitor, logger, peak_tflops, step_profiler
from evo.optim import DynamicLossScaler, LrSchedule, MixedPrecisionOptimizer
from evo.parallel.context import ParallelContext
from evo.parallel.parallelize import reshard
from evo.parallel.schedule import build_schedule
from evo.run_folder import check_not_behind, write_run_config
from evo.stopping import StopRequests, TrainingStopped
from evo.weights import load_weights


class Trainer:
    def __init__(self, model: nn.Module, train_dl, val_dls: dict, cfg: Config, ctx: ParallelContext,
                 dataset_types: list[str], optimizer: MixedPrecisionOptimizer, scheduler, run_folder: Path,
                 matmul_params: int | None = None, profiling: bool = False, monitor: Monitor | None = None):
        self.model, self.train_dl, self.val_dls = model, train_dl, val_dls
        self.cfg, self.ctx, self.dataset_types = cfg, ctx, dataset_types
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, optimizer.scaler
        self.run_folder, self.profiling, self.monitor = Path(run_folder), profiling, monitor
        self.step_count = 0  # completed steps (updated or skipped)
        self.num_consumed_tokens = 0
        self.inf_nan_skip_batches = 0
        self.last_lr = float("nan")  # the lr the last step used
        self._last_eval_step = None
        self.checkpoints = CheckpointManager(cfg, ctx, Path(strip_folder_prefix(cfg.ckpt.save_ckpt_folder)),
                                             model=model, optimizer=optimizer, scheduler=scheduler, loader=train_dl,
                                             counters=self)
        self.stopped: str | None = None  # why training stopped early (evo.stopping), else None
        self._train_iter = iter(train_dl)
        # the whole model's matmul weights (evo.model.flops), for the tflops metric
        self._matmul_params = whole_model_sizes(model.cfg)[1] if matmul_params is None else matmul_params
        # for MFU: the config's peak, else the table's for this GPU; None (no MFU) where unknown, as on a CPU
        self._peak_tflops = cfg.monitor.peak_tflops or peak_tflops(ctx.device, cfg.model.dtype)
        self.schedule = build_schedule(model, ctx, cfg.data.micro_num)
        self._moe_blocks = moe_blocks(model)  # this rank's (a pipeline rank holds its stages' layers)

    # ------------------------------------------------------------------ the documented loop
    def fit(self) -> dict:
        """Train to ``data.total_steps``; then evaluate, checkpoint and print a sample. Returns the last metrics.

        A run resumed at or past ``data.total_steps`` is complete: it says so and writes nothing. A run stopped
        early (``evo.stopping``) has saved a checkpoint after its last step: the stop file's request returns,
        a signal raises ``TrainingStopped``."""
        total = self.cfg.data.total_steps
        if self.step_count >= total:
            if self.ctx.is_main:
                logger.info("run '%s' is complete: it trained %d steps (data.total_steps=%d); nothing was changed. "
                            "To train further, raise data.total_steps (the lr schedule stretches to the new length); "
                            "to start afresh, use another JOB_NAME (or monitor.run_folder) or remove '%s'",
                            self.run_folder, self.step_count, total, self.run_folder)
            return {}
        last = self.train()
        self.finish_pending_save(wait=True)
        if self.stopped is not None:  # saved at the step boundary already
            if self.monitor is not None:
                self.monitor.close()
            if self.stopped == "stop file":
                logger.info("stopped after step %d as '%s' asked", self.step_count, self.cfg.ckpt.stop_file_path)
                return last
            raise TrainingStopped(self.stopped, self.step_count, self.checkpoints.last_path)
        if self.val_dls and self._last_eval_step != self.step_count:
            last.update(self.evaluate_on_val_dls())
        self.try_save_checkpoint(force=True, background=False)
        if self.monitor is not None:
            self.monitor.close()
        self._print_sample()
        return last

    def train(self) -> dict:
        total = self.cfg.data.total_steps
        write_run_config(self.run_folder, self.cfg, self.ctx.is_main)
        if self.monitor is None:
            self.monitor = Monitor(self.run_folder, self.ctx.is_main, total, self.step_count,
                                   curves=self.cfg.monitor.curves)
        # a torch.profiler trace of a few steps (--profiling), named by the step it ends at
        profiler = step_profiler(self.run_folder / "profile", self.ctx.rank, self.ctx.device,
                                 lambda: self.step_count) if self.profiling else None
        record: dict = {}
        stops = StopRequests(self.ctx, self.cfg.ckpt.stop_file_path)
        with profiler or contextlib.nullcontext(), stops:
            while self.step_count < total and self.stopped is None:
                start = time.perf_counter()
                batch = self.load_new_batch()
                out = self.execute_schedule(batch)
                grad_norm = self.step()
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize(self.ctx.device)
                record = self._step_record(out, grad_norm, time.perf_counter() - start)
                if self.step_count % self.cfg.monitor.log_every == 0 or self.step_count == total:
                    self.monitor.log_step(record)
                every = self.cfg.data.valid_every
                if self.val_dls and every and self.step_count % every == 0:
                    record.update(self.evaluate_on_val_dls())
                save, self.stopped = stops.poll(self.step_count)  # signals and the stop file (evo.stopping)
                self.finish_pending_save()
                self.try_save_checkpoint(force=save, background=self.stopped is None)
                if profiler is not None:
                    profiler.step()
        return record

    def load_new_batch(self):
        """The next step's batch for this rank: ({input_ids, cu_seqlens, indexes, type_ids}, labels)."""
        return next(self._train_iter)

    def execute_schedule(self, batch) -> dict:
        """Run every micro-batch of the step; returns loss sums and token counts (global over dp ranks)."""
        inputs, labels = batch
        micro_num = labels.shape[0]
        n_types = len(self.dataset_types)
        counts = batch_counts(inputs, labels, n_types, self.model.cfg.sliding_window)
        local_tokens, local_seqlen_sq = float(counts[1]), float(counts[2])
        counts = self.ctx.all_reduce_dp(counts.to(self.ctx.device)).cpu()
        denom = max(float(counts[0]), 1.0)
        loss_sums = torch.zeros(n_types, dtype=torch.float64, device=self.ctx.device)
        micros = [({k: (v[i] if isinstance(v, list) else v[i:i + 1]) for k, v in inputs.items()}, labels[i:i + 1])
                  for i in range(micro_num)]
        forwards = micro_num * self.ctx.dp_size  # the step's micro-batches on every data rank
        set_aux_grad_scale(self._moe_blocks, self.cfg.loss.moe_loss_coeff * self.scaler.scale / forwards)
        losses = self.forward_backward_step(micros, denom)
        for (micro, _), token_loss in zip(micros, losses):
            ids = micro["type_ids"].reshape(-1).to(self.ctx.device).clamp(min=0)
            loss_sums.index_add_(0, ids, token_loss.double())
        # the losses are the last pipeline stage's (zeros elsewhere), the router's a stage's layers': summed over
        # pipeline ranks, then data ranks, in one reduction
        router = router_stats(self._moe_blocks, self.model.cfg.num_layers, micro_num, self.model.cfg.num_experts)
        sums = torch.cat([loss_sums, router.flatten().to(self.ctx.device)])
        sums = self.ctx.all_reduce_dp(self.ctx.all_reduce_pp(sums)).cpu()
        return {"loss_sums": sums[:n_types], "label_count": counts[0].item(), "type_labels": counts[3:3 + n_types],
                "type_tokens": counts[3 + n_types:], "tokens": counts[1].item(), "local_tokens": local_tokens,
                "local_seqlen_sq": local_seqlen_sq, "router": sums[n_types:].view(router.shape), "forwards": forwards}

    def forward_backward_step(self, micro_batches: list[tuple[dict, torch.Tensor]],
                              denom: float) -> list[torch.Tensor]:
        """Forward and backward the step's micro-batches (packed rows) in the order of the layout's schedule
        (``evo.parallel.schedule``): each one's summed token loss is scaled by the loss scale over ``denom``, the
        step's global label count. Returns each micro-batch's detached per-token losses (zeros on pipeline ranks
        without the last stage)."""
        return self.schedule.forward_backward_step(self.model, micro_batches, self.scaler.scale / denom,
                                                   self.cfg.loss.label_smoothing, self.optimizer.accumulate_grads)

    def step(self) -> float:
        """Optimizer step (skipped when the gradient norm is inf/NaN); returns the gradient norm."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        updated, grad_norm = self.optimizer.step()
        if not updated:
            self.inf_nan_skip_batches += 1
            logger.warning("step %d: gradient norm is %s; update skipped (loss scale now %g)", self.step_count + 1,
                           grad_norm, self.scaler.scale)
        with warnings.catch_warnings():  # torch warns when a skipped first step never called optimizer.step()
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step_count += 1
        return grad_norm

    @torch.no_grad()
    def evaluate_on_val_dls(self) -> dict:
        """Loss, accuracy and perplexity on every validation set: ``val/<name>_loss|_acc|_plex``."""
        self.model.eval()
        record = {"step": self.step_count}
        dev = self.ctx.device
        for name, loader in self.val_dls.items():
            totals = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, labelled tokens, correct
            for inputs, labels in loader:
                for i in range(labels.shape[0]):
                    cu = inputs["cu_seqlens"][i]
                    loss, correct = self.model(inputs["input_ids"][i].to(dev), cu.to(dev), max_seqlen_of(cu),
                                               labels=labels[i].to(dev), return_accuracy=True)
                    totals += torch.stack([loss.double().sum(), (labels[i] != IGNORE_INDEX).sum().to(dev).double(),
                                           correct.double()])
            loss_sum, count, correct = self.ctx.all_reduce_dp(totals).tolist()
            loss = loss_sum / max(count, 1.0)
            record.update({f"val/{name}_loss": loss, f"val/{name}_acc": correct / max(count, 1.0),
                           f"val/{name}_plex": math.exp(min(loss, 700.0))})
        reshard(self.model)
        self.model.train()
        self._last_eval_step = self.step_count
        if self.monitor is not None:
            self.monitor.log_eval(record)
        return record

    # ------------------------------------------------------------------ checkpoints (evo.checkpoint)
    @property
    def save_folder(self) -> Path:
        return self.checkpoints.save_folder

    def try_save_checkpoint(self, force: bool = False, background: bool = True) -> Path | None:
        """Save every ``ckpt.checkpoint_every`` steps, or now with ``force``: ``CheckpointManager.save_if_due``."""
        return self.checkpoints.save_if_due(self.step_count, force, background)

    def finish_pending_save(self, wait: bool = False) -> None:
        """Complete a background save: ``CheckpointManager.finish_pending``."""
        self.checkpoints.finish_pending(wait)

    def resume(self, path: str | Path, content=("all",)) -> None:
        """Load what ``content`` names from checkpoint ``path``: ``CheckpointManager.load``."""
        self.checkpoints.load(path, content)

    def state_dict(self) -> dict:
        """The trainer's counters, saved with every checkpoint (``evo.checkpoint.COUNTERS``)."""
        return {"step": self.step_count, "num_consumed_tokens": self.num_consumed_tokens,
                "inf_nan_skip_batches": self.inf_nan_skip_batches}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.num_consumed_tokens = state["num_consumed_tokens"]
        self.inf_nan_skip_batches = state["inf_nan_skip_batches"]

    # ------------------------------------------------------------------ helpers
    def _step_record(self, out: dict, grad_norm: float, seconds: float) -> dict:
        self.num_consumed_tokens += int(out["tokens"])
        # per device: a data-parallel rank's tokens are shared by its tp x pp devices, and so is their work
        share = self.ctx.tp_size * self.ctx.pp_size
        flops = step_flops(self.model.cfg, self._matmul_params, out["local_tokens"], out["local_seqlen_sq"]) / share
        record = {"step": self.step_count, "loss": float(out["loss_sums"].sum()) / max(out["label_count"], 1.0),
                  "lr": self.last_lr, "grad_norm": grad_norm,
                  "loss_scale": self.scaler.scale, "tgs": out["local_tokens"] / share / seconds,
                  "tflops": flops / seconds / 1e12, "num_consumed_tokens": self.num_consumed_tokens,
                  "inf_nan_skip_batches": self.inf_nan_skip_batches}
        for t, name in enumerate(self.dataset_types):
            n = float(out["type_labels"][t])
            if n:  # a type with no labelled tokens in this step has no loss (the key is left out)
                record[f"loss/{name}"] = float(out["loss_sums"][t]) / n
            record[f"tokens/{name}"] = int(out["type_tokens"][t])
        record.update(router_metrics(out["router"], self.cfg.loss.moe_loss_coeff, out["forwards"],
                                     self.model.cfg.moe_type == "GShard"))
        if self._peak_tflops:
            record["mfu"] = record["tflops"] / self._peak_tflops
        if self.ctx.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        return record

    def _print_sample(self) -> None:
        prompt = self.cfg.monitor.sample_prompt
        tokenizer = getattr(self.train_dl, "tokenizer", None)
        if not prompt or tokenizer is None:
            return
        from evo.generate import generate

        # every rank generates (a sharded forward has collectives), taking rank 0's tokens; rank 0 prints them
        text = generate(self.model, tokenizer, prompt, self.cfg.monitor.sample_tokens)
        if self.ctx.is_main:
            print(f"\n--- sample (prompt {prompt!r}) ---\n{prompt}{text}\n---", flush=True)


class TrainerBuilder(Trainer):
    """The documented flow's trainer: ``TrainerBuilder(model, train_dl, val_dls, dataset_types=..., **vars(args))``.

    Reads the config and ParallelContext from the launch state, builds the optimizer (fp32 masters, AdamW), the
    loss scaler and the lr schedule, then resumes: from ``ckpt.load_ckpt_info`` when given, else (with
    ``ckpt.auto_resume``) from the newest complete checkpoint in the save folder."""

    def __init__(self, model, train_dl, val_dls, dataset_types=None, profiling: bool = False, **_args):
        from evo.initialize import launch_state

        state = launch_state()
        cfg, ctx = state.config, state.ctx
        scaler = DynamicLossScaler(cfg.grad_scaler, enabled=cfg.model.torch_dtype == torch.float16)
        zero = cfg.hybrid_zero_optimizer  # clipping, and the optimizer state's place
        optimizer = MixedPrecisionOptimizer(model, cfg.adam, zero.clip_grad_norm, scaler, ctx, zero.cpu_offload)
        scheduler = LrSchedule(optimizer, cfg.lr_scheduler, cfg.adam.lr)
        super().__init__(model, train_dl, val_dls, cfg, ctx, list(dataset_types or ["default"]), optimizer, scheduler,
                         state.run_folder, state.model_sizes()[1], profiling=profiling)
        self._auto_load()

    def _auto_load(self) -> None:
        """Resume: the save folder's newest checkpoint (with ``ckpt.auto_resume``) wins over
        ``ckpt.load_ckpt_info``; a run never starts behind checkpoints already in its save folder
        (``evo.run_folder.check_not_behind``)."""
        c = self.cfg.ckpt
        if c.auto_resume and self.checkpoints.resume_newest() is not None:
            return
        if c.load_ckpt_info is not None:
            path = strip_folder_prefix(str(c.load_ckpt_info["path"]))
            if not Path(path).is_dir():
                raise CheckpointError(f"'ckpt.load_ckpt_info.path' '{path}' is not a folder")
            kind = c.load_ckpt_info.get("ckpt_type")
            if kind in ("hf", "internevo"):
                load_weights(self.model, path, kind)  # each rank copies only its part of each tensor
                self.optimizer.sync_masters_from_model()
                logger.info("loaded the model from %s folder %s", "Hugging Face" if kind == "hf" else "InternEvo",
                            path)
            else:
                self.resume(path, c.load_ckpt_info["content"])
        check_not_behind(self.save_folder, self.step_count)
