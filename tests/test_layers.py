"""DESIGN.md's layer rules, read from evo's source with ``ast`` so that they stay kept:

- no import circle among evo's modules, imports inside functions and under ``if TYPE_CHECKING:`` included, a
  package's ``__init__`` counting as a module (so nothing in evo/config/ imports ``evo.config``, and no kernel file
  ``evo.kernels``);
- a name starting with ``_`` is never imported from another module, neither by ``from m import _x`` nor as
  ``m._x`` on an imported module (a rule two modules share is public in its owner)."""

import ast
from pathlib import Path

from tests.helpers import ROOT

EVO = ROOT / "evo"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that a module's ``source`` imports, wherever the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:  # "from evo.kernels import attention" is the module; "from evo.config import X" the package
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules:
                out.add(name)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (module -> the modules it imports): each set of modules that reach one
    another, sorted."""
    order, low, stack, found, counter = {}, {}, [], [], [0]

    def visit(node):
        order[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        for other in graph[node]:
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def test_evo_has_no_import_circle():
    files = {module_name(path): path for path in EVO.rglob("*.py")}
    graph = {name: imports(path.read_text(), set(files)) - {name} for name, path in files.items()}
    assert circles(graph) == []


def test_the_check_sees_a_circle_through_a_package_and_a_lazy_import():
    sources = {"evo.config": "from evo.config.load import load_config\n",
               "evo.config.load": "def f():\n    from evo.parallel.tensor import rule\n",
               "evo.parallel.tensor": "from evo.config import ModelConfig\n",
               "evo.errors": ""}
    graph = {name: imports(text, set(sources)) - {name} for name, text in sources.items()}
    assert circles(graph) == [["evo.config", "evo.config.load", "evo.parallel.tensor"]]


def private_imports(source: str, here: str) -> list[str]:
    """Every private name of another evo module that module ``here`` (its text ``source``) imports or reads off
    an imported module, as "line: what"."""
    tree = ast.parse(source)
    found, modules = [], {}  # local name -> the evo module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "evo":
            for alias in node.names:
                if alias.name.startswith("_") and node.module != here:
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                elif (EVO.parent / (node.module.replace(".", "/") + f"/{alias.name}.py")).is_file():
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "evo" and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__") and modules[node.value.id] != here):
            found.append(f"{node.lineno}: {modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_of_evo_imports_a_private_name_of_another():
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted(EVO.rglob("*.py"))
             for hit in private_imports(path.read_text(), module_name(path))]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_check_sees_both_ways_of_reaching_a_private_name():
    source = ("from evo.kernels.reference import _probe\nfrom evo.kernels import attention\nx = attention._TUNED\n"
              "from evo.model.decoder import DecoderModel\nfrom evo.model import _own\n")
    assert private_imports(source, "evo.model.probe") == ["1: from evo.kernels.reference import _probe",
                                                         "5: from evo.model import _own",
                                                         "3: evo.kernels.attention._TUNED"]
    assert private_imports(source, "evo.model") == ["1: from evo.kernels.reference import _probe",
                                                   "3: evo.kernels.attention._TUNED"]  # its own name


MODE_NAMES = {"mtp", "msp", "fsp", "isp", "1F1B", "ZBH1", "ZBV"}


def mode_comparisons(source: str) -> list[str]:
    """Where ``source`` compares something with a tensor or pipeline mode's name, as "line: text"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [c for side in sides for c in ([side] if not isinstance(side, (ast.Tuple, ast.List, ast.Set))
                                                   else side.elts)]
            if any(isinstance(c, ast.Constant) and c.value in MODE_NAMES for c in consts):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in MODE_NAMES
                                                for k in node.keys):
            found.append(f"{node.lineno}: {ast.unparse(node)[:60]}")
    return found


def test_the_code_asks_the_mode_tables_instead_of_comparing_mode_names():
    """DESIGN.md: a mode is a table entry (evo/config/layout.py), not a string compared in several files.
    evo/internevo.py is left out: its "isp" and "tp" name InternEvo's kinds of folder files, not modes."""
    skip = {EVO / "config" / "layout.py", EVO / "internevo.py"}
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted(EVO.rglob("*.py")) if path not in skip
             for hit in mode_comparisons(path.read_text())]
    assert not found, "mode names compared outside evo/config/layout.py:\n" + "\n".join(found)
    assert mode_comparisons('if ctx.tp_mode == "isp": pass\nx = m in ("msp", "fsp")\n') == [
        "1: ctx.tp_mode == 'isp'", "2: m in ('msp', 'fsp')"]


def forward_assignments(source: str) -> list[str]:
    """Where ``source`` assigns a module's ``forward`` (``m.forward = ...``), as "line: text"."""
    return [f"{node.lineno}: {ast.unparse(node)[:60]}" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
            and any(isinstance(t, ast.Attribute) and t.attr == "forward"
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]


def test_parallel_code_changes_modules_through_a_declared_mechanism():
    """DESIGN.md: a class swap or a hook that the model's docstring names, never ``module.forward = ...``."""
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted(EVO.rglob("*.py"))
             for hit in forward_assignments(path.read_text())]
    assert not found, "forward assigned at run time:\n" + "\n".join(found)
    assert forward_assignments("head.forward = run\nx = 1\n") == ["1: head.forward = run"]
    decoder = (EVO / "model" / "decoder.py").read_text()
    assert "swap_class" in decoder and "sequence_shards" in decoder  # the model's docstring names the mechanism


def test_sizes_stay_readable():
    """Issue 23's limits: the trainer is the loop only (at most 320 lines), no function outside evo/kernels/ is
    over 80 lines, no file over 650."""
    assert len((EVO / "trainer.py").read_text().splitlines()) <= 320
    long_files, long_functions = [], []
    for path in sorted(EVO.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 650 and "kernels" not in path.parts:
            long_files.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "kernels" not in path.parts \
                    and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
