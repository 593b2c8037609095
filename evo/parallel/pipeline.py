"""Pipeline parallelism (``parallel.pipeline=dict(size=p, mode=...)``, ``model.num_chunks=v``).

The layers are cut into ``p * v`` stages. Following InternEvo (``partition_uniform``), the layers first split
into ``v`` equal groups (``num_layers`` must divide by ``v``), and each group into ``p`` consecutive stages;
a group whose layers do not split evenly gives one more layer to the middle stages first (the first stage
also embeds, the last also runs the final norm, the head and the loss). The embedding is on stage 0, the
final norm and head on stage ``p * v - 1``. Pipeline rank ``r`` holds stages ``r, r + p, ...`` (1F1B with
``v = 1``, interleaved 1F1B and ZBH1 with ``v > 1``) or, for ZBV, the V: stages ``r`` and ``2p - 1 - r``.

This rank's part of the model is a ``PipelineModel``: the full model's modules it holds, under the full
model's names (``layers.17.attention.wq``), so a checkpoint's names never depend on the layout. Each of its
stages is a ``PipelineStageModule`` sharing those modules, kept outside the module tree (its names would
repeat the full model's); FSDP2 wraps each stage as a root (with its layers as units), the way
``torch.distributed.pipelining`` expects.

Training runs ``torch.distributed.pipelining``'s schedules (``PipelineSchedule``): ``Schedule1F1B``,
``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble`` (ZBH1) and ``ScheduleZBVZeroBubble``. What
they need from evo, and what evo does for them:
- ``step()`` cuts every keyword tensor along dim 0 into micro-batches, so each micro-batch's ``cu_seqlens``
  (one per packed row, of different lengths) travels as a padded ``(micro_num, max_docs + 1)`` tensor plus
  the document counts ``(micro_num,)``; no int keyword (torch 2.11's zero-bubble split cannot take one);
- the per-token losses leave the last stage; evo's loss function scales their sum by the loss scale over
  the step's global label count (``scale_grads=False``: the schedule must not divide again);
- the zero-bubble schedules split each backward into an input-gradient and a weight-gradient pass by
  running autograd twice over the stage's graph; a fused autograd Function (RMSNorm, the fused
  cross-entropy) then runs its backward twice, once for each. Its cost is measured by ``bench/pipeline.py``.
- torch's stages take fixed shapes (found on the first step) and a fixed micro-batch count per schedule.
  Evaluation rows and generation calls vary in both, so ``PipelineModel.forward`` runs those through the
  stages with its own point-to-point sends (forward only, row after row, no micro-batch overlap), and gives
  every pipeline rank the last stage's result.

Tied embeddings: stage 0's table and the last stage's head are two copies of one weight, initialized
alike; after each step's backward their gradients are summed into both (``sync_tied_grads``), so the
copies stay equal, and the gradient norm counts the head's copy out (``duplicate_parameters``).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from evo.config import PIPELINE_MODE
from evo.model.decoder import DecoderModel, KVCache, cu_seqlens_of, max_seqlen_of



# ---------------------------------------------------------------------------------------------- the split
def split_layers(num_layers: int, pp: int, chunks: int = 1) -> list[list[int]]:
    """Layer indices of each of the ``pp * chunks`` stages, in stage order (see the module docstring)."""
    per_group = num_layers // chunks
    base, extra = divmod(per_group, pp)
    # the extra layers go to the middle stages first, then to the first stage, the last stage last
    middle = sorted(range(1, pp - 1), key=lambda s: abs(s - (pp - 1) / 2))
    favoured = set((middle + [0, pp - 1])[:extra])
    stages, start = [], 0
    for _ in range(chunks):
        for s in range(pp):
            n = base + (s in favoured)
            stages.append(list(range(start, start + n)))
            start += n
    return stages


def rank_stages(pp_rank: int, pp: int, chunks: int, mode: str) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` holds, in the order its schedule lists them."""
    if PIPELINE_MODE[mode].v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(chunks)]


