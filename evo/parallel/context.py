"""ParallelContext: who this process is, and its groups, as a view over one DeviceMesh.

The mesh is built once at launch (``ParallelContext.from_config``, called by ``evo.initialize``) in InternEvo's
rank order: tensor groups are contiguous, data groups strided by tp, pipeline groups strided by tp * dp,

    rank = tp_rank + tp * dp_rank + tp * dp * pp_rank        mesh dims ("pp", "dp", "tp"),

with the data dimension split in two, ("dp_replicate", "zero"): zero groups are contiguous runs
of ``zero1.size`` ranks inside each data group (InternEvo's Initializer_Zero1: [0, 2], [4, 6] for
tp=2, zero=2, dp=4), replicated across the runs (HSDP); "dp" is the two flattened. Intern sequence
parallelism (isp) reuses this mesh: its weight groups (contiguous runs of w ranks within a pipeline stage,
crossing sequence and data groups) and weight-data groups (strided by w, zero inside them) are the
("dp", "tp") dimensions flattened to one and unflattened into ("wdp", "wp"): ``DeviceMesh._flatten``
and ``_unflatten``, the same process set, nothing rebuilt.

Groups are reached through the context (``ctx.tp_group``, ``ctx.mesh["zero"]``), never module globals.
A world of one process has no mesh and no groups: every collective here is then a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from evo.config import (TENSOR_MODE, ConfigError, ExpertDim, ParallelConfig, ParallelDim, Sequence2DConfig,
                        TensorMode, data_and_zero_sizes)


@dataclass
class ParallelContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    pp_size: int = 1
    dp_size: int = 1
    tp_size: int = 1
    zero_size: int = 1  # ranks sharing one copy of the fp32 weights and optimizer state (inside a data group)
    tp_mode: str = "mtp"  # mtp, msp or fsp (evo.parallel.tensor), or isp (evo.parallel.sequence: tp is the
    # sequence group)
    pp_mode: str = "1F1B"  # the pipeline schedule (evo.parallel.pipeline): 1F1B, ZBH1 or ZBV
    weight_size: int = 1  # isp: weight-parallel group size (contiguous runs of ranks within a pipeline stage)
    ep_size: int = 1  # expert-parallel group size (runs of data ranks; evo.parallel.expert)
    mesh: object = field(default=None, repr=False)  # DeviceMesh ("pp", "dp_replicate", "zero", "tp"), or None
    dp_mesh: object = field(default=None, repr=False)  # ("dp_replicate", "zero") flattened to "dp"
    weight_mesh: object = field(default=None, repr=False)  # isp: ("wdp", "wp"), the (dp, tp) ranks regrouped
    expert_mesh: object = field(default=None, repr=False)  # expert parallelism: ("pp", "dp_replicate", "edp", "ep",
    # "tp"), the zero dimension (all of the data ranks) unflattened
    expert_fsdp_mesh: object = field(default=None, repr=False)  # what FSDP2 shards the spread experts over: "edp",
    # with tp > 1 ("edp", "tp") flattened (the tensor ranks route their own tokens, or their own pieces under mtp)
    sequence_2d: Sequence2DConfig | None = None  # isp's sequence group as head x context (evo.parallel.sequence_2d)
    sequence_2d_mesh: object = field(default=None, repr=False)  # the "tp" dimension unflattened: ("cp", "hp") with
    # head groups as runs (head_first), else ("hp", "cp")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int = 1, rank: int = 0, local_rank: int = 0,
                    device: torch.device | None = None) -> "ParallelContext":
        """This rank's context for the layout ``parallel`` (a validated ``parallel`` section) over ``world_size``
        processes. The layout is checked first (``evo.config.layout.layout_error``: a ``ConfigError`` naming the
        keys, the same on every rank, before any collective) and the data, zero and weight sizes are worked out
        here, once (``evo.config.data_and_zero_sizes``); then the device is chosen (``select_device``, unless given),
        and, with more than one process, the process group is started (``start_process_group``)
        and the one mesh that every group comes from is built (a collective: every rank calls this). Under isp
        (tp the sequence group) ZeRO is the weight group's (zero1 is not used) and the weight mesh regroups each
        stage's (dp, tp) ranks into contiguous weight groups of ``parallel.weight.size`` ranks."""
        ctx = cls.plan(parallel, world_size, rank, local_rank)
        ctx.device = select_device(local_rank) if device is None else device
        if world_size > 1:
            start_process_group(world_size, rank, ctx.device, parallel.timeout_s)
            ctx._build_mesh()
        return ctx

    @classmethod
    def plan(cls, parallel: ParallelConfig, world_size: int = 1, rank: int = 0,
             local_rank: int = 0) -> "ParallelContext":
        """The layout of ``from_config`` without a device, process group or mesh (what a dry run reports): the
        sizes worked out and checked (``ConfigError`` when they do not fit the world)."""
        pp, tp, weight = parallel.pipeline.size, parallel.tensor.size, parallel.weight.size
        tp_mode, pp_mode = parallel.tensor.mode or "mtp", parallel.pipeline.mode or "1F1B"
        dp, zero = data_and_zero_sizes(parallel, world_size)  # a ConfigError when the layout does not fit
        ep = parallel.expert.size if parallel.expert.size >= 1 else dp  # validation resolved -1 with the experts
        two_d = parallel.sequence_2D if parallel.sequence_2D.enable and tp > 1 else None
        return cls(world_size=world_size, rank=rank, local_rank=local_rank, pp_size=pp, dp_size=dp, tp_size=tp,
                   zero_size=zero, tp_mode=tp_mode, weight_size=weight, pp_mode=pp_mode, ep_size=ep, sequence_2d=two_d)

    def _build_mesh(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        pp, dp, zero, tp = self.pp_size, self.dp_size, self.zero_size, self.tp_size
        self.mesh = init_device_mesh(self.device.type, (pp, dp // zero, zero, tp),
                                     mesh_dim_names=("pp", "dp_replicate", "zero", "tp"))
        self.dp_mesh = self.mesh["dp_replicate", "zero"]._flatten("dp")
        if self.ep_size > 1:  # InternEvo's expert groups: runs of ep data ranks (evo.parallel.expert)
            data_dim = 2 if zero == dp else 1  # the data ranks: "zero" (ZeRO over all of them) or, under isp (no
            # zero groups), "dp_replicate"
            self.expert_mesh = self.mesh._unflatten(data_dim, (dp // self.ep_size, self.ep_size), ("edp", "ep"))
            self.expert_fsdp_mesh = self.expert_mesh["edp"] if tp == 1 else \
                self.expert_mesh["edp", "tp"]._flatten("edp_tp")
        if self.sequence_2d is not None:
            s = self.sequence_2d
            sizes, names = ((s.context_size, s.head_size), ("cp", "hp")) if s.device_placement_strategy.head_first \
                else ((s.head_size, s.context_size), ("hp", "cp"))
            self.sequence_2d_mesh = self.mesh._unflatten(3, sizes, names)
        if self.tensor_mode.weight_parallel:  # InternEvo's weight groups [0, 1] [2, 3], weight-data groups [0, 2]
            # [1, 3] (w = 2)
            stage = self.mesh["dp_replicate", "zero", "tp"]._flatten("dp_tp")
            self.weight_mesh = stage._unflatten(0, (dp * tp // self.weight_size, self.weight_size), ("wdp", "wp"))

    # ------------------------------------------------------------------ coordinates
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def zero_rank(self) -> int:
        return self.dp_rank % self.zero_size

    @property
    def is_main(self) -> bool:
        """The rank that writes logs, metrics and single-writer files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tensor_mode(self) -> TensorMode:
        """What ``tp_mode`` shards and gathers (``evo.config.layout.TENSOR_MODE``)."""
        return TENSOR_MODE[self.tp_mode]

    @property
    def sequence_parallel(self) -> bool:
        """msp, fsp and isp keep norms and residuals on sequence shards of the tensor group."""
        return self.tp_size > 1 and self.tensor_mode.sequence_parallel

    # ------------------------------------------------------------------ groups
    @property
    def tp_group(self):
        """The tensor-parallel group (None when tp = 1)."""
        return self.mesh["tp"].get_group() if self.tp_size > 1 else None

    @property
    def dp_group(self):
        """The data-parallel group (None when dp = 1)."""
        return self.dp_mesh.get_group() if self.dp_size > 1 else None

    @property
    def pp_group(self):
        """The pipeline group (None when pp = 1)."""
        return self.mesh["pp"].get_group() if self.pp_size > 1 else None

    @property
    def ep_group(self):
        """This rank's expert group (None without expert parallelism)."""
        return self.expert_mesh["ep"].get_group() if self.ep_size > 1 else None

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.mesh is not None else None

    @property
    def fsdp_mesh(self):
        """FSDP2's mesh: ("dp_replicate", "zero"), HSDP replicating across zero groups and sharding within one; just
        "zero" when there is one zero group."""
        if self.mesh is None:
            return None
        if self.tensor_mode.weight_parallel:  # each rank of a stage sees its own tokens: shard over wp, replicate
            # over wdp
            return self.weight_mesh
        return self.mesh["zero"] if self.dp_size == self.zero_size else self.mesh["dp_replicate", "zero"]

    def all_reduce_dp(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the data-parallel group (a no-op in a world of one)."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, op=op, group=self.dp_group)
        return tensor

    def all_reduce_pp(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the pipeline group (a no-op without pipeline parallelism)."""
        if self.pp_size > 1:
            dist.all_reduce(tensor, op=op, group=self.pp_group)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` is True on every rank (a collective; in one process, ``flag``)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> str:
        """The layout in one line, for the start-up log."""
        two_d, here = self._describe_2d()
        return (f"world {self.world_size} = pp {self.pp_size} x dp {self.dp_size} x tp {self.tp_size} "
                f"(pipeline {self.pp_mode}, tensor mode {self.tp_mode}, zero groups of {self.zero_size}, "
                f"weight groups of {self.weight_size}, expert groups of {self.ep_size}{two_d}); this rank "
                f"{self.rank}: pp {self.pp_rank} dp {self.dp_rank} tp {self.tp_rank} zero {self.zero_rank}{here}" +
                (f", expert group {self.expert_group_ranks()}" if self.ep_size > 1 else ""))

    def _describe_2d(self) -> tuple[str, str]:
        """(the 2D sequence group's sizes, this rank's place in it) for ``describe``; empty without it."""
        s = self.sequence_2d
        if s is None:
            return "", ""
        from evo.parallel.sequence_2d import place_2d

        hs, cs = s.head_size, s.context_size
        c, h = place_2d(self.tp_rank, hs, cs, s.device_placement_strategy.head_first)
        return (f", 2D sequence groups of head {hs} x context {cs} (windows of {s.window_size}, {s.kv_exchange})",
                f", head {h} context {c}")

    def sequence_2d_layout(self):
        """This rank's ``evo.parallel.sequence_2d.SequenceGroup2D``: its head group and context group (ranks in
        context order, windows as InternEvo's initializer places them), from the mesh."""
        from evo.parallel.context_attention import ContextGroup
        from evo.parallel.sequence_2d import SequenceGroup2D, sequence_2d_groups

        s, mesh = self.sequence_2d, self.sequence_2d_mesh
        place = s.device_placement_strategy
        tp_ranks = dist.get_process_group_ranks(self.tp_group)
        groups = sequence_2d_groups(tp_ranks, s.head_size, s.context_size, s.window_size, place.head_first,
                                    place.interleaved)
        cp = mesh["cp"].get_group()
        ranks = dist.get_process_group_ranks(cp)
        windows = [[ranks.index(r) for r in w] for w in groups["intra_window"] if set(w) <= set(ranks)]
        context = ContextGroup(ranks, ranks.index(self.rank), windows, cp)
        head = mesh["hp"].get_group() if s.head_size > 1 else None
        head_index = dist.get_group_rank(head, self.rank) if head is not None else 0
        return SequenceGroup2D(s.head_size, head_index, head, context, place.head_first, s.kv_exchange == "all_gather")

    def expert_group_ranks(self) -> list[int]:
        """The global ranks of this rank's expert group (evo.parallel.expert.expert_groups)."""
        from evo.parallel.expert import expert_groups

        groups, _ = expert_groups(self.world_size, self.pp_size, self.tp_size, self.ep_size)
        return next(g for g in groups if self.rank in g)


def select_device(local_rank: int) -> torch.device:
    """This process's device: GPU ``local_rank`` when there are GPUs (made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")  # scripts/train.py flushes denormals to zero before any thread starts
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:  # one process per GPU: more processes on a node than GPUs is a launch mistake
        raise ConfigError(f"this process is local rank {local_rank} of its node, which has {gpus} GPU"
                          f"{'s' if gpus != 1 else ''}: start at most {gpus} process{'es' if gpus != 1 else ''} "
                          f"per node (torchrun --nproc_per_node {gpus}; srun --ntasks-per-node {gpus})")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def start_process_group(world_size: int, rank: int, device: torch.device, timeout_s: float = 1800.0) -> None:
    """The default process group of ``world_size`` processes, unless one exists: nccl for CUDA devices, gloo
    otherwise; rendezvous from the launcher's environment (MASTER_ADDR, MASTER_PORT)."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)


def build_context(world_size: int, rank: int, local_rank: int, device: torch.device, pp: int, tp: int, zero1: int,
                  tp_mode: str, weight: int = 1, pp_mode: str = "1F1B", ep: int = 1,
                  sequence_2d: Sequence2DConfig | None = None) -> ParallelContext:
    """``ParallelContext.from_config`` for a layout given by its sizes rather than a config section (tests and
    benchmarks): pipeline ``pp``, tensor ``tp`` in ``tp_mode``, InternEvo's ``zero1``, isp's ``weight``, expert
    groups of ``ep``, isp's group split by ``sequence_2d`` (enabled)."""
    parallel = ParallelConfig(zero1=ParallelDim(size=zero1), tensor=ParallelDim(size=tp, mode=tp_mode),
                              pipeline=ParallelDim(size=pp, mode=pp_mode), weight=ParallelDim(size=weight),
                              expert=ExpertDim(size=ep), sequence_2D=sequence_2d or Sequence2DConfig())
    return ParallelContext.from_config(parallel, world_size, rank, local_rank, device)
