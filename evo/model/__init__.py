"""The module layer: an InternLM2 / Llama-style decoder whose math runs through evo.kernels."""

from evo.model.decoder import DecoderModel, KVCache, build_model, count_parameters
from evo.model.flops import matmul_parameters, step_flops, whole_model_sizes

__all__ = ["DecoderModel", "KVCache", "build_model", "count_parameters", "matmul_parameters", "step_flops",
           "whole_model_sizes"]
