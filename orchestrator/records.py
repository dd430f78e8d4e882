"""The orchestrator's identity map of task records.

Every part of the orchestrator reads a task from here and holds the same
object, so a check made after an ``await`` ("was this attempt superseded
while we waited?") sees what another coroutine changed meanwhile. That
guarantee used to come from the stores handing out their live objects; a
store that returned copies (PostgreSQL) would have broken it silently. Now
the store is only a journal (see ``store``): written behind, read at start.

It also indexes the tasks by their idempotency key (``Task.idempotency_key``),
rebuilt from the records at start, so that a key lives exactly as long as its
task is kept.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator

from .models import Task, TaskStatus
from .store import StateStore


class TaskRecords:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._tasks: dict[str, Task] = {}
        self._by_key: dict[str, Task] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def get(self, task_id: str | None) -> Task | None:
        return self._tasks.get(task_id) if task_id else None

    def by_key(self, idempotency_key: str) -> Task | None:
        """The task submitted with this idempotency key, while it is kept."""
        return self._by_key.get(idempotency_key)

    def newest(
        self,
        limit: int,
        *,
        statuses: Collection[TaskStatus] = (),
        task_type: str | None = None,
        agent_id: str | None = None,
    ) -> list[Task]:
        """The ``limit`` most recently created tasks that match every filter given
        (an empty ``statuses`` matches any): one pass, without sorting them all."""
        wanted = frozenset(statuses)
        matching = (
            task
            for task in self._tasks.values()
            if (not wanted or task.status in wanted)
            and (task_type is None or task.task_type == task_type)
            and (agent_id is None or task.assigned_agent == agent_id)
        )
        return heapq.nlargest(limit, matching, key=lambda task: task.created_at)

    async def load(self) -> list[Task]:
        """Read every stored task, once, at start."""
        self._tasks = {task.task_id: task for task in await self.store.tasks()}
        self._by_key = {}
        for task in self._tasks.values():
            self._index(task)
        return list(self._tasks.values())

    def _index(self, task: Task) -> None:
        key = task.idempotency_key
        if key is not None:
            first = self._by_key.get(key)
            # Two records of one key only if a store was edited by hand: the first wins.
            if first is None or task.created_at < first.created_at:
                self._by_key[key] = task

    async def add(self, task: Task, *, journal: bool = True) -> None:
        """A new task; ``journal`` False when the caller saves it next, before any wait."""
        self._tasks[task.task_id] = task
        self._index(task)
        if journal:
            await self.store.save_task(task)

    async def save(self, task: Task) -> None:
        """Journal ``task`` as it is now (durable at the next ``flush``)."""
        if self._tasks.get(task.task_id) is task:
            await self.store.save_task(task)

    async def remove(self, task_id: str) -> None:
        task = self._tasks.pop(task_id, None)
        key = task.idempotency_key if task is not None else None
        if key is not None and self._by_key.get(key) is task:
            del self._by_key[key]
        await self.store.delete_task(task_id)

    async def flush(self) -> None:
        await self.store.flush()
