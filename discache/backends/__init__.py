"""The memory backends and what this machine supports of them."""
from __future__ import annotations

from typing import NamedTuple

from .. import _core


class BackendInfo(NamedTuple):
    """One backend: its name, whether it runs here, and why (not)."""

    name: str
    available: bool
    reason: str


def available() -> list[BackendInfo]:
    """Every backend with whether it runs on this machine, probed by the system calls themselves."""
    madv_free = _core.probe_madvise(_core.MADV_FREE_VALUE)
    uffd = _core.probe_userfaultfd_sigbus()
    sigbus_ok = madv_free[0] and uffd[0]
    return [
        BackendInfo("madvfree", *madv_free),
        BackendInfo("madvfree-sigbus", sigbus_ok, uffd[1] if madv_free[0] else madv_free[1]),
        BackendInfo("memfd", *_core.probe_memfd()),
        BackendInfo("ashmem", *_core.probe_ashmem()),
    ]
