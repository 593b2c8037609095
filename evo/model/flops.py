"""Model FLOPs of a training step, counted from the model's shapes (docs/training.md states the formula).

A step over ``tokens`` tokens in packed sequences of lengths s_i costs

    6 * N * tokens  +  6 * num_layers * num_attention_heads * head_dim * seqlen_sq

- N (``matmul_parameters``): the weights that multiply a token's activations, every linear layer's and the output
  head's (counted even when it is tied to the embedding); the input embedding is a lookup and counts nothing. In
  a MoE layer a token meets the router, the shared experts and top_k of the E routed experts: those count, the
  routed experts' weights as top_k / E of them (counting them all would overstate the work, and MFU, E / top_k
  times). The memory estimate counts every expert;
- ``seqlen_sq``: the sum over the packed sequences of s_i^2 (less what a sliding window leaves out), the one
  name this quantity has in evo. Q K^T and P V cost 4 s^2 heads head_dim forward for a full square, half of
  that causal, three times that forward + backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evo.config import ModelConfig
from evo.model.decoder import DecoderModel, count_parameters
from evo.model.moe import moe_blocks


def matmul_parameters(model: nn.Module) -> int:
    """Weights that multiply a token's activations (every nn.Linear's, the output head's even when tied to the
    embedding; a MoE block's router and top_k / E of its routed experts): the N of the FLOPs formula. Not the input
    embedding (a lookup), norms or biases."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    routed = sum(b.gate.weight.numel() + sum(p.numel() for p in b.experts.parameters()) * b.top_k // b.num_experts
                 for b in moe_blocks(model))
    return linear + routed


def whole_model_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, matmul parameters) of the whole model ``cfg`` describes, whatever part of it a rank holds
    (a pipeline stage, a tensor-parallel shard): counted on a model built on the meta device, which allocates
    nothing."""
    with torch.device("meta"):
        model = DecoderModel(cfg)
    return count_parameters(model), matmul_parameters(model)


def seqlen_sq(cu_seqlens: torch.Tensor, sliding_window: int | None = None) -> float:
    """The attention term of ``step_flops`` for one packed row: the sum over its sequences of s^2, which stands
    for twice the s (s + 1) / 2 causal (query, key) pairs; with a window of W keys, the pairs a query past the
    first W cannot see are taken off: s^2 - (s - W) (s - W + 1) when s > W."""
    s = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    total = s.square()
    if sliding_window:
        cut = (s - sliding_window).clamp(min=0)
        total = total - cut * (cut + 1)
    return float(total.sum())


def step_flops(cfg: ModelConfig, num_matmul_params: int, tokens: float, seqlen_sq: float) -> float:
    """Model FLOPs of one forward + backward over ``tokens`` tokens whose packed sequences' squared lengths sum to
    ``seqlen_sq`` (the function ``seqlen_sq`` of each row, summed): the formula in this module's docstring."""
    width = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * num_matmul_params * tokens + 6.0 * cfg.num_layers * width * seqlen_sq
