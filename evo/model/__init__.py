"""The module layer: an InternLM2 / Llama-style decoder whose math runs through evo.kernels."""

from evo.model.decoder import DecoderModel, build_model, count_parameters

__all__ = ["DecoderModel", "build_model", "count_parameters"]
