"""Run a function on N gloo processes (the distributed-test helper; DESIGN.md's testing section)."""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, out_dir, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done and saved: leave without the interpreter's teardown, where about one process in ten aborted
    # ('terminate called without an active exception', SIGABRT; seen with a bare `import evo.kernels.reference`)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one gloo group;
    returns each rank's return value. ``fn`` must be a module-level function (it is pickled by name)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, os.path.join(tmp, "init"), tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size)]
