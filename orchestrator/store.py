"""Where the orchestrator's task and agent records are kept: a write-behind journal.

The orchestrator holds the one live copy of every record (its identity map,
``records.TaskRecords`` and the agent registry) and reads only from it. A
store is told of changes and makes them durable; it is read once, at start.
Its semantics, which ``tests/test_store_contract.py`` holds every store to:

- ``save_*`` / ``delete_*`` record a change, taken as the record is at the
  call (a snapshot): changing the object later changes nothing stored until
  it is saved again. So a store may keep, copy or serialise what it is
  given, and a store over a network (PostgreSQL) behaves like one in memory.
- ``flush`` makes every change recorded so far durable; the orchestrator
  calls it before it publishes a task and before the bus acknowledges the
  events it handled, so a store may batch writes in between.
- ``tasks`` / ``agents`` / ``get_meta`` / ``get_task`` read what was saved,
  as copies that the caller may change freely.

Leader fencing: ``claim_epoch`` raises the store's leader epoch and makes the
claiming store object write only under it. A store object whose epoch was
overtaken (another process claimed since) writes nothing more: its
``flush`` raises ``StoreFenced``. So an old leader that wakes up from a pause
cannot overwrite what the new one wrote. A store object that never claimed
is not fenced (one orchestrator per store, as before leadership existed).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import operator
from typing import Any

from .models import AgentCapability, Task

_task_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Task)))


def snapshot_task(task: Task) -> Task:
    """A copy that later changes of ``task`` do not reach.

    Shallow on purpose (a save is on the hot path): the orchestrator replaces
    ``payload``, ``result`` and the id lists of a task, it never changes them
    in place. Made by ``Task``'s own ``__init__`` from every field in order
    (``Task`` has slots, which ``copy.copy`` copies through a reduce at three
    times the cost).
    """
    return Task(*_task_values(task))


def snapshot_agent(agent: AgentCapability) -> AgentCapability:
    """A copy that later changes of ``agent`` (its scores, its running set) do not reach."""
    return copy.deepcopy(agent)


class StoreFenced(RuntimeError):
    """A newer leader claimed the store: this store object may write nothing more."""

    def __init__(self, where: str, epoch: int, current: int, holder: str | None) -> None:
        self.epoch, self.current, self.holder = epoch, current, holder
        super().__init__(
            f"{where}: fenced: this orchestrator leads under epoch {epoch}, but"
            f" {holder or 'another orchestrator'} claimed epoch {current}; nothing was written"
        )


class StateStore(abc.ABC):
    durable: bool = False
    """Whether what was flushed outlives the process: then a submit made while the
    broker cannot be reached is kept, and published when the link is back."""

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None:
        """The task as last saved (a copy), or None."""

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

    # Leader fencing. The default keeps the epoch in the object: right for a store
    # no other process can reach (``MemoryStore``); a shared store overrides both.
    _epoch_in_memory: tuple[int, str | None] = (0, None)

    async def claim_epoch(self, holder: str) -> int:
        """Raise the store's leader epoch by one and record ``holder`` as its
        leader, atomically; from then on this object writes only under that epoch
        (a ``flush`` after someone else claimed a newer one raises ``StoreFenced``)."""
        epoch = self._epoch_in_memory[0] + 1
        self._epoch_in_memory = (epoch, holder)
        return epoch

    async def current_epoch(self) -> tuple[int, str | None]:
        """The store's latest leader epoch and its holder ((0, None): never claimed).

        Cheap, and it reads no records (a standby asks it every poll, to name
        the leader): a store reads its records when it is claimed or read."""
        return self._epoch_in_memory


class MemoryStore(StateStore):
    """Records in dictionaries: fast, and gone when the process ends."""

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[Any, ...]] = {}
        """Each task as the tuple of its field values when saved: the same
        shallow snapshot as ``snapshot_task``, taken at half its cost (no
        ``Task.__init__``; a save is on the hot path, reads are at start)."""
        self._agents: dict[str, AgentCapability] = {}
        self._meta: dict[str, Any] = {}

    async def get_task(self, task_id: str) -> Task | None:
        values = self._tasks.get(task_id)
        return None if values is None else Task(*values)

    async def save_task(self, task: Task) -> None:
        self._tasks[task.task_id] = _task_values(task)

    async def delete_task(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)

    async def tasks(self) -> list[Task]:
        return [Task(*values) for values in self._tasks.values()]

    async def save_agent(self, agent: AgentCapability) -> None:
        self._agents[agent.agent_id] = snapshot_agent(agent)

    async def delete_agent(self, agent_id: str) -> None:
        self._agents.pop(agent_id, None)

    async def agents(self) -> list[AgentCapability]:
        return [snapshot_agent(a) for a in self._agents.values()]

    async def get_meta(self, key: str) -> Any:
        return copy.deepcopy(self._meta.get(key))

    async def save_meta(self, key: str, value: Any) -> None:
        self._meta[key] = copy.deepcopy(value)
