"""ParallelContext: who this process is and which groups it belongs to.

Created once at launch (``evo.initialize``) and passed explicitly to the model, the loaders and the
trainer. Today evo runs data parallelism only (every process holds the whole model); tensor,
sequence and pipeline groups get their place here when those layouts land, without the trainer
changing shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_group: object = None  # a torch.distributed group, or None in a world of one process

    @property
    def is_main(self) -> bool:
        """The rank that writes logs, metrics and single-writer files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_dp(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the data-parallel group (a no-op in a world of one)."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, op=op, group=self.dp_group)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
