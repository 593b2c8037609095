"""The InternLM2 / Llama-style decoder: the thin module layer over ``evo.kernels``.

Every piece of math goes through a public function of ``evo.kernels`` (rms_norm, apply_rotary_emb,
flash_attn_varlen_func, swiglu, fused_linear_cross_entropy), so the Triton kernels replace the
reference implementations without this file changing.

Input is InternEvo's packed micro-batch: token ids flattened to ``(tokens,)`` with int32
``cu_seqlens`` marking the packed documents. Attention never crosses a boundary in ``cu_seqlens``
and rotary positions restart at each one. Parameter names follow InternLM2 (``tok_embeddings``,
``layers.N.attention.wq``, ``layers.N.feed_forward.w1``, ``norm``, ``output``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from evo import kernels
from evo.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rotary_tables(head_dim: int, base: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * base^(-2i / head_dim), (size, head_dim / 2) fp32 on the CPU.

    Computed in fp64 with NumPy, so the same on every machine and device. Not with torch.cos on the
    CPU: measured on this project's 2-core x86 machine (torch 2.13, two threads), about one process in
    ten got a few entries of the table different in the last bit, and identical runs trained apart.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(size, dtype=np.float64), inv_freq)
    return torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables (positions, head_dim / 2) in fp32: built with the module for 2048
    positions (outside any torch.compile trace), moved to the input's device and grown on demand."""

    def __init__(self, head_dim: int, base: float, interleaved: bool):
        super().__init__()
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        self._cos, self._sin = rotary_tables(head_dim, base, 2048)

    def tables(self, length: int, device: torch.device):
        if self._cos.shape[0] < length:
            if torch.compiler.is_compiling():  # Dynamo cannot put NumPy calls in a graph: rotary_tables in torch
                f64 = dict(dtype=torch.float64, device=device)
                inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, **f64) / self.head_dim))
                angles = torch.outer(torch.arange(length, **f64), inv_freq)
                return angles.cos().float(), angles.sin().float()
            self._cos, self._sin = rotary_tables(self.head_dim, self.base, max(length, 2 * self._cos.shape[0]))
        if self._cos.device != device:
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self._cos, self._sin

    def forward(self, x, cu_seqlens, max_seqlen):
        cos, sin = self.tables(max_seqlen, x.device)
        return kernels.apply_rotary_emb(x, cos, sin, interleaved=self.interleaved, cu_seqlens=cu_seqlens,
                                        max_seqlen=max_seqlen)


class Attention(nn.Module):
    """Grouped-query causal self-attention over packed sequences."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd, bias = cfg.hidden_size, cfg.head_dim, not cfg.no_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        self.wq = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.wk = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.wv = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.wo = nn.Linear(self.num_heads * hd, d, bias=bias)
        self.rotary = RotaryEmbedding(hd, cfg.rope_base, cfg.qk_interleaved)

    def forward(self, x, cu_seqlens, max_seqlen):
        t = x.shape[0]
        q = self.wq(x).view(t, self.num_heads, self.head_dim)
        k = self.wk(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, cu_seqlens, max_seqlen), self.rotary(k, cu_seqlens, max_seqlen)
        out = kernels.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return self.wo(out.reshape(t, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, bias = cfg.hidden_size, cfg.intermediate_size, not cfg.no_bias
        self.w1 = nn.Linear(d, h, bias=bias)
        self.w3 = nn.Linear(d, h, bias=bias)
        self.w2 = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, checkpointed: bool):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.feed_forward = FeedForward(cfg)
        self.checkpointed = checkpointed

    def _forward(self, x, cu_seqlens, max_seqlen):
        h = x + self.attention(self.attention_norm(x), cu_seqlens, max_seqlen)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x, cu_seqlens, max_seqlen):
        if self.checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cu_seqlens, max_seqlen, use_reentrant=False)
        return self._forward(x, cu_seqlens, max_seqlen)


class DecoderModel(nn.Module):
    """Token embedding, ``num_layers`` pre-norm decoder layers, final RMSNorm, output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n_ckpt = cfg.num_checkpoint_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, checkpointed=i < n_ckpt) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal init with InternEvo's per-kind std fields; norms 1, biases 0."""
        c = self.cfg

        def normal(weight, std):
            weight.normal_(0.0, std, generator=generator)

        normal(self.tok_embeddings.weight, c.embedding_init_std)
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            for lin, std in ((a.wq, c.attn_wqkv_init_std), (a.wk, c.attn_wqkv_init_std), (a.wv, c.attn_wqkv_init_std),
                             (a.wo, c.attn_other_init_std), (f.w1, c.ffn_uplayer_init_std),
                             (f.w3, c.ffn_uplayer_init_std), (f.w2, c.ffn_other_init_std)):
                normal(lin.weight, std)
                if lin.bias is not None:
                    lin.bias.zero_()
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if not c.tie_word_embeddings:
            normal(self.output.weight, c.out_head_init_std)

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=None):
        """input_ids (tokens,) or (1, tokens) -> final-norm hidden states (tokens, hidden)."""
        ids = input_ids.reshape(-1)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, ids.numel()], dtype=torch.int32, device=ids.device)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward(self, input_ids, cu_seqlens=None, max_seqlen=None, labels=None, label_smoothing=0.0,
                return_accuracy=False):
        """Without labels: logits (tokens, vocab). With labels (tokens,) or (1, tokens): the per-token
        loss (tokens,) in fp32, 0 where the label is -100, and with return_accuracy also the number of
        labelled tokens predicted right; the full logits are never needed for that."""
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return self.output(h)
        return kernels.fused_linear_cross_entropy(h, self.output.weight, labels.reshape(-1),
                                                  label_smoothing=label_smoothing, reduction="none",
                                                  return_accuracy=return_accuracy)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> DecoderModel:
    """Build the decoder on ``device`` in ``cfg.dtype``; initialized in fp32 first (with ``seed`` when given),
    so one seed gives the same weights whatever the dtype. On the meta device nothing is initialized."""
    device = torch.device(device)
    with torch.device(device):
        model = DecoderModel(cfg)
    if device.type != "meta":
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        model.init_weights(gen)
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