# ---------------------------------------------------------------------------------------------- the modules
class PipelineStageModule(nn.Module):
    """One stage: the embedding (first stage), its layers, the final norm and head (last stage). The modules are
    the ``PipelineModel``'s own. Every call runs through ``__call__`` (FSDP2's hooks gather the parameters).

    Training (under a torch schedule): ``x`` is ``(1, tokens)`` ids on the first stage, else ``(t, hidden)``
    hidden states (t: this rank's share of the row under sequence sharding); ``cu_seqlens`` ``(1, max_docs + 1)``
    padded, ``num_docs`` ``(1,)``, ``labels`` ``(1, tokens)``. Returns the hidden states, or on the last stage the
    per-token losses ``(tokens,)``. ``PipelineModel.forward`` calls it with ``cu_seqlens`` 1-D (``num_docs``
    None), or with a KV cache."""

    def __init__(self, model: "PipelineModel", stage: int, layer_ids: list[int], last: bool):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if stage == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self._shards = model.sequence_shards  # tensor / sequence parallel: decided per call
        self.label_smoothing = 0.0

    def forward(self, x, cu_seqlens=None, num_docs=None, labels=None, return_accuracy=False,
                cache: KVCache | None = None):
        if cache is not None:
            return self._forward_cached(x, cache)
        if num_docs is not None:  # a schedule's micro-batch: strip the padding
            cu_seqlens = cu_seqlens[0, :int(num_docs[0]) + 1]
        max_seqlen = max_seqlen_of(cu_seqlens)
        if self._shards is not None:
            self._shards.decide(int(cu_seqlens[-1]), True, cu_seqlens)
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x.reshape(-1))
        for layer in self.layers.values():
            x = layer(x, cu_seqlens, max_seqlen)
        if self.output is None:
            return x
        h = self.norm(x)
        if labels is None:
            return self.output(h)
        return self.output(h, labels=labels.reshape(-1), label_smoothing=self.label_smoothing,
                           return_accuracy=return_accuracy)

    def _forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """(batch, new) ids or (batch, new, hidden) states continuing the cached positions."""
        if self._shards is not None:
            self._shards.decide(0, False)
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        for i, layer in self.layers.items():
            x = layer(x, cache=cache, layer=int(i))
        return x if self.output is None else self.output(self.norm(x))


