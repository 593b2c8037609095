"""The optimizer side of a step: fp32 master weights, dynamic loss scaling, clipping, the lr schedule.

``MixedPrecisionOptimizer`` runs AdamW on fp32 master weights, in one of two settings:
- one process: the masters are fp32 copies of the bf16/fp16 model parameters (the parameters
  themselves for an fp32 model), started from the fp32 values a model was initialized with when it
  keeps them (``initial_masters``), as FSDP2's masters start; micro-batch gradients are accumulated
  into the masters' fp32 ``.grad`` after each backward, so accumulation never rounds to 16 bits;
- more processes: FSDP2 (``evo.parallel.parallelize``) holds the fp32 masters as the parameters'
  shards and reduce-scatters fp32 gradients into them; this class then sees DTensors and leaves the
  communication to FSDP2.
With ``cpu_offload`` (``hybrid_zero_optimizer.cpu_offload``) the masters, their gradients and AdamW's state live
on the CPU: in one process this class keeps them there itself (fp32 copies, even of an fp32 model), under FSDP2
its ``CPUOffloadPolicy`` does.
``step()`` unscales the gradients, computes the global gradient norm (over every shard and group:
all ranks get the same number, so all agree on skipping a step), skips the update when it is inf or
NaN (and tells the loss scaler), clips, and steps AdamW. Its state is keyed by parameter FQN,
independent of layout, for ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from evo.config import AdamConfig, GradScalerConfig, LrSchedulerConfig
from evo.model.decoder import tied_name
from evo.parallel.context import ParallelContext
from evo.parallel.shards import local


class DynamicLossScaler:
    """InternEvo's dynamic grad scaler: back off after ``hysteresis`` overflows, grow after
    ``growth_interval`` clean steps. Disabled (scale 1) for bf16 and fp32."""

    def __init__(self, cfg: GradScalerConfig, enabled: bool):
        self.enabled = enabled
        self.cfg = cfg
        self.scale = float(cfg.fp16.initial_scale) if enabled else 1.0
        self.growth_tracker = 0
        self.hysteresis_tracker = cfg.hysteresis

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        c = self.cfg
        if overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * c.backoff_factor, c.fp16.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == c.fp16.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = c.hysteresis
                self.scale = min(self.scale * c.growth_factor, c.max_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved scaler; one saved disabled (a bf16/fp32 run) leaves this one as configured, and the
        scale is kept within this config's [fp16.min_scale, max_scale]."""
        if not self.enabled or not state.get("enabled", True):
            return
        self.scale = min(max(float(state["scale"]), self.cfg.fp16.min_scale), self.cfg.max_scale)
        self.growth_tracker = state["growth_tracker"]
        self.hysteresis_tracker = state["hysteresis_tracker"]


def lr_factor(cfg: LrSchedulerConfig, base_lr: float):
    """The multiplier of ``adam.lr`` at a step: linear warmup to 1, then cosine decay to eta_min / lr.

    The schedule is positioned at ``step + init_steps`` (init_steps: steps trained before this
    schedule began). Warmup lasts ``ceil(warmup_ratio * total_steps)`` steps.
    """
    warmup = math.ceil(cfg.warmup_ratio * cfg.total_steps)
    floor = cfg.eta_min / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        s = step + cfg.init_steps
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, cfg.total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class LrSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The lr of every step (``lr_factor`` times ``adam.lr``) over a ``MixedPrecisionOptimizer``'s groups.

    ``load_state_dict`` continues from a checkpoint's step with this schedule (this config's ``adam.lr``,
    ``lr_scheduler.*`` and ``data.total_steps``), which may differ from the one the checkpoint ran, as InternEvo's
    load_scheduler does. Its state is LambdaLR's, so checkpoints of either load into the other."""

    def __init__(self, optimizer: "MixedPrecisionOptimizer", cfg: LrSchedulerConfig, lr: float):
        super().__init__(optimizer.optimizer, [lr_factor(cfg, lr)] * len(optimizer.param_groups))

    def load_state_dict(self, state: dict) -> float:
        """Position the schedule at ``state``'s step; returns the lr the saved schedule had for the next step."""
        base_lrs = list(self.base_lrs)  # this config's adam.lr, one per group
        super().load_state_dict(state)
        saved_lr = self.get_last_lr()[0]
        self.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(self.last_epoch)
        return saved_lr


def global_grad_norm(grads: list[torch.Tensor], distributed: bool = False, device=None) -> torch.Tensor:
    """The 2-norm of all gradients together (fp64), the same on every rank: each rank's sum of squares of its
    local tensors in fp64, a DTensor's replicated copies counted once, all-reduced over the world when
    ``distributed`` (the gradients are then FSDP2's DTensor shards). fp64 sums make the norm, and so the
    clipping, independent of how the gradients are split (an fp32 sum of a million squares is off in the sixth
    digit, differently for every split). ``device``: where the all-reduce runs (NCCL's device, for gradients
    offloaded to the CPU)."""
    total = torch.zeros((), dtype=torch.float64, device=local(grads[0]).device if grads else None)
    for g in grads:
        copies = 1
        if isinstance(g, DTensor):
            for dim, placement in enumerate(g.placements):
                if placement.is_replicate():
                    copies *= g.device_mesh.size(dim)
        total += local(g).double().square().sum() / copies
    if distributed:  # every rank joins, with or without gradients of its own
        if device is not None:
            total = total.to(device)
        dist.all_reduce(total)
    return total.sqrt()


