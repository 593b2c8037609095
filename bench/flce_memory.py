"""Peak resident memory of the fused linear cross-entropy against the naive path, on the CPU.

Each case runs in a fresh process (so ``ru_maxrss`` is its own) and reports the peak RSS minus
the RSS after the inputs were created. The fused path runs evo's Triton kernels through the
interpreter (TRITON_INTERPRET=1): its memory is the algorithm's, its time is the interpreter's and
is not reported. Shape: 4096 tokens, hidden 1024, vocab 128256, fp32. ``--quick`` skips it: below that shape the
peak RSS of torch's import hides the naive path's, and at it the interpreter needs about 6 minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.manual_seed(0)
impl, T, H, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = torch.randn(T, H, requires_grad=True)
w = (torch.randn(V, H) / 32).requires_grad_()
labels = torch.randint(0, V, (T,))
h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # gradient buffers count as inputs
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = kib()
if impl == "fused":
    from evo.kernels.loss import fused_linear_cross_entropy
    loss = fused_linear_cross_entropy(h, w, labels)
else:
    loss = torch.nn.functional.cross_entropy(h @ w.T, labels)
loss.backward()
print(json.dumps({"peak_minus_inputs_MiB": (kib() - base) / 1024, "loss": loss.item()}))
"""


def run(quick: bool, device: str) -> list[dict]:
    if quick:
        return [{"case": "fused vs naive", "skipped": "about 6 minutes of the interpreter: run without --quick"}]
    T, H, V = 4096, 1024, 128256
    rows = []
    for impl in ("naive", "fused"):
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
        out = subprocess.run([sys.executable, "-c", CHILD, impl, str(T), str(H), str(V)], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"case": f"{impl} {T}x{H}x{V} fp32 cpu", **result})
    rows.append({"case": "fused / naive", "ratio": rows[1]["peak_minus_inputs_MiB"] / rows[0]["peak_minus_inputs_MiB"]})
    return rows
