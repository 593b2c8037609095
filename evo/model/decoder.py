"""The decoder of the Llama family (InternLM2, Llama 2 and 3, Mistral, Qwen2, Qwen3): the thin module
layer over ``evo.kernels``.

Every piece of math goes through a public function of ``evo.kernels`` (rms_norm, apply_rotary_emb,
flash_attn_varlen_func, flash_attn_with_kvcache, swiglu, fused_linear_cross_entropy), so the Triton
kernels replace the reference implementations without this file changing. The family features are
config switches (``evo.config.ModelConfig``): GQA, ``head_dim`` apart from hidden / heads, q/k/v and
output biases, per-head q/k RMSNorm (``qk_norm``), rotary scalings (``evo.model.rotary``), a sliding
window, tied embeddings.

Three ways in:
- training: InternEvo's packed micro-batch, token ids flattened to ``(tokens,)`` with int32
  ``cu_seqlens`` marking the documents; attention never crosses a boundary and rotary positions
  restart at each one;
- inference: ``(batch, seqlen)`` ids, one sequence per row, giving ``(batch, seqlen, vocab)`` logits;
- generation: the same with a ``KVCache`` (``model.new_kv_cache``): each call appends its tokens'
  keys and values to the cache and attends to everything cached (``flash_attn_with_kvcache``).
Parameter names follow InternLM2 (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1``, ``norm``, ``output``).

What a parallel layout changes in these modules, it changes in two declared ways, never by assigning
``module.forward``:
- a class swap: tensor parallelism (``evo.parallel.tensor``: ``ColumnParallel``, ``RowParallel``,
  ``VocabParallel``, ``ReplicatedWeight``, ``VocabParallelLoss``), isp's output head
  (``evo.parallel.sequence.SequenceParallelLoss``) and 2D sequence parallelism's attention
  (``evo.parallel.sequence_2d.ContextParallelAttention``) make a module an instance of a subclass of its class
  with a parallel forward (``evo.parallel.tensor.swap_class``, as FSDP2's ``fully_shard`` makes
  ``FSDP<class>``): ``type(module).__name__`` says which, e.g. ``ColumnParallelLinear``;
- forward hooks: isp's exchanges around attention (``evo.parallel.sequence``), the embedding keeping this rank's
  tokens, and FSDP2's gathers.
Both read ``DecoderModel.sequence_shards`` (``evo.parallel.shards.SequenceShards``), which the model asks at the
start of each forward (``decide``, given the row's ``cu_seqlens``) whether it runs on sequence shards of the
tensor group. Pipeline parallelism wraps the model instead
(``evo.parallel.pipeline.PipelineModel``); activation checkpointing is ``DecoderLayer.checkpointed``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor, distribute_tensor

from evo import kernels
from evo.config import ModelConfig
from evo.model.moe import MoEBlock, is_moe_layer
from evo.model.rotary import RotaryEmbedding
from evo.model.selective import KeptAttention, OffloadedActivations, kept_attention, using


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Keys and values of every layer for generation: ``k[layer]``, ``v[layer]`` (batch, max_seqlen, kv_heads,
    head_dim) in the model's dtype, filled to ``length`` positions in every row (``seqlens``, (batch,) int32)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: torch.Tensor
    length: int = 0

    @property
    def max_seqlen(self) -> int:
        return next(k for k in self.k if k is not None).shape[1]  # a pipeline rank's cache holds its layers only

    def check_room(self, new: int) -> None:
        if self.length + new > self.max_seqlen:
            raise ValueError(f"the KV cache holds {self.max_seqlen} positions; {self.length} are used and "
                             f"{new} more do not fit (make it with a larger max_seqlen)")

    def advance(self, new: int) -> None:
        self.seqlens += new
        self.length += new


class Attention(nn.Module):
    """Grouped-query causal self-attention (optionally in a sliding window) over packed sequences or a KV cache."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        self.wq = nn.Linear(d, self.num_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.num_heads * hd, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.rotary = rotary  # shared by every layer: it holds tables, no parameters
        self.window = cfg.attention_window
        self.kept = None  # selective checkpointing: the KeptAttention slot of the checkpointed call in progress

    def _qkv(self, x: torch.Tensor):
        """Projections of x (..., hidden) as heads (..., heads, head_dim), q and k normalized per head if asked."""
        # heads from the projections' own shapes: under tensor or intern sequence parallelism they hold this rank's
        # heads, and their token count may differ from x's (gathered, or exchanged for whole rows)
        q, k, v = (t.view(*t.shape[:-1], -1, self.head_dim) for t in (self.wq(x), self.wk(x), self.wv(x)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cu_seqlens=None, max_seqlen=None, cache: KVCache | None = None, layer: int = 0):
        """x (tokens, hidden), packed documents delimited by ``cu_seqlens``; or, with ``cache``, (batch, new, hidden)
        continuing the cached positions."""
        if cache is not None:
            return self._forward_cached(x, cache, layer)
        q, k, v = self._qkv(x)
        q, k = self.rotary(q, cu_seqlens, max_seqlen), self.rotary(k, cu_seqlens, max_seqlen)
        if self.kept is not None:  # selective checkpointing: run once per checkpointed call (evo.model.selective)
            out = kept_attention(q, k, v, cu_seqlens, max_seqlen, self.window, self.kept)
        else:
            out = kernels.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                 causal=True, window_size=self.window)
        return self.wo(out.reshape(out.shape[0], -1))

    def _forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """x (batch, new, hidden) at positions ``cache.length ...``: appends its keys and values to the cache
        (rotated there, by flash_attn_with_kvcache) and attends to every cached position."""
        q, k, v = self._qkv(x)
        cos, sin = self.rotary.tables(cache.length + x.shape[1], x.device, rows=cache.max_seqlen)
        out = kernels.flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, rotary_cos=cos, rotary_sin=sin,
                                              cache_seqlens=cache.seqlens, causal=True, window_size=self.window,
                                              rotary_interleaved=self.rotary.interleaved)
        return self.wo(out.reshape(*x.shape[:2], -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), ``width`` wide (default ``intermediate_size``)."""

    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        d, h, bias = cfg.hidden_size, width or cfg.intermediate_size, cfg.mlp_bias
        self.w1 = nn.Linear(d, h, bias=bias)
        self.w3 = nn.Linear(d, h, bias=bias)
        self.w2 = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


def feed_forward(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer ``index``'s feed-forward: the dense MLP, or a MoE block (evo.model.moe) where the config makes the layer
    sparse, its shared experts one MLP as wide as all of them."""
    if not is_moe_layer(cfg, index):
        return FeedForward(cfg)
    shared = FeedForward(cfg, cfg.shared_expert_intermediate_size) if cfg.num_shared_experts else None
    return MoEBlock(cfg, shared, index)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, index: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attention = Attention(cfg, rotary)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.feed_forward = feed_forward(cfg, index)
        # set by evo.parallel.parallelize: activation checkpointing; with selective_checkpoint (and its offload) the
        # checkpointed forward keeps attention's output (evo.model.selective); cpu_offloading's layers save to the CPU
        self.checkpointed = self.keeps_attention = self.offloads_kept = self.offloaded = False
        self.offload_stream = None  # selective_checkpoint_offload on a GPU: the side stream of the copies

    def _forward(self, x, cu_seqlens, max_seqlen, cache, layer):
        """(the layer's output, a MoE block's stats or None)."""
        h = x + self.attention(self.attention_norm(x), cu_seqlens, max_seqlen, cache, layer)
        if isinstance(self.feed_forward, MoEBlock):
            out, stats = self.feed_forward.forward_with_stats(self.ffn_norm(h))
            return h + out, stats
        return h + self.feed_forward(self.ffn_norm(h)), None

    def forward(self, x, cu_seqlens=None, max_seqlen=None, cache: KVCache | None = None, layer: int = 0):
        training = torch.is_grad_enabled() and cache is None
        with self.saved_on_cpu() if self.offloaded and training else contextlib.nullcontext():
            if self.checkpointed and training:  # (torch.compile takes a context_fn only for its own policies:
                # selective checkpointing, which sets one, is refused with compile)
                kept = dict(context_fn=self._contexts) if self.keeps_attention else {}
                h, stats = torch.utils.checkpoint.checkpoint(self._forward, x, cu_seqlens, max_seqlen, cache, layer,
                                                             use_reentrant=False, **kept)
            else:
                h, stats = self._forward(x, cu_seqlens, max_seqlen, cache, layer)
        if stats is not None:  # recorded here, outside the checkpoint: its recompute in backward records nothing
            self.feed_forward.record(*stats)
        return h

    def _contexts(self):
        """torch.utils.checkpoint's (forward, recomputation) contexts under selective checkpointing: both give the
        attention one ``KeptAttention`` slot, so the recomputation reuses the forward's attention output."""
        if self.offloads_kept and self.offload_stream is None and self.ffn_norm.weight.is_cuda:
            self.offload_stream = torch.cuda.Stream(self.ffn_norm.weight.device)
        slot = KeptAttention(self.offloads_kept, self.offload_stream)
        self.last_kept = slot  # the newest slot (tests read what it offloaded)
        return using(self.attention, slot), using(self.attention, slot)

    def saved_on_cpu(self) -> OffloadedActivations:
        """cpu_offloading: what this layer saves for backward waits on the CPU (``moved`` counts its bytes)."""
        self.offload_hooks = OffloadedActivations()
        return self.offload_hooks


class OutputHead(nn.Linear):
    """The output projection: logits, or with labels the per-token loss straight from the hidden states
    (``fused_linear_cross_entropy``: the full logits are never formed)."""

    def forward(self, h, labels=None, label_smoothing=0.0, return_accuracy=False):
        if labels is None:
            return super().forward(h)
        return kernels.fused_linear_cross_entropy(h, self.weight, labels, label_smoothing=label_smoothing,
                                                  reduction="none", return_accuracy=return_accuracy)


TIED_HEAD = "tok_embeddings.weight"  # the name a tied output head's weight goes by


def tied_name(name: str, tied: bool) -> str:
    """The name parameter ``name`` is initialized, saved and loaded under: with tied word embeddings (``tied``)
    the output head's weight is the embedding's, ``tok_embeddings.weight`` (a pipeline's last stage holds a copy
    of it under ``output.weight``); every other name is itself."""
    return TIED_HEAD if tied and name == "output.weight" else name


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``model``'s output head holds the embedding's very tensor (one process, tensor parallelism), as
    opposed to a copy (a pipeline rank) or a weight of its own."""
    return model.tok_embeddings is not None and model.output is not None and \
        model.output.weight is model.tok_embeddings.weight


def cu_seqlens_of(input_ids: torch.Tensor) -> torch.Tensor:
    """The cu_seqlens that ``input_ids`` given without them stands for: a (batch, seqlen) batch is one sequence
    per row, (tokens,) one sequence (so is (1, tokens))."""
    batch, seqlen = input_ids.shape if input_ids.ndim == 2 else (1, input_ids.numel())
    return torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device) * seqlen


def max_seqlen_of(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence ``cu_seqlens`` delimits (attention's ``max_seqlen``; a host sync on a GPU)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def init_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` in a run seeded ``seed``: every layout draws the same values."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DecoderModel(nn.Module):
    """Token embedding, ``num_layers`` pre-norm decoder layers, final RMSNorm, output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, cfg.qk_interleaved)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.output = OutputHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # set by tensor or sequence parallelism (evo.parallel): the SequenceShards its modules share; None in a
        # layout without them
        self.sequence_shards = None

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, the output head's weight is the embedding's (again, after ``to_empty``,
        which gives each module its own new tensor)."""
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_std(self, name: str) -> float | None:
        """The normal-init std of parameter ``name`` (InternEvo's per-kind fields), or None: norms 1, biases 0."""
        c = self.cfg
        if name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2]:
            return None
        # a module's weight goes by its module's name; a MoE block's 3-D expert weights (experts.w1) by their own
        kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
        for part, std in (("tok_embeddings", c.embedding_init_std), ("output", c.out_head_init_std),
                          ("wq", c.attn_wqkv_init_std), ("wk", c.attn_wqkv_init_std), ("wv", c.attn_wqkv_init_std),
                          ("wo", c.attn_other_init_std), ("w1", c.ffn_uplayer_init_std),
                          ("w3", c.ffn_uplayer_init_std), ("w2", c.ffn_other_init_std),
                          ("gate", c.ffn_uplayer_init_std), ("shared_expert_gate", c.ffn_uplayer_init_std)):
            if kind == part:
                return std
        raise ValueError(f"no init rule for parameter '{name}'")

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter in place, parameter by parameter: each full tensor is drawn in fp32 on its
        device from a generator seeded by (seed, name), then this rank keeps its shard of it (a DTensor's local
        part), so any parallel layout holds the values one process would, and at most one full tensor exists at
        a time. The rotary tables are rebuilt (a model built on the meta device has none)."""
        for name, p in self.named_parameters():
            name = tied_name(name, self.cfg.tie_word_embeddings)  # a pipeline's separate copy: the table's values
            std = self.init_std(name)
            if std is None:  # biases 0, norms 1
                full = torch.full(p.shape, 0.0 if name.endswith(".bias") else 1.0, device=p.device)
            else:
                gen = torch.Generator(device=p.device).manual_seed(init_seed(seed, name))
                full = torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=gen)
            if isinstance(p, DTensor):
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full)
            del full
        self.rotary.reset()

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=None):
        """input_ids (tokens,) or (1, tokens) -> final-norm hidden states (tokens, hidden)."""
        ids = input_ids.reshape(-1)
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_of(ids)
        if max_seqlen is None:
            max_seqlen = max_seqlen_of(cu_seqlens)
        if self.sequence_shards is not None:  # whether this forward runs on sequence shards (evo.parallel)
            self.sequence_shards.decide(ids.numel(), True, cu_seqlens)
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward(self, input_ids, cu_seqlens=None, max_seqlen=None, labels=None, label_smoothing=0.0,
                return_accuracy=False, kv_cache: KVCache | None = None):
        """Three layouts of ``input_ids``:

        - packed, ``(tokens,)`` or ``(1, tokens)`` with ``cu_seqlens`` (1-D without: one sequence):
          logits (tokens, vocab);
        - batched, ``(batch, seqlen)`` without ``cu_seqlens``: one sequence per row, logits (batch, seqlen, vocab);
        - with ``kv_cache``: ``(batch, new)`` tokens continuing the cached ones (prefill or decode); logits
          (batch, new, vocab), and the cache grows by ``new``.

        With labels (the shape of input_ids, not with a cache): the per-token loss in fp32 instead, 0 where the
        label is -100, and with return_accuracy also the number of labelled tokens predicted right; the full
        logits are never needed for that.
        """
        if kv_cache is not None:
            return self._forward_cached(input_ids, kv_cache)
        batched = input_ids.ndim == 2 and cu_seqlens is None
        if batched:
            cu_seqlens, max_seqlen = cu_seqlens_of(input_ids), input_ids.shape[1]
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen)
        if labels is None:
            logits = self.output(h)
            return logits.view(*input_ids.shape, -1) if batched else logits
        out = self.output(h, labels=labels.reshape(-1), label_smoothing=label_smoothing,
                          return_accuracy=return_accuracy)
        if batched:
            return (out[0].view(input_ids.shape), out[1]) if return_accuracy else out.view(input_ids.shape)
        return out

    def new_kv_cache(self, batch: int, max_seqlen: int, device: torch.device | str | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_seqlen`` tokens, in the dtype the layers compute in
        (the parameters', or ``model.dtype`` where FSDP2 holds them as fp32 master shards) on the model's device."""
        weight = self.tok_embeddings.weight
        device = weight.device if device is None else torch.device(device)
        dtype = self.cfg.torch_dtype if isinstance(weight, DTensor) else weight.dtype
        shape = (batch, max_seqlen, self.layers[0].attention.num_kv_heads, self.cfg.head_dim)  # local heads
        n = len(self.layers)
        return KVCache(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                       v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                       seqlens=torch.zeros(batch, dtype=torch.int32, device=device))

    @torch.no_grad()
    def _forward_cached(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        ids = input_ids if input_ids.ndim == 2 else input_ids[None]
        cache.check_room(ids.shape[1])
        if self.sequence_shards is not None:
            self.sequence_shards.decide(0, False)
        x = self.tok_embeddings(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=cache, layer=i)
        cache.advance(ids.shape[1])
        return self.output(self.norm(x))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a ``DecoderModel`` (a list) or of a pipeline rank's part (a dict by layer index)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> DecoderModel:
    """The decoder for one process on ``device`` in ``cfg.dtype``: built on the meta device, then materialized
    and initialized in fp32 (``init_weights(seed)``), so one seed gives the same weights whatever the dtype. On
    the meta device nothing is initialized. (A parallel layout: ``evo.parallel.build_parallel_model``.)"""
    device = torch.device(device)
    with torch.device("meta"):
        model = DecoderModel(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(seed)
    return model.to(cfg.torch_dtype)


def count_parameters(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Unique parameters (tied weights counted once); optionally without the input embedding table."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embedding and name.startswith("tok_embeddings")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
