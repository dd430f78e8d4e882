"""The numbers of the placement policy: message priorities, consumer priorities, scores.

Placement itself is the broker's: a task waits in the priority queue of its
type and capability set, and among the agents with a free slot the broker
prefers the consumer with the highest ``x-priority``. This module decides
those numbers; ``placement.PlacementPolicy`` says when they apply.
"""

from __future__ import annotations

import math

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


PERFORMANCE_LEVELS = 4
"""An agent's performance score in levels 0..4: its base consumer priority."""

NEUTRAL_SPECIALIZATION = 0.5
"""An agent's specialization score for a task type it has no record of:
nothing is known, neither good nor bad. Its record starts here, so that a
record built by running tasks of the type says how they went (a first
success is not yet a specialist, a first failure not yet a poor hand)."""

SPECIALIZATION_LEVELS = 2
"""A specialization score in levels 0..2 (``round(score * 2)``): poor (0.25
and below: about seven failures in a row from nothing known), unknown or
middling, specialist (0.75 and above: about seven successes in a row, or
announced)."""

SPECIALIZATION_STEP = PERFORMANCE_LEVELS + 1
"""Priority per specialization level: more than every performance level, so
that the record on the queue's type ranks before the agent's general record."""

NAMED_STEP = SPECIALIZATION_STEP * (SPECIALIZATION_LEVELS + 1)
"""Priority for a queue whose type the agent names (not only its ``*``
handler): more than every specialization and performance level."""

MAX_QUEUE_PRIORITY = NAMED_STEP + SPECIALIZATION_STEP * SPECIALIZATION_LEVELS + PERFORMANCE_LEVELS
"""The highest priority ``queue_priority`` gives (29)."""


def message_priority(priority: TaskPriority, estimated_duration: float) -> int:
    """AMQP priority (0..10): the class, then shorter expected tasks first."""
    bonus = 1 if estimated_duration < SHORT_TASK_SECONDS else 0
    return min(MAX_PRIORITY, _CLASS_BASE[priority] + bonus)


def consumer_priority(agent: AgentCapability) -> int:
    """The agent's base ``x-priority`` (0..4): reliable agents are offered work first."""
    return max(0, min(PERFORMANCE_LEVELS, round(agent.performance_score * PERFORMANCE_LEVELS)))


def specialization(agent: AgentCapability, task_type: str) -> float:
    """The agent's specialization score for ``task_type`` in 0..1: its record
    (built by outcomes, or announced: an announced number outside 0..1 is cut
    to it, one that is not a number counts as no record)."""
    score = agent.specialization_score.get(task_type, NEUTRAL_SPECIALIZATION)
    if not isinstance(score, int | float) or not math.isfinite(score):
        return NEUTRAL_SPECIALIZATION
    return max(0.0, min(1.0, float(score)))


def queue_priority(agent: AgentCapability, task_type: str, *, named: bool) -> int:
    """The agent's ``x-priority`` on a queue of ``task_type`` (0..29): whether
    it names the type, then its specialization level in it, then its base."""
    level = round(specialization(agent, task_type) * SPECIALIZATION_LEVELS)
    return NAMED_STEP * named + SPECIALIZATION_STEP * level + consumer_priority(agent)


def scores_after(agent: AgentCapability, task_type: str, success: bool) -> tuple[float, float]:
    """The agent's performance score and its specialization score in
    ``task_type`` once an outcome is recorded (moving averages)."""
    value = 1.0 if success else 0.0
    previous = specialization(agent, task_type)
    return (
        agent.performance_score + SCORE_SMOOTHING * (value - agent.performance_score),
        previous + SCORE_SMOOTHING * (value - previous),
    )


def moves_a_level(agent: AgentCapability, task_type: str, success: bool) -> bool:
    """Whether recording this outcome would change a number ``queue_priority``
    gives the agent: its base level, or its specialization level in ``task_type``
    (the only scores an outcome moves). Mostly not: the scores move by a tenth."""
    performance, score = scores_after(agent, task_type, success)
    level = round(specialization(agent, task_type) * SPECIALIZATION_LEVELS)
    base = max(0, min(PERFORMANCE_LEVELS, round(performance * PERFORMANCE_LEVELS)))
    return (
        base != consumer_priority(agent)
        or round(max(0.0, min(1.0, score)) * SPECIALIZATION_LEVELS) != level
    )


def record_outcome(agent: AgentCapability, task_type: str, success: bool) -> None:
    """Move the agent's performance and per-type specialization scores."""
    agent.performance_score, agent.specialization_score[task_type] = scores_after(
        agent, task_type, success
    )
