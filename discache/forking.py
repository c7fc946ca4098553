"""fork() with discache's locks: each is taken before the fork, in one fixed order (managers
before the simulated kernel, as the code nests them), so that no other thread holds one halfway
through an operation when the child is made; the parent releases them, the child makes new ones."""
from __future__ import annotations

import os
from typing import Any, Callable

# (order, the locks to hold now, what the child runs instead of releasing them)
_HOLDERS: list[tuple[int, Callable[[], list[Any]], Callable[[], None]]] = []
_held: list[Any] = []
MANAGERS = 0
SIMULATED_KERNEL = 1


def hold_across_fork(order: int, locks: Callable[[], list[Any]],
                     reset_in_child: Callable[[], None]) -> None:
    """Take locks() before every fork(), after those of a lower order; the child calls
    reset_in_child() (fresh locks, no threads) instead of releasing them."""
    _HOLDERS.append((order, locks, reset_in_child))
    _HOLDERS.sort(key=lambda holder: holder[0])


def _before() -> None:
    for _, locks, _ in _HOLDERS:
        for lock in locks():
            lock.acquire()
            _held.append(lock)


def _after_in_parent() -> None:
    while _held:
        _held.pop().release()


def _after_in_child() -> None:
    _held.clear()
    for _, _, reset in _HOLDERS:
        reset()


os.register_at_fork(before=_before, after_in_parent=_after_in_parent,
                    after_in_child=_after_in_child)
