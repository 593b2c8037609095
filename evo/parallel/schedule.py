"""Schedules: how one step's micro-batches go through forward and backward.

``Trainer.forward_backward_step`` hands the step's micro-batches to the layout's schedule object (as
InternEvo's trainer hands them to its scheduler) and never branches on the layout. Without pipeline
parallelism the schedule is plain gradient accumulation (``AccumulationSchedule``); with it, a
``torch.distributed.pipelining`` schedule over this rank's stages (``evo.parallel.pipeline.PipelineSchedule``):
1F1B, interleaved 1F1B, ZBH1 or ZBV. Both take the same arguments and return the same thing.
"""

from __future__ import annotations

from typing import Callable

import torch

from evo.model.decoder import max_seqlen_of


class AccumulationSchedule:
    """Each micro-batch forward then backward, in order; gradients accumulate (FSDP2 reduces them after each
    micro-batch's backward)."""

    def forward_backward_step(self, model, micro_batches: list[tuple[dict, torch.Tensor]], loss_scale: float,
                              label_smoothing: float, after_backward: Callable[[], None]) -> list[torch.Tensor]:
        """Forward and backward each ``(inputs, labels)`` micro-batch (one packed row), the backward of
        ``sum(token losses) * loss_scale``, ``after_backward()`` after each; returns their detached per-token
        losses."""
        out = []
        dev = next(model.parameters()).device
        for micro, labels in micro_batches:
            cu = micro["cu_seqlens"].reshape(-1)
            max_seqlen = max_seqlen_of(cu)
            token_loss = model(micro["input_ids"].to(dev), cu.to(dev), max_seqlen, labels=labels.to(dev),
                               label_smoothing=label_smoothing)
            (token_loss.sum() * loss_scale).backward()
            after_backward()
            out.append(token_loss.detach())
        return out


def build_schedule(model, ctx, micro_num: int):
    """The schedule for ``ctx``'s layout: accumulation, or the pipeline schedule of ``model`` (a
    ``PipelineModel``) for ``micro_num`` micro-batches a step."""
    if ctx.pp_size == 1:
        return AccumulationSchedule()
    from evo.parallel.pipeline import PipelineSchedule

    return PipelineSchedule(model, micro_num)
