"""Every config field says what it does, in the code and in docs/config.md.

- evo/config/sections.py: each field of each section has a comment on its line or on the line above it;
- docs/config.md: names each field (its last name part, in backticks)."""

import ast
import dataclasses
import typing

from evo.config import Config
from tests.helpers import ROOT

SECTIONS = ROOT / "evo" / "config" / "sections.py"


def fields_without_a_comment(source: str) -> list[str]:
    """The dataclass fields of ``source`` with no comment on their line or the line before, as "Class.field"."""
    lines = source.splitlines()
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "dataclass" for d in node.decorator_list):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    here, above = lines[item.lineno - 1], lines[item.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        missing.append(f"{node.name}.{item.target.id}")
    return missing


def field_paths(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from field_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_field_has_a_comment_in_the_code():
    assert fields_without_a_comment(SECTIONS.read_text()) == []
    probe = "@dataclass\nclass A:\n    x: int = 1  # what x does\n    # what y does\n    y: int = 2\n    z: int = 3\n"
    assert fields_without_a_comment(probe) == ["A.z"]


def test_docs_config_md_names_every_config_field():
    doc = (ROOT / "docs" / "config.md").read_text()
    paths = list(field_paths())
    assert len(paths) > 80  # every section's fields, nested ones included
    assert [p for p in paths if f"`{p.rsplit('.', 1)[-1]}`" not in doc] == []
