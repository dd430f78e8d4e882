"""Where the orchestrator keeps its task and agent records.

Scheduling code reads and writes records only through ``StateStore``, so a
persistent store (SQLite, PostgreSQL) can replace ``MemoryStore`` without
touching it. The orchestrator rebuilds its indexes (dependency graph,
statistics) from ``tasks()`` at start.
"""

from __future__ import annotations

import abc
import copy
from typing import Any

from .models import AgentCapability, Task


class StateStore(abc.ABC):
    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def save_task(self, task: Task) -> None:
        """Insert or update a task record."""

    @abc.abstractmethod
    async def delete_task(self, task_id: str) -> None: ...

    @abc.abstractmethod
    async def tasks(self) -> list[Task]:
        """Every task record (read once, at start)."""

    @abc.abstractmethod
    async def save_agent(self, agent: AgentCapability) -> None: ...

    @abc.abstractmethod
    async def delete_agent(self, agent_id: str) -> None: ...

    @abc.abstractmethod
    async def agents(self) -> list[AgentCapability]: ...

    @abc.abstractmethod
    async def get_meta(self, key: str) -> Any:
        """A JSON value the orchestrator keeps beside the records; None if unset."""

    @abc.abstractmethod
    async def save_meta(self, key: str, value: Any) -> None: ...

    async def flush(self) -> None:
        """Make every change so far durable (a no-op where nothing is durable).

        The orchestrator calls it before publishing a task and before the bus
        acknowledges handled events, so a store may batch writes in between.
        """

    async def close(self) -> None:
        """Release resources (files, connections)."""


class MemoryStore(StateStore):
    """Records in dictionaries: fast, and gone when the process ends."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._agents: dict[str, AgentCapability] = {}
        self._meta: dict[str, Any] = {}

    async def get_task(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def save_task(self, task: Task) -> None:
        self._tasks[task.task_id] = task

    async def delete_task(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)

    async def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    async def save_agent(self, agent: AgentCapability) -> None:
        self._agents[agent.agent_id] = agent

    async def delete_agent(self, agent_id: str) -> None:
        self._agents.pop(agent_id, None)

    async def agents(self) -> list[AgentCapability]:
        return list(self._agents.values())

    async def get_meta(self, key: str) -> Any:
        return copy.deepcopy(self._meta.get(key))

    async def save_meta(self, key: str, value: Any) -> None:
        self._meta[key] = copy.deepcopy(value)
