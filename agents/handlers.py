"""Where an agent's handlers run, and how they are stopped.

An async handler runs as its own task on the agent's event loop, a sync
handler in a worker thread. Either way the attempt waits for it with
``asyncio.wait``, which never waits for it to obey a stop: when its task's time
is up or a cancel comes, the outcome ("timeout" or "cancelled") is reported at
once, and ``HandlerRun.future`` says when the handler has really ended (an
async handler may swallow ``CancelledError``, a sync one may never check).
This does not rely on ``asyncio.wait_for``, whose waiting for a cancelled
awaitable differs between Python 3.11 and 3.12.

A stopped async handler's task is cancelled. A stopped sync handler's
``ctx.interrupted`` is set, and it stops cooperatively (``ctx.check()`` raises
``TaskInterrupted``); only one registered with ``interrupt=True`` also gets
``TaskInterrupted`` raised in its thread asynchronously (as Dramatiq's
``TimeLimit`` does), which can break locks the thread holds (see
``Agent.handler``).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import inspect
import json
import logging
import platform
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .context import TaskContext, TaskInterrupted

log = logging.getLogger(__name__)

Handler = Callable[[TaskContext], Any]
ANY_TASK_TYPE = "*"

TRACEBACK_CHARS = 8 * 1024
"""A traceback is kept to its last this many characters (the end says where it
broke), so that the final event that carries it stays well under the bus's
message limit."""
ERROR_CHARS = 4 * 1024
"""An error message is kept to its first this many characters."""


def bounded(text: str, limit: int, *, keep: str = "head") -> str:
    """``text`` cut to about ``limit`` characters, saying what was cut: its head
    kept (an error message), or its tail (a traceback, whose end matters)."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    if keep == "tail":
        return f"[... {cut} characters cut ...]\n" + text[-limit:]
    return text[:limit] + f" [... {cut} characters cut]"


@dataclass(frozen=True)
class Registered:
    """A handler as registered: ``interrupt`` is its opt-in to the thread interrupt."""

    fn: Handler
    interrupt: bool = False
    is_async: bool = False
    """A coroutine function (run as a task of its own), or a sync one (in a thread)."""


class Handlers:
    """The handlers of an agent, by task type ('*' for any type without its own)."""

    def __init__(self) -> None:
        self._by_type: dict[str, Registered] = {}

    def add(self, task_type: str, fn: Handler, *, interrupt: bool = False) -> None:
        if interrupt and inspect.iscoroutinefunction(fn):
            raise ValueError("interrupt=True is for sync handlers (async ones are cancelled)")
        self._by_type[task_type] = Registered(fn, interrupt, inspect.iscoroutinefunction(fn))

    def find(self, task_type: str) -> Registered | None:
        return self._by_type.get(task_type, self._by_type.get(ANY_TASK_TYPE))

    @property
    def task_types(self) -> list[str]:
        return sorted(self._by_type)


@dataclass(frozen=True)
class HandlerEnd:
    """How a handler's run ended, as the task's outcome: ``completed``,
    ``failed`` or ``timeout`` (a cancel is the attempt's, not the handler's)."""

    outcome: str
    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    """Where it broke (``failed``: the exception's traceback, its last
    ``TRACEBACK_CHARS``), or where it was when its time ran out (``timeout``,
    when that can be seen)."""


class Stopped(Exception):
    """The attempt a handler runs for was stopped (its job cancelled: see
    ``agents.running``) while it was waited for; the handler was told to stop."""