class PipelineModel(nn.Module):
    """This pipeline rank's part of the decoder under the full model's parameter names; ``stages`` are its
    ``PipelineStageModule``s in schedule order. Its forward takes ``DecoderModel.forward``'s arguments (packed or
    batched, labels, a KV cache) and returns the same on every pipeline rank; training goes through
    ``PipelineSchedule``."""

    init_std = DecoderModel.init_std
    init_weights = DecoderModel.init_weights

    def __init__(self, full: DecoderModel, ctx, mode: str):
        super().__init__()
        cfg = full.cfg
        self.cfg, self.ctx, self.mode = cfg, ctx, mode
        pp, v = ctx.pp_size, cfg.num_chunks
        self.stage_layers = split_layers(cfg.num_layers, pp, v)
        self.num_stages = pp * v
        self.stage_ids = rank_stages(ctx.pp_rank, pp, v, mode)
        self.owner = {s: r for r in range(pp) for s in rank_stages(r, pp, v, mode)}  # stage -> pipeline rank
        held = sorted(i for s in self.stage_ids for i in self.stage_layers[s])
        first, last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.tok_embeddings = full.tok_embeddings if first else None
        self.rotary = full.rotary
        self.layers = nn.ModuleDict({str(i): full.layers[i] for i in held})
        self.norm = full.norm if last else None
        self.output = full.output if last else None
        if last and cfg.tie_word_embeddings:  # its own copy: a module of another stage (another FSDP root)
            self.output.weight = nn.Parameter(torch.empty_like(full.output.weight))
        self._tied_group = None
        self.sequence_shards = None  # set by tensor or sequence parallelism (before make_stages)
        self.stages: list[PipelineStageModule] = []  # a plain list: outside the module tree; make_stages fills it

    def make_stages(self) -> None:
        """The stage modules (after tensor or sequence parallelism: they read ``sequence_shards``)."""
        self.stages = [PipelineStageModule(self, s, self.stage_layers[s], s == self.num_stages - 1)
                       for s in self.stage_ids]

    def tie_weights(self) -> None:
        """Tied copies are kept apart (see ``sync_tied_grads``); nothing to tie."""

    @property
    def tied(self) -> bool:
        return bool(self.cfg.tie_word_embeddings)

    def duplicate_parameters(self) -> list[str]:
        """Parameters whose gradient another copy also holds (the tied head's): counted once in the norm."""
        return ["output.weight"] if self.tied and self.output is not None else []

    def make_tied_group(self) -> None:
        """The group of the first and last pipeline ranks at this rank's (dp, tp) position (a collective: every
        rank calls it; ZBV keeps both ends on pipeline rank 0 and needs none)."""
        if not self.tied or self.ctx.pp_size == 1 or self.owner[0] == self.owner[self.num_stages - 1]:
            return
        grid = self.ctx.mesh.mesh  # (pp, dp_replicate, zero, tp) global ranks
        ends = torch.stack([grid[0], grid[-1]], dim=-1).reshape(-1, 2).tolist()
        for pair in ends:
            group = dist.new_group(pair)
            if self.ctx.rank in pair:
                self._tied_group = group

    def sync_tied_grads(self) -> None:
        """Sum the two tied copies' gradients into both (after the step's backward, before the optimizer)."""
        if not self.tied or self.ctx.pp_size == 1:
            return
        from evo.parallel.shards import local

        grads = [local(m.weight.grad) for m in (self.tok_embeddings, self.output)
                 if m is not None and m.weight.grad is not None]
        if self._tied_group is None:  # both copies here (ZBV's rank 0)
            if len(grads) == 2:
                total = grads[0] + grads[1]
                for g in grads:
                    g.copy_(total)
            return
        dist.all_reduce(grads[0], group=self._tied_group)

    # ------------------------------------------------------------------ forward without a schedule
    def new_kv_cache(self, batch: int, max_seqlen: int, device=None) -> KVCache:
        """A cache for this rank's layers (the others' entries are None)."""
        weight = next(self.parameters())
        device = weight.device if device is None else torch.device(device)
        any_layer = next(iter(self.layers.values()))
        shape = (batch, max_seqlen, any_layer.attention.num_kv_heads, self.cfg.head_dim)
        k = [None] * self.cfg.num_layers
        v = [None] * self.cfg.num_layers
        for i in self.layers:
            k[int(i)] = torch.zeros(shape, dtype=self.cfg.torch_dtype, device=device)
            v[int(i)] = torch.zeros(shape, dtype=self.cfg.torch_dtype, device=device)
        return KVCache(k=k, v=v, seqlens=torch.zeros(batch, dtype=torch.int32, device=device))

    @torch.no_grad()
    def forward(self, input_ids, cu_seqlens=None, max_seqlen=None, labels=None, label_smoothing=0.0,
                return_accuracy=False, kv_cache: KVCache | None = None):
        """``DecoderModel.forward``, run stage after stage across the pipeline ranks (forward only); every pipeline
        rank returns the last stage's result."""
        batched = input_ids.ndim == 2 and cu_seqlens is None and kv_cache is None
        if kv_cache is not None:
            input_ids = input_ids if input_ids.ndim == 2 else input_ids[None]
            kv_cache.check_room(input_ids.shape[1])
        elif cu_seqlens is None:  # batched rows, or one sequence
            cu_seqlens = cu_seqlens_of(input_ids)
        chunks = dict(zip(self.stage_ids, self.stages))
        x = out = None
        for s in range(self.num_stages):
            if s not in chunks:
                continue
            if s == 0:
                x = input_ids if kv_cache is not None else input_ids.reshape(1, -1)
            elif self.owner[s - 1] != self.ctx.pp_rank:
                x = self._recv(self.owner[s - 1])
            chunks[s].label_smoothing = label_smoothing
            x = chunks[s](x, cu_seqlens, None, labels, return_accuracy, kv_cache)
            if s == self.num_stages - 1:
                out = x
            elif self.owner[s + 1] != self.ctx.pp_rank:
                self._send(x, self.owner[s + 1])
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        last = self.owner[self.num_stages - 1]
        if return_accuracy:
            loss, correct = out if out is not None else (None, None)
            return self._broadcast(loss, last), self._broadcast(correct, last)
        out = self._broadcast(out, last)
        if batched and labels is None:
            return out.view(*input_ids.shape, -1)
        return out.view(input_ids.shape) if batched else out

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.ctx.pp_group, pp_rank)

    # a tensor's shape and dtype travel first, in a header of _HEADER int64s: [ndim, dtype index, *shape]
    _DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)
    _HEADER = 10

    def _header(self, t: torch.Tensor | None) -> torch.Tensor:
        header = torch.zeros(self._HEADER, dtype=torch.int64, device=self.ctx.device)
        if t is not None:
            header[0], header[1] = t.dim(), self._DTYPES.index(t.dtype)
            header[2:2 + t.dim()] = torch.tensor(t.shape)
        return header

    def _empty(self, header: torch.Tensor) -> torch.Tensor:
        return torch.empty(header[2:2 + int(header[0])].tolist(), dtype=self._DTYPES[int(header[1])],
                           device=self.ctx.device)

    def _send(self, t: torch.Tensor, pp_rank: int) -> None:
        dist.send(self._header(t), self._global(pp_rank), group=self.ctx.pp_group)
        dist.send(t.contiguous(), self._global(pp_rank), group=self.ctx.pp_group)

    def _recv(self, pp_rank: int) -> torch.Tensor:
        header = self._header(None)
        dist.recv(header, self._global(pp_rank), group=self.ctx.pp_group)
        t = self._empty(header)
        dist.recv(t, self._global(pp_rank), group=self.ctx.pp_group)
        return t

    def _broadcast(self, t: torch.Tensor | None, pp_rank: int) -> torch.Tensor:
        """``t`` of pipeline rank ``pp_rank`` on every pipeline rank."""
        src = self._global(pp_rank)
        header = self._header(t)
        dist.broadcast(header, src, group=self.ctx.pp_group)
        t = self._empty(header) if t is None else t
        dist.broadcast(t, src, group=self.ctx.pp_group)
        return t


