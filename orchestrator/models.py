"""The seed's records: ``TaskPriority``, ``TaskStatus``, ``Task``, ``AgentCapability``.

Fields and defaults are the seed's; the few added at the end of each record
are runtime bookkeeping the seed's behaviour needs (attempt numbers for
idempotent event handling, progress, heartbeats).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TaskPriority(Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    __hash__ = object.__hash__  # as ``TaskStatus``'s


class TaskStatus(Enum):
    PENDING = "pending"
    """No agent holds it: waiting for its dependencies, queued, or in a retry's back-off."""
    ASSIGNED = "assigned"
    """An agent holds it (``assigned_agent``) and has not started it."""
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    # Members are singletons compared by identity: their identity hash is the C
    # one, where Enum's hashes the name in Python (a status is looked up in a
    # table or a set several times per move).
    __hash__ = object.__hash__

    is_final: bool
    """Whether the status is final (``FINAL_STATUSES``): an attribute of each
    member, set below, rather than a property (asked a dozen times per task)."""


FINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT}
)
for _status in TaskStatus:
    _status.is_final = _status in FINAL_STATUSES
del _status


class Delivery(Enum):
    """Where an assigned attempt's message is, as far as the orchestrator knows.

    One persisted field, owned by ``dispatch`` (the outbox), so that a
    restarted orchestrator knows which attempts may be lost on their way to
    their queue and which cannot be.
    """

    NONE = "none"
    """Not the bus's business: waiting for dependencies, held by an agent, or final."""
    UNSENT = "unsent"
    """Marked queued, and certainly in no queue: the bus never had it, or refused it."""
    PUBLISHING = "publishing"
    """Being handed to the bus now. Found so after a restart: it may have been routed."""
    SENT = "sent"
    """The bus had it but never confirmed it: it may or may not be in its queue."""
    DELAYED = "delayed"
    """A retry in the broker's delay tier: back in its queue by ``retry_due``, or lost."""
    CONFIRMED = "confirmed"
    """In its durable queue: it can no longer be lost."""

    @property
    def watched(self) -> bool:
        """Whether the outbox must look for it (it may never reach its queue)."""
        return self in (Delivery.UNSENT, Delivery.PUBLISHING, Delivery.SENT, Delivery.DELAYED)


@dataclass(slots=True)
class Task:
    task_id: str
    name: str
    description: str
    task_type: str
    priority: TaskPriority
    payload: dict[str, Any]
    dependencies: list[str] = field(default_factory=list)
    required_capabilities: list[str] = field(default_factory=list)
    estimated_duration: int = 300
    max_retries: int = 3
    timeout: int = 600

    # Runtime state
    status: TaskStatus = TaskStatus.PENDING
    assigned_agent: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    retry_count: int = 0
    result: dict[str, Any] | None = None
    error_message: str | None = None

    # Beyond the seed: bookkeeping for idempotent, observable execution.
    attempt: int = 0
    """Number of the current publish; events of other attempts are stale."""
    progress: float = 0.0
    retry_due: float | None = None
    """Latest time a delayed retry should reach its queue; watched until then."""
    delivery: Delivery = Delivery.NONE
    """Where the current attempt's message is (see ``Delivery``)."""
    traceback: str | None = None
    """The last failed attempt's traceback, as its agent reported it."""
    idempotency_key: str | None = None
    """The key it was submitted with: a submit repeating it gets this task's id
    (see ``idempotency``). Kept, and forgotten, with the task."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """The W3C trace context it was submitted in (``broker.tracing``; empty when
    nobody traces): every attempt's publish joins that trace, a retry too."""


@dataclass
class AgentCapability:
    agent_id: str
    capabilities: list[str]
    performance_score: float = 1.0
    current_load: int = 0
    max_concurrent_tasks: int = 5
    specialization_score: dict[str, float] = field(default_factory=dict)

    # Beyond the seed
    task_types: list[str] | None = None
    """The task types it has handlers for, as it announced them ('*': any type);
    None until it announced itself (registered by API only): it is sent no work."""
    last_seen: float | None = None
    """Time of the agent's last heartbeat or announcement; None if never heard from."""
    running: set[str] = field(default_factory=set)
    """Ids of the tasks this agent is running now (``current_load`` is its size)."""

    @property
    def utilization(self) -> float:
        return self.current_load / self.max_concurrent_tasks if self.max_concurrent_tasks else 0.0
