"""Placement policy: the seam through which the orchestrator decides where work may go.

Placement itself is the broker's (DESIGN.md): a task waits in the priority
queue of its capability set, and among the agents with a free slot the broker
prefers the consumer with the highest ``x-priority``. What the orchestrator
decides is everything around that: which queues an agent consumes, its
consumer priority, a message's priority, whom a retry avoids, and how an
outcome moves an agent's scores. Those decisions live behind this one class
so that a learned policy can replace them without touching the lifecycle:
subclass ``PlacementPolicy`` and pass it as ``TaskOrchestrator(placement=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker import covers

from . import scheduling
from .models import AgentCapability, Task

ANY_TASK_TYPE = "*"
"""The task type of an agent's catch-all handler."""


@dataclass(frozen=True)
class QueueSpec:
    """What the tasks of one queue need: a handler for ``task_type``, and ``capabilities``."""

    task_type: str
    capabilities: tuple[str, ...]

    @classmethod
    def of(cls, task: Task) -> QueueSpec:
        return cls(task.task_type, tuple(sorted(set(task.required_capabilities))))


def can_run(agent: AgentCapability, spec: QueueSpec) -> bool:
    """Whether ``agent`` has a handler for the type and every capability needed."""
    types = agent.task_types
    if types is None or not (spec.task_type in types or ANY_TASK_TYPE in types):
        return False
    return covers(agent.capabilities, spec.capabilities)


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


class PlacementPolicy:
    """Today's policy: handler and capability cover, scores as consumer
    priority, avoid a failed agent."""

    def queues_for(self, agent: AgentCapability, queues: Mapping[str, QueueSpec]) -> list[str]:
        """The keys of the queues ``agent`` consumes, of those in use: the
        types it handles, the capability sets it covers."""
        return [key for key, spec in queues.items() if can_run(agent, spec)]

    def consumer_priority(self, agent: AgentCapability) -> int:
        """The agent's ``x-priority``: the broker offers work to higher ones first."""
        return scheduling.consumer_priority(agent)

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

    def record_outcome(self, agent: AgentCapability, task: Task, success: bool) -> bool:
        """Move ``agent``'s scores after it ran ``task``; whether its consumer
        priority changed (then it is told again)."""
        before = self.consumer_priority(agent)
        scheduling.record_outcome(agent, task.task_type, success)
        return self.consumer_priority(agent) != before
