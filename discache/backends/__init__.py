"""The memory backends: the one registry of name -> (probe, allocate, segment kind), and what this
machine supports."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from .. import _core
from ..errors import BackendUnavailableError
from ..memory import allocate_sole_span


class BackendInfo(NamedTuple):
    """One backend: its name, whether it runs here, and why (not)."""

    name: str
    available: bool
    reason: str


class Backend(NamedTuple):
    """A way to make discardable memory: a name, a probe of the machine, and a factory."""

    name: str
    probe: Callable[[], tuple[bool, str]]
    allocate: Callable[[int], Any]
    summary: str
    # npages -> a segment whose spans lock and unlock independently (what a manager packs
    # allocations into); None: the backend has no segment kind.
    segment: Optional[Callable[[int], Any]] = None


_REGISTRY: dict[str, Backend] = {}

# "auto" takes the first available of these; the others are chosen by name only.
AUTO_ORDER = ("madvfree", "memfd", "ashmem")


def register(backend: Backend) -> None:
    """Add (or replace) a backend; the behavioural test suite then runs on it too."""
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    """The names allocate() accepts, besides "auto"."""
    return list(_REGISTRY)


def available() -> list[BackendInfo]:
    """Every backend with whether it runs on this machine, probed by the system calls themselves."""
    return [BackendInfo(b.name, *b.probe()) for b in _REGISTRY.values()]


def get(name: str = "auto", *, sigbus: bool = False) -> Backend:
    """The backend called name ("auto": the best available); raises if unknown or unavailable."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if sigbus:
        if name in ("auto", "madvfree"):
            name = "madvfree-sigbus"
        elif name != "madvfree-sigbus":
            raise ValueError(f"sigbus=True needs the madvfree backend, not {name!r}")
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            ok, reason = _REGISTRY[candidate].probe()
            if ok:
                return _REGISTRY[candidate]
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailableError("no backend runs here: " + "; ".join(reasons))
    try:
        backend = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}") from None
    ok, reason = backend.probe()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available here: {reason}")
    return backend


def segment_kind(name: str = "auto") -> Backend:
    """The backend called name, if it has a segment kind (what DiscardableMemoryManager needs)."""
    if name == "madvfree-sigbus":
        raise ValueError("the manager packs allocations into shared segments, which SIGBUS mode "
                         "does not support; use discache.allocate(n, sigbus=True) per allocation")
    backend = get(name)
    if backend.segment is None:
        raise BackendUnavailableError(f"backend {backend.name!r} cannot hold manager segments")
    return backend


def _cached(probe: Callable[[], tuple[bool, str]]) -> Callable[[], tuple[bool, str]]:
    """Probe once per process: kernel features do not come and go."""
    result: list[tuple[bool, str]] = []

    def cached() -> tuple[bool, str]:
        if not result:
            result.append(probe())
        return result[0]

    return cached


def _probe_madv_free() -> tuple[bool, str]:
    ok, reason = _core.probe_madvise(_core.MADV_FREE_VALUE)
    return ok, "madvise(MADV_FREE) works on private anonymous memory" if ok else reason


_probe_madvfree = _cached(_probe_madv_free)
_probe_uffd = _cached(_core.probe_userfaultfd_sigbus)


def _probe_madvfree_sigbus() -> tuple[bool, str]:
    madv_free = _probe_madvfree()
    return _probe_uffd() if madv_free[0] else madv_free


def _madvfree_segment(npages: int) -> Any:
    return _core.Segment(npages, "madvfree")


def _madvfree_sigbus_segment(npages: int) -> Any:
    return _core.Segment(npages, "madvfree", sigbus=True)


def _memfd_segment(npages: int) -> Any:
    return _core.Segment(npages, "memfd")


def _ashmem_segment(npages: int) -> Any:
    return _core.Segment(npages, "ashmem")


def _simulated_segment(npages: int) -> Any:
    from ..sim.backend import SimSegment

    return SimSegment(npages)


def _probe_simulated() -> tuple[bool, str]:
    return True, "the simulated kernel (discache.sim) runs on any machine"


def _sole(name: str, new_segment: Callable[[int], Any]) -> Callable[[int], Any]:
    """discache.allocate on a backend: a new segment holding one span."""
    return lambda nbytes: allocate_sole_span(name, new_segment, nbytes)


register(Backend("madvfree", _probe_madvfree, _sole("madvfree", _madvfree_segment),
                 "private memory; unlock = MADV_FREE, lock detects discarded pages by cookie CAS",
                 _madvfree_segment))
register(Backend("madvfree-sigbus", _probe_madvfree_sigbus,
                 _sole("madvfree-sigbus", _madvfree_sigbus_segment),
                 "madvfree + userfaultfd: accessors raise PurgedPageError on discarded pages"))
register(Backend("memfd", _cached(_core.probe_memfd), _sole("memfd", _memfd_segment),
                 "memfd shared memory; purged by policy (punch hole), not by the kernel",
                 _memfd_segment))
register(Backend("ashmem", _core.probe_ashmem, _sole("ashmem", _ashmem_segment),
                 "Android's /dev/ashmem; unlock = UNPIN, lock = PIN (WAS_PURGED for the range)"))
register(Backend("simulated", _probe_simulated, _sole("simulated", _simulated_segment),
                 "discache.sim's simulated kernel: unlock = MADV_VOLATILE, lock = MADV_NONVOLATILE",
                 _simulated_segment))
