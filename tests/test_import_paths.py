"""No module of evo's trees shadows an installed package or the standard library.

A folder of the repository put at the front of ``sys.path`` makes its modules importable by their bare names, and
spawned processes inherit that path: once ``bench/`` was there, transformers' ``import kernels`` (the PyPI package
it needs since 5.x) found ``bench/kernels.py`` in every layout test's worker. So tests/ and bench/ are packages
(``tests.helpers``, ``bench.kernels``), found from the repository root alone, and the scripts that run as
``python <folder>/x.py`` replace their own folder on the path with the root instead of adding one."""

import ast
import importlib
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

import bench
import tests
from tests.dist import run_distributed
from tests.helpers import ROOT


def importable_names(folder: Path) -> set[str]:
    """The bare names a folder on ``sys.path`` makes importable ahead of the folders after it: its modules and
    its regular packages (a folder without ``__init__.py`` is a namespace portion, which any regular module or
    package of that name later on the path wins over)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return names


def shadowed(path: list[str]) -> dict[str, list[str]]:
    """For each folder of the repository on ``path``: the installed packages and standard modules it hides."""
    installed = set(importlib.metadata.packages_distributions()) - {"evo"}
    taken = installed | set(sys.stdlib_module_names)
    hits = {}
    for entry in path:
        folder = Path(entry or ".").resolve()
        if folder.is_dir() and (folder == ROOT or ROOT in folder.parents):
            hits[str(folder)] = sorted(importable_names(folder) & taken)
    return hits


def transformers_in_a_spawned_worker(rank, world_size):
    """What a layout test's worker sees: its path, and whether transformers' model classes import."""
    import transformers

    transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                             vocab_size=32)
    assert transformers.LlamaForCausalLM.__name__ == "LlamaForCausalLM"
    return {"path": list(sys.path), "kernels": getattr(sys.modules.get("kernels"), "__file__", None)}


def test_a_spawned_worker_imports_transformers_after_the_whole_suite_is_collected():
    # what a full pytest run has imported before any test runs: every test and benchmark module
    for package in (tests, bench):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    assert shadowed(sys.path) == {k: [] for k in shadowed(sys.path)}
    (worker,) = run_distributed(transformers_in_a_spawned_worker, 1)
    assert shadowed(worker["path"]) == {k: [] for k in shadowed(worker["path"])}
    inside = [Path(p or ".").resolve() for p in worker["path"]]
    assert not any(p != ROOT and ROOT in p.parents for p in inside), worker["path"]  # the root, never a subfolder
    if worker["kernels"] is not None:  # transformers' hub-kernel support imported the real package
        assert ROOT not in Path(worker["kernels"]).resolve().parents


def test_the_check_sees_a_shadowing_folder():
    # bench/ on the path, as before the fix: its kernels.py hides the PyPI package transformers imports
    hits = shadowed([str(ROOT / "bench")])
    assert "kernels" in hits[str(ROOT / "bench")] or "kernels" not in importlib.metadata.packages_distributions()
    assert "tokenize" in shadowed([str(ROOT / "scripts")])[str(ROOT / "scripts")]  # the standard library's


def test_no_file_adds_a_folder_to_the_front_of_the_path():
    """Scripts replace ``sys.path[0]`` (their own folder) with the root; nothing calls ``sys.path.insert``
    except the config loader, which runs a config file with its folder first and takes it off again."""
    offenders = []
    for file in sorted(ROOT.glob("*/**/*.py")):
        if "vendor" in file.parts or file == ROOT / "evo" / "config" / "load.py":
            continue
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "insert"
                    and ast.unparse(node.func.value) == "sys.path"):
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_make_train_installs_what_training_needs_and_make_test_the_dev_extra():
    """Issue 24: `make train` took the whole dev extra (2.7 GB with transformers, datasets, ipykernel)."""
    import subprocess

    def commands(target):
        return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    train, test = commands("train"), commands("test")
    assert "pip install -q -e '.[plot]'" in train and "[dev]" not in train
    assert "pip install -q -e '.[dev]'" in test
