"""A bounded thread pool that runs demand reads before background ones.

Invariant: a queued job with a lower ``priority`` always starts before any queued
job with a higher one; among equals, first submitted first. The priority of a job is
the value of :data:`io_priority` in the context that submits it (0 = demand, the
default; 1 = background), so a prefetch task sets it once and every read, chunk and
block allocation it submits queues behind demand work — without changing the
:class:`~asyncpager.Source` API. A running job is never interrupted: a demand read
waits at most for the chunks already running (one per worker).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["BACKGROUND", "DEMAND", "PriorityThreadPool", "io_priority"]

DEMAND, BACKGROUND = 0, 1
io_priority: contextvars.ContextVar[int] = contextvars.ContextVar("io_priority", default=DEMAND)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Job = tuple[int, int, "concurrent.futures.Future[Any]", Callable[[], Any]]


class PriorityThreadPool(concurrent.futures.Executor):
    """At most ``max_workers`` threads, started on demand, serving a priority heap."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "asyncpager-io") -> None:
        self._max_workers = max(1, max_workers)
        self._prefix = thread_name_prefix
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        priority = io_priority.get()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            heapq.heappush(
                self._heap, (priority, next(self._seq), future, lambda: fn(*args, **kwargs))
            )
            if self._idle:
                self._cond.notify()
            elif len(self._threads) < self._max_workers:
                t = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._shutdown:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._heap:
                    return
                _, _, future, call = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for _, _, future, _ in self._heap:
                    future.cancel()
                self._heap.clear()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()
