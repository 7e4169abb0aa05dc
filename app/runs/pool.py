"""Threads for model calls, sized by a setting, apart from the threads of the runtime's own I/O.

AG2 runs every model call with `loop.run_in_executor(None, ...)` (`a_generate_oai_reply`), i.e. on
the event loop's default executor, which Python sizes `min(32, cores + 4)`: 6 threads on a 2-core
machine. Left alone that caps a node at 6 model calls in flight, and everything else that uses the
default executor (PyMongo's DNS lookups for new connections, `asyncio.to_thread`) queues behind them.

The mechanism chosen: the loop's default executor becomes a `RoutingExecutor`, and the runs mark
AG2's work with a context variable. `executor.submit` runs in the caller's context, so work
submitted from a run's AG2 task (which inherits the mark from `model_calls()`) goes to the model
pool, bounded by `MOZAIKS_MAX_CONCURRENT_LLM_CALLS`; everything else (DNS, `to_thread`, the API)
goes to a small pool of its own that model calls never occupy. Why not the alternatives: replacing
the default executor with one big pool still lets DNS queue behind hundreds of model calls;
overriding `a_generate_oai_reply` misses the agents AG2 builds itself (group manager, speaker
selector), and patching AG2 is not ours to do. The model pool's own work queue is FIFO, so calls
beyond the bound wait their turn in arrival order; `queued` and `in_flight` feed Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Set (in the run's task) while AG2's group-chat task is created, which copies it: AG2's work is marked.
_MODEL_WORK: contextvars.ContextVar[bool] = contextvars.ContextVar("mozaiks_model_work", default=False)


@contextlib.contextmanager
def model_calls() -> Iterator[None]:
    """Mark work started inside the block (AG2's run task) as model calls for the routing executor."""
    token = _MODEL_WORK.set(True)
    try:
        yield
    finally:
        _MODEL_WORK.reset(token)


class RoutingExecutor(ThreadPoolExecutor):
    """The loop's default executor: marked model work to a bounded FIFO pool, the rest to its own threads.

    It is a ThreadPoolExecutor itself (asyncio accepts nothing else as default executor); its own
    threads serve the runtime's work.
    """

    def __init__(self, max_model_calls: int, runtime_threads: int | None = None) -> None:
        super().__init__(
            max_workers=runtime_threads or min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="runtime"
        )
        self.max_model_calls = max_model_calls
        self.model_pool = ThreadPoolExecutor(max_workers=max_model_calls, thread_name_prefix="model-call")
        self._lock = threading.Lock()
        self.queued = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Route marked model work to the model pool (counted), anything else to the runtime threads."""
        if not _MODEL_WORK.get():
            return super().submit(fn, *args, **kwargs)
        with self._lock:
            self.queued += 1
        return self.model_pool.submit(self._counted, functools.partial(fn, *args, **kwargs))

    def _counted(self, call: Callable[[], _T]) -> _T:
        with self._lock:
            self.queued -= 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return call()
        finally:
            with self._lock:
                self.in_flight -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut both pools down."""
        self.model_pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


class _Installed:
    def __init__(self, executor: RoutingExecutor, previous: ThreadPoolExecutor | None) -> None:
        self.executor = executor
        self.previous = previous
        self.users = 0


_installed: dict[asyncio.AbstractEventLoop, _Installed] = {}


@contextlib.contextmanager
def routed_default_executor(
    loop: asyncio.AbstractEventLoop, max_model_calls: int
) -> Iterator[RoutingExecutor]:
    """Make a RoutingExecutor the loop's default executor while any user of it (a node's app) runs.

    Nodes sharing one loop (tests run two replicas in one process) share the first one's executor;
    the last one out puts the loop's previous executor back. asyncio has no getter for the default
    executor, so `_default_executor` is read for that.
    """
    installed = _installed.get(loop)
    if installed is None:
        previous = getattr(loop, "_default_executor", None)
        installed = _Installed(
            RoutingExecutor(max_model_calls), previous if isinstance(previous, ThreadPoolExecutor) else None
        )
        loop.set_default_executor(installed.executor)
        _installed[loop] = installed
    installed.users += 1
    try:
        yield installed.executor
    finally:
        installed.users -= 1
        if installed.users == 0:
            del _installed[loop]
            loop.set_default_executor(installed.previous or ThreadPoolExecutor())
            installed.executor.shutdown(wait=False)
