"""A rank's part of a tensor: what a parameter holds here (a DTensor's local shard, a plain tensor itself), how
many elements that is, and filling a parameter of any layout from a whole tensor that only this rank's part is
read from (the Hugging Face and InternEvo readers, evo/weights.py and evo/internevo.py); and a rank's part of a
packed row, ``SequenceShards``, the one object that sequence-parallel modules share."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from evo.errors import CheckpointError


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_numel(p: torch.Tensor) -> int:
    return local(p).numel()


def tp_local_numel(p: torch.Tensor) -> int:
    """Elements of the part of ``p`` this rank computes with: its tensor-parallel part, or its expert group's share
    of the experts (all of it when it is split over neither "tp" nor "ep")."""
    if not isinstance(p, DTensor):
        return p.numel()
    names = p.device_mesh.mesh_dim_names or ()
    n = p.numel()
    for name, placement in zip(names, p.placements):
        if name in ("tp", "ep") and placement.is_shard():
            n //= p.device_mesh.size(names.index(name))
    return n


class WholeTensor:
    """A tensor already read, behind safetensors' slice interface (``get_shape``, indexing), for
    ``fill_parameter``."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index]


@torch.no_grad()
def fill_parameter(p: torch.Tensor, source, where: str, key: str) -> None:
    """Copy into parameter ``p`` (plain, or a DTensor: only this rank's part) from ``source``, the whole tensor
    behind safetensors' slice interface (``get_shape``, indexing: a safetensors slice, or a ``WholeTensor``),
    which only the rank's part is read from. A source of another shape is one line naming ``key`` in ``where``
    and both shapes."""
    if tuple(source.get_shape()) != tuple(p.shape):
        raise CheckpointError(f"{where} does not fit this model: '{key}' is {tuple(source.get_shape())} there and "
                              f"{tuple(p.shape)} here")
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        part = p.to_local()
        if part.numel():
            part.copy_(source[tuple(slice(o, o + n) for o, n in zip(offset, shape))].reshape(part.shape))
    else:
        p.copy_(source[tuple(slice(0, n) for n in p.shape)] if p.dim() else source[()])


class SequenceShards:
    """Whether the forward in progress runs on sequence shards of the tensor group (this rank holding tokens
    ``mine(tokens)`` of the packed row), shared by every module that tensor or sequence parallelism changed
    (``DecoderModel.sequence_shards``). The model decides at the start of each forward (``decide``: the
    ``DecoderModel``, or a pipeline stage, before its embedding); the modules read ``sharded``. A forward over a
    packed row whose tokens split evenly runs sharded when the mode shards sequences (``enabled``: msp, fsp, isp);
    any other (batched rows, generation) runs whole on every rank, so one model serves training, evaluation and
    generation. Here a rank holds a contiguous run of the row; 2D sequence parallelism's subclass
    (evo.parallel.sequence_2d.ContextShards) holds tokens spread over the row's documents.

    ``regather_in_backward`` (fsp): a gathered input is gathered again in backward instead of kept."""

    def __init__(self, size: int, rank: int, group, enabled: bool = True, regather_in_backward: bool = False):
        self.size, self.rank, self.group = size, rank, group
        self.enabled, self.regather_in_backward = enabled, regather_in_backward
        self.sharded = False

    def decide(self, tokens: int, packed: bool, cu_seqlens: torch.Tensor | None = None) -> None:
        """The forward starting now covers ``tokens`` tokens, of a packed row (``packed``, its documents ending at
        ``cu_seqlens``) or batched rows."""
        self.sharded = self.enabled and packed and tokens % self.size == 0

    def mine(self, n: int) -> slice | torch.Tensor:
        """This rank's part of ``n`` tokens (an index into the row)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def in_row_order(self, gathered: torch.Tensor) -> torch.Tensor:
        """Rows gathered from the group in rank order, put in the row's order (here they already are)."""
        return gathered
