"""Which finished tasks the orchestrator may forget, and when.

A long-running orchestrator cannot keep every task it ever ran. With a
``finished_task_ttl`` a finished task is dropped from the store that long
after it ended, as Celery expires results, except while a task that depends
on it has not ended: a dependent (or its retry) is published with its
dependencies' results, so they must still be there. ``get_stats`` keeps
counting forgotten tasks (see ``StatsTracker.retire``).

The cost is constant per task: finished tasks queue up in the order they
ended, and only the head of the queue is looked at.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from .lifecycle import Move
from .models import Task


class FinishedTasks:
    def __init__(self, ttl: float | None) -> None:
        self.ttl = ttl
        self._ended: deque[tuple[float, str]] = deque()
        self._needed: Counter[str] = Counter()
        """For each task: how many tasks depending on it have not ended."""

    def submitted(self, task: Task) -> None:
        if self.ttl is not None:
            self._needed.update(task.dependencies)

    def moved(self, task: Task, move: Move) -> None:
        """A ``Lifecycle`` observer: a task that ends starts its retention."""
        if move.new.is_final:
            self.finished(task)

    def finished(self, task: Task) -> None:
        if self.ttl is None:
            return
        self._ended.append((task.completed_at or 0.0, task.task_id))
        self.withdrawn(task)

    def withdrawn(self, task: Task) -> None:
        """``task`` needs its dependencies no more (it ended, or was never accepted)."""
        if self.ttl is None:
            return
        for dep in task.dependencies:
            self._needed[dep] -= 1
            if self._needed[dep] <= 0:
                del self._needed[dep]

    def expired(self, now: float) -> list[str]:
        """Ids of the tasks to forget now; those still needed wait one more ``ttl``."""
        if self.ttl is None:
            return []
        horizon = now - self.ttl
        expired, kept = [], []
        while self._ended and self._ended[0][0] <= horizon:
            _, task_id = self._ended.popleft()
            (kept if self._needed[task_id] > 0 else expired).append(task_id)
        self._ended.extend((now, task_id) for task_id in kept)
        return expired

    def rebuild(self, tasks: Iterable[Task]) -> None:
        """From stored records, after a restart."""
        if self.ttl is None:
            return
        tasks = list(tasks)
        for task in tasks:
            if not task.status.is_final:
                self.submitted(task)
        ended = sorted((t for t in tasks if t.status.is_final), key=lambda t: t.completed_at or 0)
        self._ended.extend((t.completed_at or 0.0, t.task_id) for t in ended)
