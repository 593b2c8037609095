"""Process groups and the parallel layouts built on them (DESIGN.md: evo/parallel)."""

from evo.parallel.context import ParallelContext, build_context
from evo.parallel.parallelize import (MemoryOptions, build_parallel_model, format_bytes, memory_estimate, parallelize,
                                      reshard)

__all__ = ["ParallelContext", "MemoryOptions", "build_context", "build_parallel_model", "format_bytes",
           "memory_estimate", "parallelize", "reshard"]
