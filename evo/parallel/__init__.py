"""Process groups and the parallel layouts built on them."""

from evo.parallel.context import ParallelContext

__all__ = ["ParallelContext"]
