"""Build the compiled core; there is deliberately no pure-Python fallback."""
import glob
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - exercised only on a broken build environment
    sys.exit(
        "discache: Cython >= 3 is required to build discache._core, discache._cache and "
        "discache.sim._sim (pip installs it from pyproject.toml's build requirements; "
        "with --no-build-isolation, install it first: pip install 'Cython>=3')."
    )

extensions = [
    # Real memory: the kernel calls, the segment kinds, the mapped memories (one include tree).
    Extension(
        "discache._core",
        ["discache/_core.pyx"],
        depends=sorted(glob.glob("discache/*.pyx") + glob.glob("discache/*.pxd")
                       + glob.glob("discache/*.h")),
        extra_compile_args=["-O2"],
    ),
    # The simulator: page table, free maps, pager, simulated machine (its own include tree).
    Extension(
        "discache.sim._sim",
        ["discache/sim/_sim.pyx"],
        depends=sorted(glob.glob("discache/sim/*.pyx") + glob.glob("discache/sim/*.pxd")),
        extra_compile_args=["-O2"],
    ),
    # DiscardableCache's slabs, LRU list and hit path: a module of its own, built separately.
    Extension(
        "discache._cache",
        ["discache/_cache.pyx"],
        depends=["discache/_cache.pxd"],
        extra_compile_args=["-O2"],
    ),
    # SharedCache: one cache in /dev/shm for every process of the host (its own module too).
    Extension(
        "discache._sharedcache",
        ["discache/_sharedcache.pyx"],
        depends=["discache/_sharedcache.h", "discache/_dckernel.h"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
