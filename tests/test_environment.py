"""evo/environment.py: the training script's process settings, made before torch loads (issue 24: the environment
setup moved out of scripts/train.py, which now reads as the documented flow and nothing else)."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

import evo
from evo.environment import mkl_branch, prepare_process
from tests.helpers import ROOT

PROBE = textwrap.dedent("""
    import json, os, sys
    import evo, evo.environment
    before = "torch" in sys.modules
    evo.environment.prepare_process()
    import torch
    tiny = torch.tensor([1e-323], dtype=torch.float64) * 1.0
    print(json.dumps({"torch_before": before, "flushed": tiny.item() == 0.0,
                      **{k: os.environ.get(k) for k in ("MKL_CBWR", "MKL_DYNAMIC", "OMP_DYNAMIC")}}))
""")


def probe(**preset):
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC", "OMP_DYNAMIC")}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, **preset}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_prepare_process_sets_cpu_math_before_torch_loads_and_keeps_the_users_values():
    seen = probe(MKL_DYNAMIC="TRUE")
    assert seen["torch_before"] is False  # importing evo loads no torch, so the settings can still take effect
    assert seen["flushed"] is True
    assert seen["MKL_CBWR"] == mkl_branch() and seen["MKL_CBWR"].endswith("STRICT") or seen["MKL_CBWR"] == "COMPATIBLE"
    assert seen["OMP_DYNAMIC"] == "FALSE"
    assert seen["MKL_DYNAMIC"] == "TRUE"  # a value already in the environment wins


def test_prepare_process_after_torch_warns():
    import torch

    assert torch.__name__ in sys.modules  # the precondition: torch is loaded

    environ = {}
    with pytest.warns(UserWarning, match="after torch was imported"):
        prepare_process(environ)
    assert environ["OMP_DYNAMIC"] == "FALSE" and environ["MKL_DYNAMIC"] == "FALSE"


@pytest.mark.parametrize("flags, branch", [("fpu avx2 avx512f sse", "AVX512,STRICT"), ("fpu sse avx2", "AVX2,STRICT"),
                                           ("fpu sse4_2", "COMPATIBLE"), (None, "AUTO,STRICT")])
def test_mkl_branch_follows_the_cpu_flags(tmp_path, flags, branch):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert mkl_branch(str(cpuinfo)) == branch


def test_the_training_script_reads_as_the_documented_flow():
    script = ast.parse((ROOT / "scripts" / "train.py").read_text())
    (main,) = [node for node in script.body if isinstance(node, ast.FunctionDef)]
    flow = [line.strip() for line in evo.__doc__.split("The documented flow (InternEvo's):")[1].splitlines()
            if line.startswith("    ")]
    assert [ast.unparse(statement) for statement in main.body] == flow
    # the only statement before the imports of the flow is prepare_process(), and nothing before it imports torch
    calls = [node for node in script.body if isinstance(node, ast.Expr)]
    assert [ast.unparse(c) for c in calls][1:] == ["prepare_process()"]  # (the first is the module docstring)
    imported = [alias.name for node in script.body[:script.body.index(calls[1])]
                for alias in getattr(node, "names", []) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert "torch" not in imported and imported[-1] == "prepare_process"
