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

from broker import covers

from . import scheduling
from .models import AgentCapability, Task


class PlacementPolicy:
    """Today's policy: capability cover, scores as consumer priority, avoid a failed agent."""

    def queues_for(self, agent: AgentCapability, queues: Mapping[str, list[str]]) -> list[str]:
        """The keys of the capability queues ``agent`` consumes, of those in use."""
        return [key for key, caps in queues.items() if covers(agent.capabilities, caps)]

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
        others = (a for a in agents if a.agent_id != failed_on)
        if any(covers(a.capabilities, task.required_capabilities) for a in others):
            return [failed_on]
        return []

    def record_outcome(self, agent: AgentCapability, task: Task, success: bool) -> bool:
        """Move ``agent``'s scores after it ran ``task``; whether its consumer
        priority changed (then it is told again)."""
        before = self.consumer_priority(agent)
        scheduling.record_outcome(agent, task.task_type, success)
        return self.consumer_priority(agent) != before
