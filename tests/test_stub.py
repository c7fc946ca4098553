"""Each compiled module's .pyi (discache/_core.pyi, discache/_cache.pyi) describes every compiled
class exactly."""
from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

from discache import _cache, _core

MODULES = {"_core": _core, "_cache": _cache}
STUB = Path(_core.__file__).with_name("_core.pyi")


def stub_members(name, module=_core):
    """Public names a class of the module's stub declares, its stub base classes' included."""
    stub = Path(module.__file__).with_name(module.__name__.rsplit(".", 1)[1] + ".pyi")
    tree = ast.parse(stub.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    names = set()
    for base in cls.bases:
        if isinstance(base, ast.Name) and hasattr(module, base.id):
            names |= stub_members(base.id, module)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names


COMPILED_CLASSES = sorted(
    (module_name, name) for module_name, module in MODULES.items()
    for name, obj in vars(module).items()
    if isinstance(obj, type) and not name.startswith("_") and obj.__module__ == module.__name__
    and not issubclass(obj, enum.Enum)  # an enum's members come from int, not from the stub
)


@pytest.mark.parametrize("module_name,name", COMPILED_CLASSES)
def test_stub_matches_compiled_class(module_name, name):
    module = MODULES[module_name]
    compiled = {m for m in dir(getattr(module, name)) if not m.startswith("_")}
    assert stub_members(name, module) == compiled


def test_stub_names_module_constants():
    text = STUB.read_text()
    for constant in ("SIM_RECLAIM_BATCH", "SWAPPED_BIT"):
        assert hasattr(_core, constant) and f"{constant}: int" in text
