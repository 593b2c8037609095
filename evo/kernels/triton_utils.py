"""Small launch helpers shared by the Triton kernel files."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_for_rows(rows: int, device: torch.device) -> int:
    """Programs for a row-band kernel: a couple per SM on a GPU, a few under the interpreter."""
    target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(rows, target))


def warps_for_block(block: int) -> int:
    """Warps for a program that holds one row tile of ``block`` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
