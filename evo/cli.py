"""What every evo script does around its main(): one line and exit 2 for bad input, tracebacks for bugs.

Under a launcher with several processes (torchrun, srun) every process meets the same bad input (the
same config, data and checkpoints), so only rank 0 prints the line; every rank exits 2. An error only
some ranks can meet (marked ``every_rank``) is printed by each rank that meets it. Under torchrun every
rank also writes the line to its error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's failure report
names it instead of a link to its documentation, also when only a rank other than 0 met the error.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from evo.errors import EvoError
from evo.monitor import log_to_file
from evo.stopping import EXIT_STOPPED, TrainingStopped


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"evo: warning: {message}\n"


def launch_rank(env=os.environ) -> int:
    """This process's global rank as the launcher set it (torchrun: RANK, srun: SLURM_PROCID), 0 alone."""
    for key in ("RANK", "SLURM_PROCID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def _record_for_torchrun(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # the record torchrun's @record decorator writes, with our line where it puts the traceback: the
    # failure summary prints it as the failure's "traceback"
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to Python's shutdown, gloo's worker threads
    were seen to abort one rank at exit ("terminate called without an active exception", exit -6) after a
    complete run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still needs the group
        dist.destroy_process_group()


def run(main) -> None:
    """Call ``main()``; a user-input error (EvoError) prints ``evo: error: ...`` and exits 2; training stopped by a
    signal (after saving) prints why and exits 3 (``evo.stopping``). Anything else propagates: Python prints the
    traceback and exits 1."""
    warnings.formatwarning = _one_line_warning
    try:
        main()
        _close_process_group()
        log_to_file("=== end: exit 0 (finished)")
    except EvoError as exc:
        line = f"evo: error: {exc}"
        log_to_file(f"=== end: exit 2: {line}")
        if launch_rank() == 0 or getattr(exc, "every_rank", False):
            print(line, file=sys.stderr, flush=True)
        # every rank tells torchrun: an error that only another rank met still reaches the failure report
        _record_for_torchrun(line)
        sys.exit(2)
    except TrainingStopped as exc:  # a signal: the step finished and a checkpoint was saved (evo.stopping)
        log_to_file(f"=== end: exit {EXIT_STOPPED}: {exc}")
        if launch_rank() == 0:
            print(f"evo: {exc}", file=sys.stderr, flush=True)
        _close_process_group()
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        log_to_file("=== end: exit 130: interrupted")
        print("evo: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:  # a bug: its traceback goes to the console; train.log gets its last line
        last = str(exc).strip().splitlines()[-1:] or [""]
        log_to_file(f"=== end: exit 1: {type(exc).__name__}: {last[0]}")
        raise