# ---------------------------------------------------------------------------------------------- the schedule
def _stage_class():
    """torch's ``PipelineStage``, minus the warm-up transfers between two stages of one rank. torch 2.11 opens
    each stage's links with a send to and a receive from both neighbours, a stage on the same rank included
    (ZBV's middle stages): gloo has no link from a rank to itself and fails. torch 2.13 warms up otherwise and
    never calls this method."""
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        def _get_init_p2p_neighbors_ops(self):
            return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]

    return Stage


class PipelineSchedule:
    """A ``torch.distributed.pipelining`` schedule over this rank's stages, behind evo's schedule interface."""

    def __init__(self, model: PipelineModel, micro_num: int):
        from torch.distributed.pipelining import schedules as S

        ctx = model.ctx
        self.model, self.micro_num = model, micro_num
        self.loss_scale = 1.0
        self.stages = [_stage_class()(chunk, s, model.num_stages, ctx.device, group=ctx.pp_group)
                       for s, chunk in zip(model.stage_ids, model.stages)]
        mode = PIPELINE_MODE[model.mode]
        multi = len(self.stages) > 1 or mode.zero_bubble
        cls = getattr(S, mode.schedule) if multi else S.Schedule1F1B
        self.schedule = cls(self.stages if multi else self.stages[0], n_microbatches=micro_num, loss_fn=self._loss,
                            scale_grads=False)
        self.timeline: list[tuple] | None = None  # set to a list to record (stage, micro, kind, start, end)
        for stage in self.stages:
            self._instrument(stage)

    def _loss(self, token_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_loss.sum() * self.loss_scale

    def forward_backward_step(self, model, micro_batches, loss_scale: float, label_smoothing: float,
                              after_backward: Callable[[], None]) -> list[torch.Tensor]:
        """One step's micro-batches through the pipeline; the per-token losses of each (zeros on ranks without the
        last stage). Gradients end reduced and summed, tied copies synced."""
        dev = self.model.ctx.device
        ids = torch.cat([m["input_ids"].reshape(1, -1) for m, _ in micro_batches]).to(dev)
        labels = torch.cat([lab.reshape(1, -1) for _, lab in micro_batches]).to(dev)
        cus = [m["cu_seqlens"].reshape(-1) for m, _ in micro_batches]
        width = max(c.numel() for c in cus)
        cu = torch.stack([torch.cat([c, c[-1:].expand(width - c.numel())]) for c in cus]).to(dev)
        num_docs = torch.tensor([c.numel() - 1 for c in cus], device=dev)
        self.loss_scale = loss_scale
        for chunk in self.model.stages:
            chunk.label_smoothing = label_smoothing
        # token ids go to the first stage only: torch 2.11's one-stage schedules refuse input args on a later stage
        args = (ids,) if len(self.stages) > 1 or self.stages[0].is_first else ()
        out = self.schedule.step(*args, target=labels, cu_seqlens=cu, num_docs=num_docs, labels=labels)
        self.model.sync_tied_grads()
        after_backward()
        if out is None:
            return [torch.zeros(ids.shape[1], device=dev) for _ in micro_batches]
        return list(out.detach().reshape(len(micro_batches), -1))

    def _instrument(self, stage) -> None:
        """Record each forward, backward (input part) and weight-gradient pass while ``timeline`` is a list."""
        sync = torch.cuda.synchronize if stage.device.type == "cuda" else (lambda: None)

        def timed(fn, kind):
            def run(chunk_id, *args, **kwargs):
                if self.timeline is None:
                    return fn(chunk_id, *args, **kwargs)
                sync()
                start = time.perf_counter()
                result = fn(chunk_id, *args, **kwargs)
                sync()
                name = kind if kind != "B" or kwargs.get("full_backward", True) else "I"
                self.timeline.append((stage.stage_index, chunk_id, name, start, time.perf_counter()))
                return result
            return run

        stage.forward_one_chunk = timed(stage.forward_one_chunk, "F")
        stage.backward_one_chunk = timed(stage.backward_one_chunk, "B")
        stage.backward_weight_one_chunk = timed(stage.backward_weight_one_chunk, "W")
