"""``TaskContext``: what a handler sees of its task, and how it reports progress.

``TaskInterrupted`` is what a sync handler's thread sees when its task runs
past its timeout or is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import TaskMessage


class TaskInterrupted(BaseException):
    """Raised inside a sync handler's thread when its task passed its timeout
    or was cancelled (or its agent stops), so that the thread ends.

    It is raised asynchronously (CPython's ``PyThreadState_SetAsyncExc``): the
    thread sees it at its next Python instruction, not inside a blocking C call
    (``time.sleep``, ``Event.wait``, a socket read), which it leaves first. A
    ``BaseException``, so that ``except Exception`` does not swallow it; catch it
    only to clean up, and let it go on. Until the thread has ended, its task
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