class MixedPrecisionOptimizer:
    def __init__(self, model: nn.Module, adam: AdamConfig, clip_grad_norm: float, scaler: DynamicLossScaler,
                 ctx: ParallelContext, cpu_offload: bool = False):
        self.model, self.clip_grad_norm, self.scaler, self.ctx = model, clip_grad_norm, scaler, ctx
        self.on_cpu = cpu_offload and not ctx.distributed  # this class keeps the masters on the CPU (FSDP2 would)
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())  # FQN -> model param (tied: once)
        self.masters: dict[str, torch.Tensor] = {}
        initial = model.__dict__.pop("initial_masters", None) or {}  # the fp32 values the 16-bit model rounds
        for name, p in self.params.items():
            start = initial.get(name)
            if start is None or not torch.equal(start.to(p.dtype), p):  # absent, or the model changed since
                start = p
            if p.dtype == torch.float32 and not self.on_cpu:
                self.masters[name] = p
            else:  # a copy of its own: fp32, on the CPU when offloaded
                master = start.detach().to("cpu" if self.on_cpu else p.device, torch.float32, copy=True)
                self.masters[name] = master.requires_grad_(True)
        self.separate_masters = any(m is not self.params[n] for n, m in self.masters.items())
        # a pipeline's tied head: a copy whose gradient the embedding's copy also holds, counted once in the norm
        self.duplicates = set(model.duplicate_parameters()) if hasattr(model, "duplicate_parameters") else set()
        # ... saved under the name of the weight it copies (the name one process uses for the one tied tensor)
        self.aliases = {name: tied_name(name, True) for name in self.duplicates}
        decay = [m for n, m in self.masters.items() if m.ndim >= 2]
        no_decay = [m for n, m in self.masters.items() if m.ndim < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": adam.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=adam.lr, betas=(adam.adam_beta1, adam.adam_beta2), eps=adam.adam_eps,
            foreach=False)  # the per-tensor loop: same result on every device, and checkpoints resume bit for bit

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def accumulate_grads(self) -> None:
        """Move the model's (16-bit) gradients into the fp32 masters; call after each backward."""
        if not self.separate_masters:
            return
        for name, p in self.params.items():
            if p.grad is None:
                continue
            m = self.masters[name]
            if m.grad is None:
                m.grad = p.grad.to(m.device, torch.float32, copy=True)
            else:
                m.grad.add_(p.grad.to(m.device))
            p.grad = None

    def zero_grad(self) -> None:
        for m in self.masters.values():
            m.grad = None
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Sync, unscale, check, clip and update. Returns (updated, gradient norm before clipping)."""
        self.accumulate_grads()
        with_grad = {n: m for n, m in self.masters.items() if m.grad is not None}
        grads = [m.grad for m in with_grad.values()]  # reduced over data-parallel ranks by FSDP2 (one process: none)
        shards = [local(g) for g in grads]
        if self.scaler.scale != 1.0:
            torch._foreach_mul_(shards, 1.0 / self.scaler.scale)
        norm = global_grad_norm([m.grad for n, m in with_grad.items() if n not in self.duplicates],
                                self.ctx.distributed, self.ctx.device)
        norm_value = float(norm)  # the one host sync of a step: the skip decision needs it
        overflow = not math.isfinite(norm_value)
        self.scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return False, norm_value
        if self.clip_grad_norm > 0:  # torch's clip_grads_with_norm_ formula, on the local shards
            coef = min(1.0, self.clip_grad_norm / (norm_value + 1e-6))
            if coef < 1.0:
                torch._foreach_mul_(shards, coef)
        self.optimizer.step()
        if self.separate_masters:
            for name, p in self.params.items():
                p.copy_(self.masters[name])
        self.zero_grad()
        return True, norm_value

    # ---------------------------------------------------------------- checkpoint state, keyed by FQN
    def _ensure_state(self) -> None:
        """Create AdamW's state as its first step would, so a checkpoint can be loaded into it."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def state_dict(self) -> dict:
        """{"master": {fqn: fp32}, "exp_avg": {...}, "exp_avg_sq": {...}, "step": {...}} (tensors, shared)."""
        self._ensure_state()
        out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
        for name, m in self.masters.items():
            key = self.aliases.get(name, name)
            if key != name and key in self.masters:  # both tied copies here (ZBV's rank 0): one entry, see
                continue  # copy_tied_state
            state = self.optimizer.state[m]
            out["master"][key] = m.data
            for part in ("exp_avg", "exp_avg_sq", "step"):
                out[part][key] = state[part]
        return out

    @torch.no_grad()
    def copy_tied_state(self) -> None:
        """After a load: a tied copy that ``state_dict`` left out (its twin is on this rank) takes the twin's state."""
        for name, key in self.aliases.items():
            if key in self.masters:
                self.masters[name].copy_(self.masters[key])
                twin, state = self.optimizer.state[self.masters[key]], self.optimizer.state[self.masters[name]]
                for part in ("exp_avg", "exp_avg_sq", "step"):
                    state[part].copy_(twin[part])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Take ``state`` (the form ``state_dict`` returns): its tensors are copied into the masters and AdamW's
        state, unless they are those very tensors (DCP loads into ``state_dict()``'s in place); then a tied copy
        takes its twin's state and the model its masters."""
        own = self.state_dict()
        for part, tensors in state.items():
            for key, tensor in tensors.items():
                target = own[part][key]
                if local(target).data_ptr() != local(tensor).data_ptr():
                    target.copy_(tensor)
        self.copy_tied_state()
        self.sync_model_from_masters()  # the fp32 masters are the more precise copy

    @torch.no_grad()
    def sync_model_from_masters(self) -> None:
        """After loading masters in place: copy them into the 16-bit model parameters."""
        if self.separate_masters:
            for name, p in self.params.items():
                p.copy_(self.masters[name])

    @torch.no_grad()
    def sync_masters_from_model(self) -> None:
        """After loading only the model: take the masters from it."""
        if self.separate_masters:
            for name, p in self.params.items():
                self.masters[name].copy_(p)
