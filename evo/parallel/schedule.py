"""Schedules: how one step's micro-batches go through forward and backward.

``Trainer.execute_schedule`` hands its micro-batches to the schedule object and never branches on
the layout. Without pipeline parallelism the schedule is plain gradient accumulation; pipeline
schedules (1F1B, interleaved, zero bubble) will replace it with the same interface.
"""

from __future__ import annotations

from typing import Callable

import torch


class AccumulationSchedule:
    """Each micro-batch forward then backward, in order; gradients accumulate (FSDP2 reduces them after each
    micro-batch's backward)."""

    def run(self, micro_batches: list[tuple[dict, torch.Tensor]],
            forward_backward: Callable[[dict, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``forward_backward(micro_batch, labels)`` for each; returns their detached per-token losses."""
        return [forward_backward(micro, labels) for micro, labels in micro_batches]


def build_schedule(ctx) -> AccumulationSchedule:
    """The schedule for ``ctx``'s layout (pipeline parallelism is not available yet: always accumulation)."""
    return AccumulationSchedule()
