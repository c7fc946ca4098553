"""Every module of the package imports first in a fresh interpreter: no import circle."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import discache

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(discache.__path__, "discache."))


def test_the_package_has_the_modules_it_should():
    assert {"discache.memory", "discache.manager", "discache.backends",
            "discache.allocation"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
