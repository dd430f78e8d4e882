"""``TaskContext``: what a handler sees of its task, and how it reports progress.

A sync handler learns that its task ran past its timeout or was cancelled
(or that its agent stops) from ``ctx.interrupted``; ``ctx.check()`` raises
``TaskInterrupted`` then."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import TaskMessage

_MAKING = threading.Lock()
"""Held while a context's ``interrupted`` event is made."""


class TaskInterrupted(BaseException):
    """Raised in a sync handler's thread when its task passed its timeout or was
    cancelled (or its agent stops), so that the thread ends: by ``ctx.check()``
    (cooperative, the default), or, for a handler registered with
    ``interrupt=True``, asynchronously (CPython's ``PyThreadState_SetAsyncExc``)
    at the thread's next Python instruction after any blocking C call it is in
    returns; that one can leave a lock the thread was taking held for good
    (see ``Agent.handler``).

    A ``BaseException``, so that ``except Exception`` does not swallow it; catch
    it only to clean up, and let it go on. Until the thread has ended, its task
    keeps its slot of the agent's ``max_concurrent_tasks``.
    """


@dataclass
class TaskContext:
    """One attempt of one task, as handed to a handler.

    ``dependency_results`` maps the id of each task this one depends on to
    that task's result, so workflows pass data along.
    """

    message: TaskMessage
    agent_id: str
    _report: Callable[[float], None] = field(repr=False)
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _interrupted: threading.Event | None = field(default=None, repr=False)

    @property
    def interrupted(self) -> threading.Event:
        """Set when this attempt's handler should stop: its task passed its timeout
        or was cancelled, or its agent stops. A sync handler calls ``check()`` now
        and then, or waits with ``interrupted.wait(seconds)`` instead of sleeping.

        Made when first asked for (most handlers never ask, and end before
        anything tells them to stop), under a lock: a handler's thread and
        the event loop may ask at once."""
        event = self._interrupted
        if event is None:
            with _MAKING:
                event = self._interrupted
                if event is None:
                    event = self._interrupted = threading.Event()
        return event

    @property
    def task_id(self) -> str:
        return self.message.task_id

    @property
    def attempt(self) -> int:
        return self.message.attempt

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def task_type(self) -> str:
        return self.message.task_type

    @property
    def payload(self) -> dict[str, Any]:
        return self.message.payload

    @property
    def timeout(self) -> float:
        return self.message.timeout

    @property
    def dependency_results(self) -> dict[str, Any]:
        return self.message.dependency_results

    def check(self) -> None:
        """Raise ``TaskInterrupted`` if the handler should stop (``interrupted``
        is set); else return. For sync handlers, between steps of their work."""
        event = self._interrupted
        if event is not None and event.is_set():
            raise TaskInterrupted(f"task {self.task_id} (attempt {self.attempt}) interrupted")

    def progress(self, fraction: float) -> None:
        """Report progress (0..1). Callable from async and sync handlers alike."""
        fraction = min(1.0, max(0.0, float(fraction)))
        try:
            in_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a sync handler, in its worker thread
            in_loop = False
        if in_loop:
            self._report(fraction)
        else:
            self._loop.call_soon_threadsafe(self._report, fraction)
