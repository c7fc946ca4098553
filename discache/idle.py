"""The process's idle timer: one daemon thread that wakes caches when their entries may be idle."""
from __future__ import annotations

import atexit
import heapq
import itertools
import os
import sys
import threading
import time
import weakref
from typing import Any, Optional

clock = time.monotonic
MAX_WAIT = 3600.0  # seconds one wait lasts at most (a far deadline is waited for in steps)


class IdleTimer:
    """Calls owner._idle_tick() at the times owners ask for; sleeps while nobody asked.

    Owners are held weakly: a cache dropped by its program is not kept alive by its deadline.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Any]] = []  # (deadline, order, weakref to owner)
        self._order = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.ticks = 0  # owners woken, for tests and stats

    def schedule(self, owner: Any, delay: float) -> None:
        """Wake owner in delay seconds."""
        deadline = clock() + delay
        with self._cond:
            if self._stopping:
                return
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline, next(self._order), weakref.ref(owner)))
            if self._thread is None:
                self._start()
            elif earliest is None or deadline < earliest:
                self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="discache-idle", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if not self._heap:
                        self._cond.wait()  # nothing is locked anywhere: no polling
                        continue
                    wait = self._heap[0][0] - clock()
                    if wait <= 0:
                        break
                    self._cond.wait(min(wait, MAX_WAIT))
                if self._stopping:
                    return
                _, _, ref = heapq.heappop(self._heap)
            owner = ref()
            if owner is None:
                continue
            self.ticks += 1
            try:
                owner._idle_tick()
            except Exception:  # one cache's failure must not stop the others' timer
                sys.unraisablehook(_Unraisable(sys.exc_info(), owner))
            del owner

    @property
    def pending(self) -> int:
        """Deadlines waiting."""
        with self._cond:
            return len(self._heap)

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (at exit); deadlines scheduled later are ignored."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def before_fork(self) -> None:
        """Hold the timer's lock across fork, so the child's copy is consistent."""
        self._cond.acquire()

    def after_fork_in_parent(self) -> None:
        self._cond.release()

    def after_fork_in_child(self) -> None:
        """The thread did not survive fork: a new lock, and a new thread if deadlines wait."""
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        if self._heap and not self._stopping:
            self._start()


class _Unraisable:
    """What sys.unraisablehook expects, for an exception raised by a cache's idle tick."""

    def __init__(self, exc_info: Any, owner: Any,
                 err_msg: str = "Exception in discache's idle timer, ticking") -> None:
        self.exc_type, self.exc_value, self.exc_traceback = exc_info
        self.err_msg = err_msg
        self.object = owner


TIMER = IdleTimer()
atexit.register(TIMER.stop)
if hasattr(os, "register_at_fork"):
    # Registered before the caches' own hook (discache.cache imports this module first), so it
    # runs after theirs before a fork: the caches' locks are taken before the timer's.
    os.register_at_fork(before=TIMER.before_fork, after_in_parent=TIMER.after_fork_in_parent,
                        after_in_child=TIMER.after_fork_in_child)