class HandlerRun:
    """One handler's run, on its own: its ``future`` is done once the handler
    has really ended, which may be long after its task ended here.

    An async handler's task tells the attempt waiting for it that it ended
    itself (``_contained``), and holds its outcome as a value, never raising:
    a done callback on it, to release the waiter, and another to mark its
    exception seen, would be two more steps of the event loop per attempt."""

    def __init__(
        self, future: asyncio.Future[Any] | None, ctx: TaskContext, call: _SyncCall | None
    ) -> None:
        self.future: asyncio.Future[Any] = future  # type: ignore[assignment]
        """(An async handler's task is set by ``Runners.start`` once made.)"""
        self._ctx = ctx
        self._call = call
        self._waiter: asyncio.Future[None] | None = None
        """Released when the handler ends, while ``wait`` waits."""

    def stop(self) -> None:
        """Tell the handler to stop; it may not obey (see the module's docstring)."""
        self._ctx.interrupted.set()
        if self._call is not None:
            self._call.interrupt()
        else:
            self.future.cancel()

    async def wait(self, timeout: float, stop: asyncio.Future[Any] | None = None) -> HandlerEnd:
        """Until the handler ends or ``timeout`` passes. If ``stop`` is cancelled
        first (the attempt is stopped), or this is, it stops the handler and
        raises ``Stopped`` (or is cancelled) at once."""
        try:
            done = await self._ended_within(timeout, stop)
        except asyncio.CancelledError:
            self.stop()
            raise
        if stop is not None and stop.cancelled():
            self.stop()
            raise Stopped
        if not done:
            where = self.where()  # before it is told to stop, which moves it
            self.stop()
            return HandlerEnd("timeout", error=f"exceeded timeout of {timeout:g}s", traceback=where)
        future = self.future
        if future.cancelled():
            # It cancelled itself (or was cancelled by someone else): it failed here.
            return HandlerEnd("failed", error="the handler was cancelled")
        error: BaseException | None = None
        if self._call is None:
            value, error = future.result()
        else:
            try:
                value = future.result()
            except BaseException as exc:
                value, error = None, exc
        if error is None:
            try:
                return HandlerEnd("completed", result=_as_result(value))
            except TypeError as exc:
                error = exc
        # The handler's failure is the task's, not ours. Any exception: a
        # handler's sys.exit() (SystemExit), a KeyboardInterrupt, a
        # TaskInterrupted it raised itself (its timeout or cancel is reported
        # above, without looking at its end) end the attempt, never the agent.
        return HandlerEnd(
            "failed",
            error=bounded(f"{type(error).__name__}: {error}", ERROR_CHARS),
            traceback=bounded(_traceback_of(error), TRACEBACK_CHARS, keep="tail"),
        )

    async def _ended_within(self, timeout: float, stop: asyncio.Future[Any] | None) -> bool:
        """Whether the handler ends within ``timeout`` seconds; never cancels
        it. The wait also ends once ``stop`` is done.

        ``asyncio.wait([future, stop], timeout=...)``, without its sets and
        checks (one per attempt): a waiter released by the handler's end, the
        stop or the timer, whichever comes first. Cancelled, it is cancelled at once."""
        future = self.future
        if future.done():
            return True
        if stop is not None and stop.done():
            return False
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()

        def release(_: Any = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(timeout, release)
        sync = self._call is not None
        if sync:  # (an async handler's task releases it itself: ``ended``)
            future.add_done_callback(release)
        if stop is not None:
            stop.add_done_callback(release)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()
            if sync:
                future.remove_done_callback(release)
            if stop is not None:
                stop.remove_done_callback(release)
        return future.done()

    def ended(self) -> None:
        """An async handler has ended (called from its task, as its last step)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def where(self) -> str | None:
        """The stack of the handler as it runs now (None if it cannot be seen)."""
        try:
            if self._call is not None:
                frame = self._call.frame()
                if frame is None:
                    return None
                lines = traceback.format_list(_after_ours(traceback.extract_stack(frame)))
            else:
                lines = traceback.format_list(_awaiting(self.future.get_coro()))  # type: ignore[attr-defined]
        except Exception:  # only ever a help for the log
            return None
        return bounded("".join(lines), TRACEBACK_CHARS, keep="tail") if lines else None


class Runners:
    """The agent's event loop and thread pool, as far as its handlers use them.

    It keeps the async handlers' tasks that have not ended, some of which
    outlive their task: a stop waits for them for a while."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._name = ""
        self._async: set[asyncio.Task[Any]] = set()

    def open(self, threads: int, name: str) -> None:
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    def close(self) -> None:
        """Threads still running are left to end on their own (they cannot be killed)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def resize(self, threads: int) -> None:
        """New sync handlers run in a pool of ``threads``; those running or
        queued in the old one go on there."""
        old = self._executor
        if old is not None:
            self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=self._name)
            old.shutdown(wait=False)

    def start(self, handler: Registered, ctx: TaskContext) -> HandlerRun:
        loop = asyncio.get_running_loop()
        if handler.is_async:
            run = HandlerRun(None, ctx, None)
            task = loop.create_task(
                _contained(handler.fn(ctx), run, self._async), name=f"handler:{ctx.task_id}"
            )
            run.future = task
            self._async.add(task)
            return run
        call = _SyncCall(handler.fn, ctx, raise_in_thread=handler.interrupt)
        # The thread runs in a copy of our context: its records name the task too.
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, call)
        future.add_done_callback(_retrieve)
        return HandlerRun(future, ctx, call)

    def unended(self) -> list[asyncio.Task[Any]]:
        """The async handlers still running."""
        ended = [task for task in self._async if task.done()]
        self._async.difference_update(ended)  # (in place: each task lets go of itself in it)
        return list(self._async)


async def _contained(
    coro: Any, run: HandlerRun, running: set[asyncio.Task[Any]]
) -> tuple[Any, BaseException | None]:
    """Run an async handler's coroutine: its value, or what it raised, as
    ``(value, exception)``. So no exception of its own can stop the event loop
    (a task raising ``SystemExit`` or ``KeyboardInterrupt`` re-raises it out of
    the loop) or go unseen; only a cancel ends its task as a cancel. Its last
    step tells the attempt that waits (``HandlerRun.ended``)."""
    try:
        return await coro, None
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except BaseException as exc:
        return None, exc
    finally:
        running.discard(run.future)  # type: ignore[arg-type]
        run.ended()


def _traceback_of(exc: BaseException) -> str:
    """The exception's traceback from the handler's own frame down (without the
    thread pool's and this module's frames that called it)."""
    tb = exc.__traceback__
    start = tb
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            start = tb.tb_next
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, start or exc.__traceback__))


def _after_ours(stack: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames of a stack below the last one of this module (the handler's own)."""
    last = max((i for i, entry in enumerate(stack) if entry.filename == __file__), default=-1)
    return list(stack)[last + 1 :]


def _awaiting(coro: Any) -> list[traceback.FrameSummary]:
    """Where a suspended coroutine is: each coroutine it awaits in turn, down
    to the innermost (``Task.get_stack`` gives only the outermost frame)."""
    entries = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        if frame.f_code.co_filename != __file__:
            entries.append(
                traceback.FrameSummary(
                    frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
                )
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return entries


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a handler's outcome as seen: nobody awaits one that outlived its task."""
    if not future.cancelled():
        future.exception()


_PLAIN = (str, int, bool, type(None))
"""Values that are JSON as they are (a float may be NaN or infinite)."""


def _as_result(value: Any) -> dict[str, Any] | None:
    """A handler's return value as a task result: a JSON object (or None).

    One of plain values under string keys (``{}``, ``{"ok": True}``) is one
    without a trial encoding, which would cost as much as the final event's."""
    if value is None:
        return None
    if not isinstance(value, dict):
        value = {"value": value}
    if not all(type(k) is str and type(v) in _PLAIN for k, v in value.items()):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the handler's result is not JSON-serialisable: {exc}") from None
    return value


# ---------------------------------------------------------------- sync handlers' threads


def _async_exc_setter() -> Callable[[int, Any], int] | None:
    """CPython's ``PyThreadState_SetAsyncExc`` with its own prototype (the
    shared ``ctypes.pythonapi`` entry is left as it is): the thread id is an
    unsigned long since Python 3.7, and a NULL exception clears a pending one."""
    if platform.python_implementation() != "CPython":
        return None
    prototype = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)
    return prototype(("PyThreadState_SetAsyncExc", ctypes.pythonapi))


_set_async_exc = _async_exc_setter()
_NO_EXCEPTION = ctypes.py_object()  # NULL


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Have ``exc_type`` raised in the thread at its next Python instruction."""
    if _set_async_exc is None:
        log.warning("cannot interrupt a handler's thread on %s", platform.python_implementation())
        return False
    count = _set_async_exc(thread_id, exc_type)
    if count > 1:  # cannot happen with a live thread's id; undo rather than hit several
        _set_async_exc(thread_id, _NO_EXCEPTION)
        log.error("interrupting thread %d touched %d threads: undone", thread_id, count)
        return False
    return count == 1


class _SyncCall:
    """One sync handler's call, run by the agent's thread pool, that can be
    interrupted: before it starts (it then never calls the handler) or while it
    runs (its ``ctx.interrupted`` is set, and with ``raise_in_thread``,
    ``TaskInterrupted`` is raised in its thread). An asynchronous interrupt
    never outlives the call: one not yet raised when the handler returns is
    cleared, so it cannot hit the pool's own code."""

    def __init__(self, handler: Handler, ctx: TaskContext, *, raise_in_thread: bool) -> None:
        self._handler = handler
        self._ctx = ctx
        self._raise_in_thread = raise_in_thread
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self._state = "queued"  # -> running -> done, or queued -> abandoned
        self._interrupted = False

    def __call__(self) -> Any:
        with self._lock:
            if self._state == "abandoned":
                raise TaskInterrupted("interrupted before it started")
            self._state = "running"
            self._thread_id = threading.get_ident()
        try:
            return self._handler(self._ctx)
        finally:
            with self._lock:
                self._state = "done"
                if self._interrupted:
                    _set_async_exc(self._thread_id, _NO_EXCEPTION)  # type: ignore[misc]

    def frame(self) -> Any:
        """The handler's thread's current frame, while it runs (else None)."""
        with self._lock:
            if self._state != "running" or self._thread_id is None:
                return None
            return sys._current_frames().get(self._thread_id)

    def interrupt(self) -> None:
        """Stop the handler (once): tell it (``ctx.interrupted``), and with
        ``raise_in_thread`` raise ``TaskInterrupted`` in its thread (a thread in
        a blocking C call sees it when the call returns)."""
        self._ctx.interrupted.set()
        with self._lock:
            if self._interrupted or self._state in ("done", "abandoned"):
                return
            if self._state == "queued":
                self._state = "abandoned"
                return
            if not self._raise_in_thread:
                return
            assert self._thread_id is not None
            self._interrupted = _raise_in_thread(self._thread_id, TaskInterrupted)
