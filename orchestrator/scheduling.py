"""Placement policy: message priorities and consumer priorities.

Placement itself is the broker's: a task waits in the priority queue of its
capability set, and among the agents with a free slot the broker prefers the
consumer with the highest ``x-priority``. This module decides those numbers.
"""

from __future__ import annotations

from broker.topology import MAX_PRIORITY

from .models import AgentCapability, TaskPriority

_CLASS_BASE = {
    TaskPriority.LOW: 0,
    TaskPriority.MEDIUM: 3,
    TaskPriority.HIGH: 6,
    TaskPriority.CRITICAL: 9,
}
SHORT_TASK_SECONDS = 300
"""Within a class, a task expected to take less than this ranks one level higher."""

SCORE_SMOOTHING = 0.1
"""Weight of the newest outcome in the moving average of an agent's scores."""


def message_priority(priority: TaskPriority, estimated_duration: float) -> int:
    """AMQP priority (0..10): the class, then shorter expected tasks first."""
    bonus = 1 if estimated_duration < SHORT_TASK_SECONDS else 0
    return min(MAX_PRIORITY, _CLASS_BASE[priority] + bonus)


def consumer_priority(agent: AgentCapability) -> int:
    """The agent's ``x-priority``: reliable agents are offered work first."""
    return max(0, min(10, round(agent.performance_score * 4)))


def record_outcome(agent: AgentCapability, task_type: str, success: bool) -> None:
    """Move the agent's performance and per-type specialization scores."""
    value = 1.0 if success else 0.0
    agent.performance_score += SCORE_SMOOTHING * (value - agent.performance_score)
    previous = agent.specialization_score.get(task_type, 1.0)
    agent.specialization_score[task_type] = previous + SCORE_SMOOTHING * (value - previous)
