"""discache/_core.pyi describes every compiled class exactly."""
from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

from discache import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def stub_members(name):
    """Public names a class of the stub declares, its stub base classes' included."""
    tree = ast.parse(STUB.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    names = set()
    for base in cls.bases:
        if isinstance(base, ast.Name) and hasattr(_core, base.id):
            names |= stub_members(base.id)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names


COMPILED_CLASSES = sorted(
    name for name, obj in vars(_core).items()
    if isinstance(obj, type) and not name.startswith("_") and obj.__module__ == "discache._core"
    and not issubclass(obj, enum.Enum)  # an enum's members come from int, not from the stub
)


@pytest.mark.parametrize("name", COMPILED_CLASSES)
def test_stub_matches_compiled_class(name):
    compiled = {m for m in dir(getattr(_core, name)) if not m.startswith("_")}
    assert stub_members(name) == compiled


def test_stub_names_module_constants():
    text = STUB.read_text()
    for constant in ("SIM_RECLAIM_BATCH", "SWAPPED_BIT"):
        assert hasattr(_core, constant) and f"{constant}: int" in text
