"""The process settings a training run needs before torch loads: CPU math that repeats bit for bit.

``prepare_process()`` is the first thing ``scripts/train.py`` does. It must run before anything imports torch,
because MKL and the OpenMP runtime read their settings when torch loads them; so this module imports no torch at
module level, and ``import evo`` loads no torch either (evo/__init__.py imports its public names on first use).
What it sets, each only where the environment does not already say otherwise:

- ``MKL_CBWR``: MKL's strict code path for this CPU (``AVX512,STRICT``, ``AVX2,STRICT`` or ``COMPATIBLE``). MKL
  documents that without a pinned, strict branch its results may depend on memory alignment and on the code path it
  picks at run time;
- ``MKL_DYNAMIC=FALSE`` and ``OMP_DYNAMIC=FALSE``: no thread counts chosen at run time (MKL may otherwise use fewer
  threads when the machine is busy, which is another order of summation);
- denormal floats flushed to zero (``torch.set_flush_denormal``): without it the default job runs about 1.6 times
  slower as attention and softmax tails underflow. The flag is per thread and new threads copy it from their
  creator, so it is set before any worker thread exists: every thread then computes alike.

docs/training.md ("Reproducibility on CPUs") says which of these made runs repeat, and docs/performance.md how they
interact with thread counts. Notebooks that import evo keep torch's defaults: only the training script asks for
these.
"""

from __future__ import annotations

import os
import sys
import warnings


def mkl_branch(cpuinfo: str = "/proc/cpuinfo") -> str:
    """MKL's strict code path for the CPU ``cpuinfo`` describes (``AUTO,STRICT`` where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "AUTO,STRICT"
    if "avx512f" in flags:
        return "AVX512,STRICT"
    return "AVX2,STRICT" if "avx2" in flags else "COMPATIBLE"


def cpu_math_settings() -> dict[str, str]:
    """The environment variables ``prepare_process`` sets, where they are not set already."""
    return {"MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "MKL_CBWR": mkl_branch()}


def prepare_process(environ=os.environ) -> None:
    """Pin CPU math for bit-reproducible training (the module docstring says what and why). Call it before torch is
    imported; called later, the environment variables may come too late, and a warning says so."""
    if "torch" in sys.modules:
        warnings.warn("evo.environment.prepare_process() ran after torch was imported: MKL and OpenMP may already "
                      "have read their settings, so CPU results may not repeat bit for bit")
    for name, value in cpu_math_settings().items():
        environ.setdefault(name, value)
    import torch

    torch.set_flush_denormal(True)
