"""Placement policy: the seam through which the orchestrator decides where work may go.

Placement itself is the broker's (DESIGN.md): a task waits in the priority
queue of its capability set, and among the agents with a free slot the broker
prefers the consumer with the highest ``x-priority``. What the orchestrator
decides is everything around that: which queues an agent consumes, its
consumer priority on each of them, a message's priority, whom a retry
avoids, and how an outcome moves an agent's scores. Those decisions live behind this one class
so that a learned policy can replace them without touching the lifecycle:
subclass ``PlacementPolicy`` and pass it as ``TaskOrchestrator(placement=...)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker import MAX_CONSUMER_PRIORITY, covers

from . import scheduling
from .models import AgentCapability, Task

ANY_TASK_TYPE = "*"
"""The task type of an agent's catch-all handler."""

MEMO_SIZE = 4096
"""Distinct (task type, capabilities) whose queue key and spec are remembered;
past that the memory starts afresh (a fleet has far fewer queues)."""

_specs: dict[tuple[str, tuple[str, ...]], QueueSpec] = {}


@dataclass(frozen=True)
class QueueSpec:
    """What the tasks of one queue need: a handler for ``task_type``, and ``capabilities``."""

    task_type: str
    capabilities: tuple[str, ...]

    @classmethod
    def of(cls, task: Task) -> QueueSpec:
        """The spec of a task's queue: asked on each submit and each task event,
        so each distinct one is built once (immutable, it may be shared)."""
        wanted = (task.task_type, tuple(task.required_capabilities))
        if cls is not QueueSpec:
            return cls(task.task_type, tuple(sorted(set(wanted[1]))))
        spec = _specs.get(wanted)
        if spec is None:
            if len(_specs) >= MEMO_SIZE:
                _specs.clear()
            spec = _specs[wanted] = cls(task.task_type, tuple(sorted(set(wanted[1]))))
        return spec


def can_run(agent: AgentCapability, spec: QueueSpec) -> bool:
    """Whether ``agent`` has a handler for the type and every capability needed."""
    types = agent.task_types
    if types is None or not (spec.task_type in types or ANY_TASK_TYPE in types):
        return False
    return not spec.capabilities or covers(agent.capabilities, spec.capabilities)


def missing(agents: Iterable[AgentCapability], spec: QueueSpec) -> str | None:
    """Why no agent of ``agents`` can run tasks of ``spec`` (None if one can)."""
    agents = list(agents)
    if any(can_run(a, spec) for a in agents):
        return None
    handles = [
        a
        for a in agents
        if a.task_types and (spec.task_type in a.task_types or "*" in a.task_types)
    ]
    if not handles:
        return f"no registered agent has a handler for task_type {spec.task_type!r}"
    lacking = sorted(set(spec.capabilities) - set().union(*(set(a.capabilities) for a in handles)))
    need = ", ".join(lacking) if lacking else "+".join(spec.capabilities)
    return f"no agent with a handler for {spec.task_type!r} has the capabilities {need}"


def wire_priorities(
    keys: Iterable[str], priorities: Mapping[str, int], base: int
) -> tuple[int, dict[str, int]]:
    """A policy's priorities for the queues ``keys`` as a ``ConsumeQueues``
    carries them: a default and the exceptions to it, each within
    ``0..MAX_CONSUMER_PRIORITY`` (a key the policy left out gets ``base``).

    The default is the most common number (the highest of those): the
    command stays small, and an agent that predates per-queue priorities,
    which reads the default alone, consumes at a number of the same scale as
    the others. With no queues it is ``base``.
    """

    def bounded(priority: int) -> int:
        return max(0, min(MAX_CONSUMER_PRIORITY, int(priority)))

    wanted = {key: bounded(priorities.get(key, base)) for key in keys}
    if not wanted:
        return bounded(base), {}
    counts = Counter(wanted.values())
    default = max(counts, key=lambda p: (counts[p], p))
    return default, {key: p for key, p in wanted.items() if p != default}


class PlacementPolicy:
    """Today's policy: handler and capability cover, a consumer priority per
    queue from the agent's scores, avoid a failed agent."""

    def queues_for(self, agent: AgentCapability, queues: Mapping[str, QueueSpec]) -> list[str]:
        """The keys of the queues ``agent`` consumes, of those in use: the
        types it handles, the capability sets it covers."""
        return [key for key, spec in queues.items() if can_run(agent, spec)]

    def consumer_priority(self, agent: AgentCapability) -> int:
        """The agent's base ``x-priority`` (0..4, from its performance score):
        what ``consumer_priorities`` adds to, and what any agent's queues
        were consumed at before priorities were per queue."""
        return scheduling.consumer_priority(agent)

    def consumer_priorities(
        self, agent: AgentCapability, queues: Mapping[str, QueueSpec]
    ) -> dict[str, int]:
        """The agent's ``x-priority`` on each of ``queues`` it can run (0..29).

        The broker compares only the consumers of one queue, so each number
        answers one question: of the agents that can run this queue's tasks,
        which should have them first? Evidence about the queue's task type
        beats evidence about the agent in general, so the number is
        lexicographic, each part outranking everything below it:

        1. It names the type (+15): an agent that only catches every type
           with ``*`` ranks below one written for the type, and one agent's
           catch-all queues below its named ones.
        2. Its specialization level in the type (+0, +5 or +10): a poor
           record, none (or a middling one), a specialist's record, built by
           running tasks of the type or announced. The specialist is offered
           the type's tasks first, the generalists after it: a priority is a
           preference, never an exclusion, so a generalist still gets them
           whenever the specialist has no free slot.
        3. Its base ``consumer_priority`` (0..4): reliable agents first.

        It only ever rises with the agent's specialization in a type (a
        better record never ranks it lower on that type's queues). Equal
        agents take turns.
        """
        types = agent.task_types or []
        return {
            key: scheduling.queue_priority(agent, spec.task_type, named=spec.task_type in types)
            for key, spec in queues.items()
            if can_run(agent, spec)
        }

    def message_priority(self, task: Task) -> int:
        """The AMQP priority of a task's message in its queue."""
        return scheduling.message_priority(task.priority, task.estimated_duration)

    def avoid(
        self, task: Task, failed_on: str | None, agents: Iterable[AgentCapability]
    ) -> list[str]:
        """Agents a retry of ``task`` should skip: the one it failed on, if another can run it."""
        if not failed_on:
            return []
        spec = QueueSpec.of(task)
        if any(a.agent_id != failed_on and can_run(a, spec) for a in agents):
            return [failed_on]
        return []

    def record_outcome(
        self,
        agent: AgentCapability,
        task: Task,
        success: bool,
        queues: Mapping[str, QueueSpec] | None = None,
    ) -> dict[str, int]:
        """Move ``agent``'s scores after it ran ``task``; the new priorities of
        those of ``queues`` (the ones it consumes) whose priority that changed,
        empty if none did: then it is told again, otherwise not (the numbers
        move by levels, so an outcome seldom changes one)."""
        queues = queues or {}
        if (
            type(self).consumer_priorities is PlacementPolicy.consumer_priorities
            and not scheduling.moves_a_level(agent, task.task_type, success)
        ):
            # This policy's numbers come from the levels alone: none changes.
            scheduling.record_outcome(agent, task.task_type, success)
            return {}
        before = self.consumer_priorities(agent, queues)
        scheduling.record_outcome(agent, task.task_type, success)
        after = self.consumer_priorities(agent, queues)
        return {key: p for key, p in after.items() if before.get(key) != p}
