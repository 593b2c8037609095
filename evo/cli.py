"""What every evo script does around its main(): one line and exit 2 for bad input, tracebacks for bugs."""

from __future__ import annotations

import sys
import warnings

from evo.errors import EvoError


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"evo: warning: {message}\n"


def run(main) -> None:
    """Call ``main()``; a user-input error (EvoError) prints ``evo: error: ...`` and exits 2.
    Anything else propagates: Python prints the traceback and exits 1."""
    warnings.formatwarning = _one_line_warning
    try:
        main()
    except EvoError as exc:
        print(f"evo: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("evo: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
