"""Rotary position tables, with the scalings of the model families evo builds.

Channel pair i of a head (0 <= i < head_dim / 2) turns by angle ``position * inv_freq[i]``, with
``inv_freq[i] = base ** (-2i / head_dim)``, scaled by ``model.rope_scaling`` (Hugging Face's names
and formulas, so a converted checkpoint computes the same function):
- ``linear`` (position interpolation): ``inv_freq / factor``;
- ``dynamic`` (NTK-aware, InternEvo's ``use_dynamic_ntk_rope``): for a sequence of length L past
  ``max_position_embeddings`` (m), the base grows to ``base * (factor * L / m - (factor - 1)) **
  (d / (d - 2))``; at or below m nothing changes. The tables therefore depend on L: they are built
  per length and the last few kept. A packed batch uses its longest document's length, as Hugging
  Face uses the batch's largest position; generation uses the cached length plus the new tokens, so
  keys already in the cache keep the rotation they were written with (Hugging Face's behaviour too);
- ``llama3`` (Llama 3.1): wavelengths ``2 pi / inv_freq`` shorter than ``original / high_freq_factor``
  are kept, longer than ``original / low_freq_factor`` divided by factor, and those between blended
  linearly in ``original / wavelength``.

Tables are fp32 (positions, head_dim / 2), computed in fp64 with NumPy: the same on every machine
and device. Not with torch.cos on the CPU: measured on this project's 2-core x86 machine (torch
2.13, two threads), about one process in ten got a few entries of the table different in the last
bit, and identical runs trained apart. Inside a torch.compile trace (where NumPy cannot go) a table
that must be built is built with fp64 torch ops instead.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

from evo import kernels

INITIAL_POSITIONS = 2048  # rows of the table built with the module (outside any compile trace)
DYNAMIC_TABLES_KEPT = 4  # dynamic scaling: tables of the most recent lengths kept


def inv_freq(head_dim: int, rope: dict, length: int = 0) -> list[float]:
    """Angular frequency per channel pair for ``rope`` (``ModelConfig.rope``) at sequence length ``length``
    (used by dynamic scaling only), as Python floats (fp64), so eager and compiled code share one formula."""
    kind, base = rope["rope_type"], float(rope["base"])
    if kind == "dynamic" and length > rope["max_position_embeddings"]:
        factor, m = float(rope["factor"]), rope["max_position_embeddings"]
        base = base * (factor * length / m - (factor - 1.0)) ** (head_dim / (head_dim - 2))
    freqs = [1.0 / base ** (i / head_dim) for i in range(0, head_dim, 2)]
    if kind == "linear":
        return [f / float(rope["factor"]) for f in freqs]
    if kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        original = float(rope["original_max_position_embeddings"])
        out = []
        for f in freqs:
            wavelength = 2 * math.pi / f
            if wavelength < original / high:
                out.append(f)
            elif wavelength > original / low:
                out.append(f / factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    return freqs


def rotary_tables(freqs: list[float], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * freqs, (size, len(freqs)) fp32 on the CPU, computed in fp64 with NumPy."""
    angles = np.outer(np.arange(size, dtype=np.float64), np.asarray(freqs, dtype=np.float64))
    return torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()


def _traced_tables(freqs: list[float], size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_tables`` with fp64 torch ops on ``device``: for a table built inside a torch.compile trace, and
    for dynamic scaling's per-length tables on a GPU."""
    f64 = dict(dtype=torch.float64, device=device)
    angles = torch.outer(torch.arange(size, **f64), torch.tensor(freqs, **f64))
    return angles.cos().float(), angles.sin().float()


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of one model (every layer shares them), moved to the input's device and grown
    on demand; with dynamic scaling, a table per sequence length past ``max_position_embeddings``."""

    def __init__(self, head_dim: int, rope: dict, interleaved: bool):
        super().__init__()
        self.head_dim, self.rope, self.interleaved = head_dim, dict(rope), interleaved
        self._freqs = inv_freq(head_dim, self.rope)
        # non-persistent buffers: they move with the model, are not saved, and are rebuilt by reset() after a
        # model built on the meta device is materialized
        cos, sin = rotary_tables(self._freqs, INITIAL_POSITIONS)
        self.register_buffer("_cos", cos, persistent=False)
        self.register_buffer("_sin", sin, persistent=False)
        self._by_length: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _apply(self, fn, recurse=True):
        """Moves follow the model; dtype casts do not: the tables stay the fp32 ones (a bf16 model's rotary is
        computed from fp32 tables, as the kernels expect)."""
        cos, sin = self._cos, self._sin
        super()._apply(fn, recurse)
        if self._cos.dtype != torch.float32:
            self._cos, self._sin = cos.to(self._cos.device), sin.to(self._sin.device)
        return self

    def reset(self) -> None:
        """Recompute the tables where they are (after ``to_empty``, their contents are undefined)."""
        cos, sin = rotary_tables(self._freqs, INITIAL_POSITIONS)
        self._cos, self._sin = cos.to(self._cos.device), sin.to(self._sin.device)
        self._by_length.clear()

    def tables(self, length: int, device: torch.device, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (>= max(length, rows), head_dim / 2) fp32 on ``device``, for sequences of up to
        ``length`` tokens (``rows``: a KV cache's capacity, which flash_attn_with_kvcache wants covered)."""
        if self.rope["rope_type"] == "dynamic" and length > self.rope["max_position_embeddings"]:
            return self._dynamic(length, max(length, rows), device)
        size = max(length, rows)
        if self._cos.shape[0] < size:
            if torch.compiler.is_compiling():  # the module's table stays as it was; this graph builds its own
                return _traced_tables(self._freqs, size, device)
            self._cos, self._sin = rotary_tables(self._freqs, max(size, 2 * self._cos.shape[0]))
        if self._cos.device != device:
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self._cos, self._sin

    def _dynamic(self, length: int, size: int, device: torch.device):
        """Tables of ``size`` rows with the frequencies of sequences of ``length`` tokens."""
        freqs = inv_freq(self.head_dim, self.rope, length)
        if torch.compiler.is_compiling():
            return _traced_tables(freqs, size, device)
        key = (length, size, str(device))
        if key not in self._by_length:
            # generation asks for a new length every step: on a GPU the table is built there (fp64), not in
            # NumPy and copied over (the CPU keeps NumPy, for its bit-for-bit reproducibility)
            if device.type == "cpu":
                self._by_length[key] = rotary_tables(freqs, size)
            else:
                self._by_length[key] = _traced_tables(freqs, size, device)
            while len(self._by_length) > DYNAMIC_TABLES_KEPT:
                self._by_length.popitem(last=False)
        self._by_length.move_to_end(key)
        return self._by_length[key]

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, seqlen_offsets=0,
                max_position: int | None = None) -> torch.Tensor:
        """Rotate packed heads x (tokens, heads, head_dim); positions restart at each ``cu_seqlens`` boundary, from
        ``seqlen_offsets`` (an int, or one per sequence: pieces of longer documents, which reach ``max_position``)."""
        cos, sin = self.tables(max_seqlen if max_position is None else max_position, x.device)
        return kernels.apply_rotary_emb(x, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offsets,
                                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
