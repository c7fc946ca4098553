"""Each compiled module's .pyi (discache/_core.pyi, discache/_cache.pyi, discache/sim/_sim.pyi)
describes every compiled class exactly."""
from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

from discache import _cache, _core
from discache.sim import _sim

MODULES = {"discache._core": _core, "discache._cache": _cache, "discache.sim._sim": _sim}


def stub_path(module):
    return Path(module.__file__).with_name(module.__name__.rsplit(".", 1)[1] + ".pyi")


def stub_members(module, name):
    """Public names a class of the module's stub declares, its stub base classes' included."""
    tree = ast.parse(stub_path(module).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    names = set()
    for base in cls.bases:
        if isinstance(base, ast.Name) and hasattr(module, base.id):
            names |= stub_members(module, base.id)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names


COMPILED_CLASSES = sorted(
    (module_name, name) for module_name, module in MODULES.items()
    for name, obj in vars(module).items()
    if isinstance(obj, type) and not name.startswith("_") and obj.__module__ == module_name
    and not issubclass(obj, enum.Enum)  # an enum's members come from int, not from the stub
)


def test_every_module_has_classes():
    assert {module for module, _ in COMPILED_CLASSES} == set(MODULES)


@pytest.mark.parametrize("module_name, name", COMPILED_CLASSES,
                         ids=[f"{m}.{n}" for m, n in COMPILED_CLASSES])
def test_stub_matches_compiled_class(module_name, name):
    module = MODULES[module_name]
    compiled = {m for m in dir(getattr(module, name)) if not m.startswith("_")}
    assert stub_members(module, name) == compiled


def test_stub_names_module_constants():
    text = stub_path(_sim).read_text()
    for constant in ("SIM_RECLAIM_BATCH", "SWAPPED_BIT"):
        assert hasattr(_sim, constant) and f"{constant}: int" in text


def test_the_compiled_modules_are_split_by_subsystem():
    assert not hasattr(_core, "PageTable") and not hasattr(_core, "SimCore")
    assert not hasattr(_sim, "Segment") and not hasattr(_sim, "MadvFreeMemory")
    assert not hasattr(_core, "CacheCore") and not hasattr(_core, "CacheEntry")
