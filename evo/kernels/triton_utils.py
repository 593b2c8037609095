"""Small launch helpers shared by the Triton kernel files."""

from __future__ import annotations

import functools
import os
from typing import Callable

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


OPAQUE_OPS: dict[str, "OpaqueOp"] = {}  # name -> op, every one registered (the tests check each)


class OpaqueOp:
    """A Triton launch function, also registered as the custom op ``evo::<name>`` for torch.compile.

    Dynamo cannot trace a Triton launch under the interpreter, and on a GPU it need not: while compiling,
    a call goes to the custom op, which the graph keeps as one opaque node (``fake`` gives its output
    shapes and dtypes). Eager calls go straight to the function, skipping the dispatcher (about 10 us
    a call on this project's 2-core x86 CPU, torch 2.13). Autograd stays with the callers'
    ``torch.autograd.Function``: its forward and backward call these, so a compiled graph traces
    through the Function.
    The function must return fresh tensors (a custom op's outputs may not alias its inputs).
    """

    def __init__(self, name: str, schema: str, fn: Callable, fake: Callable):
        self.fn = fn
        self.op = torch.library.custom_op(f"evo::{name}", fn, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        OPAQUE_OPS[name] = self

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.fn(*args)
