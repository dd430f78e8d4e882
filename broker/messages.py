"""Every message that crosses the bus, as versioned JSON from pydantic models.

The orchestrator and the agents share nothing but these models. Each carries
``v`` (the schema version) and ``kind`` (the discriminator, also the routing
key of events), so a consumer can reject what it does not understand instead
of guessing. Task outcomes are plain strings here: ``broker`` knows nothing of
the orchestrator's enums.

The requests of other services and their replies build on ``WireMessage``
in ``broker.rpc``. ``docs/schemas/`` and ``docs/asyncapi.json`` are generated
from these models (``broker.schemas``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .errors import InvalidMessage

SCHEMA_VERSION = 1

Outcome = Literal["completed", "failed", "timeout", "cancelled"]

Priority = Literal["low", "medium", "high", "critical"]
"""The orchestrator's TaskPriority values, lowest first (a test keeps them in step)."""
PRIORITIES: tuple[str, ...] = get_args(Priority)

HELD_IN_HEARTBEAT = 1_000
"""The most attempts a heartbeat lists (``AgentHeartbeat.holding``): it stays a
small message whatever an agent's concurrency; one with more lists the oldest."""


def _kind_is_required(schema: dict[str, Any]) -> None:
    """In the JSON Schema: ``kind`` has a default in Python, but parsers need it."""
    if "kind" in schema.get("properties", {}):
        required = schema.setdefault("required", [])
        if "kind" not in required:
            required.insert(0, "kind")


class WireMessage(BaseModel):
    """Base of every wire message: frozen, strict about unknown versions."""

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=_kind_is_required)

    v: Literal[1] = SCHEMA_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


# --- work -------------------------------------------------------------------


class TaskMessage(WireMessage):
    """A task as published to a capability queue, one per attempt."""

    kind: Literal["task"] = "task"
    task_id: str
    attempt: int = Field(ge=1, description="1 for the first publish, +1 per re-publish")
    name: str
    task_type: str
    payload: dict[str, Any]
    priority: str
    required_capabilities: list[str] = []
    timeout: float = Field(gt=0)
    estimated_duration: float = Field(gt=0)
    dependency_results: dict[str, Any] = Field(
        default_factory=dict, description="results of the tasks this one depends on"
    )
    avoid_agents: list[str] = Field(
        default_factory=list,
        description="agents that should let another take this attempt if one can",
    )


# --- events (agents -> topic exchange) --------------------------------------


class TaskAssigned(WireMessage):
    """An agent holds an attempt it has not started.

    Sent only when the attempt cannot start at once (every slot is taken), or
    with ``confirm`` for a redelivered message: the attempt may have ended
    while the message was lost and found again (a broker crash brings back
    messages already acknowledged), so the agent waits for the orchestrator's
    ``ProceedTask`` (or ``CancelTask``) before it runs the handler. First
    deliveries never wait for a word.
    """

    kind: Literal["task.assigned"] = "task.assigned"
    task_id: str
    attempt: int
    agent_id: str
    confirm: bool = False
    at: float = Field(default_factory=time.time)


class TaskStarted(WireMessage):
    kind: Literal["task.started"] = "task.started"
    task_id: str
    attempt: int
    agent_id: str
    at: float = Field(default_factory=time.time)


class TaskProgress(WireMessage):
    kind: Literal["task.progress"] = "task.progress"
    task_id: str
    attempt: int
    agent_id: str
    progress: float = Field(ge=0.0, le=1.0)


class TaskFinished(WireMessage):
    """The final event of one attempt: its outcome with the result or the error.

    ``started_at`` is when its handler started. An attempt that ends within a
    short delay of its start sends no ``TaskStarted`` (``agents.Agent``'s
    ``report_started_after``): this event says both. Agents before it leave it
    None, and their ``TaskStarted`` says when."""

    kind: Literal["task.finished"] = "task.finished"
    task_id: str
    attempt: int
    agent_id: str
    outcome: Outcome
    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = Field(
        default=None, description="the handler's traceback when it raised (its last lines)"
    )
    started_at: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="when the handler started (its TaskStarted may not have been sent)",
    )
    at: float = Field(default_factory=time.time)


class AgentAnnounced(WireMessage):
    kind: Literal["agent.announce"] = "agent.announce"
    agent_id: str
    capabilities: list[str]
    max_concurrent_tasks: int = Field(ge=1)
    task_types: list[str] = []
    specialization_score: dict[str, float] = {}
    at: float = Field(default_factory=time.time)


class AgentHeartbeat(WireMessage):
    kind: Literal["agent.heartbeat"] = "agent.heartbeat"
    agent_id: str
    running: int = Field(ge=0, description="tasks the agent is running now")
    holding: list[tuple[str, int]] = Field(
        default=[],
        max_length=HELD_IN_HEARTBEAT,
        description="the attempts (task id, attempt) whose handlers run there: the"
        " orchestrator cancels again any that ended or were superseded, so a lost"
        " cancel is repaired within a heartbeat",
    )
    at: float = Field(default_factory=time.time)


class AgentLeft(WireMessage):
    kind: Literal["agent.goodbye"] = "agent.goodbye"
    agent_id: str
    unfinished: list[str] = Field(
        default=[],
        description="tasks it acknowledged early (long tasks) and stopped before the end:"
        " no queue holds them, so the orchestrator publishes them again",
    )


class TasksReported(WireMessage):
    """The answer to a ``SyncReports``: every attempt this agent holds has told
    its start, and every one that ended here has its final event out (each
    confirmed before this was sent, on the same channel, so the orchestrator
    reads them first). A redelivered copy of an attempt nobody is known to hold
    may then run at once, instead of after ``unseen_holder_grace``."""

    kind: Literal["task.reported"] = "task.reported"
    agent_id: str
    round: int = Field(ge=1)


Event = Annotated[
    TaskAssigned
    | TaskStarted
    | TaskProgress
    | TaskFinished
    | TasksReported
    | AgentAnnounced
    | AgentHeartbeat
    | AgentLeft,
    Field(discriminator="kind"),
]


# --- control (orchestrator -> one agent, or all agents) ---------------------


MAX_CONSUMER_PRIORITY = 100
"""The highest consumer priority (``x-priority``) a ``ConsumeQueues`` may carry:
RabbitMQ takes any integer, but a few levels say all a placement policy can
mean, and a bound keeps a forged command from outranking every honest number."""

ConsumerPriority = Annotated[int, Field(ge=0, le=MAX_CONSUMER_PRIORITY)]


class ConsumeQueues(WireMessage):
    """Tells an agent which capability queues to consume, and how eagerly on each.

    The broker compares the priorities of one queue's consumers only, so a
    priority is per queue (``priorities``). ``consumer_priority`` is the one
    for a queue without one there: it is all an agent older than
    ``priorities`` reads (extra fields are ignored), and all an orchestrator
    older than them sends, so either side may be upgraded first.
    """

    kind: Literal["control.consume"] = "control.consume"
    queue_keys: list[str]
    consumer_priority: ConsumerPriority = Field(
        default=0, description="the x-priority of every queue without one in priorities"
    )
    priorities: dict[str, ConsumerPriority] = Field(
        default={},
        description="the x-priority per queue key, each one of queue_keys (the broker prefers,"
        " among one queue's consumers with a free slot, the highest)",
    )
    max_concurrent_tasks: int | None = Field(
        default=None,
        ge=1,
        description="the agent's limit (its prefetch) as registered; None keeps its own",
    )
    heartbeat_interval: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="beat at least this often (a third of the orchestrator's heartbeat"
        " timeout): an agent configured to beat less often than the orchestrator expects"
        " would be removed as silent; None keeps its own",
    )
    digests: dict[str, list[str]] = Field(
        default={},
        description="for each of queue_keys whose capability key is a digest (a long set),"
        " the capabilities it stands for: the agent checks them against the digest and"
        " its own, as it reads a plain key",
    )

    @model_validator(mode="after")
    def _priorities_are_of_its_queues(self) -> ConsumeQueues:
        if stray := set(self.priorities) - set(self.queue_keys):
            raise ValueError(f"priorities of queues not in queue_keys: {sorted(stray)[:5]}")
        if stray := set(self.digests) - set(self.queue_keys):
            raise ValueError(f"digests of queues not in queue_keys: {sorted(stray)[:5]}")
        return self

    def priority_of(self, queue_key: str) -> int:
        """The x-priority to consume ``queue_key`` with."""
        return self.priorities.get(queue_key, self.consumer_priority)


class ProceedTask(WireMessage):
    """The answer to a ``TaskAssigned`` with ``confirm``: that attempt is still
    the task's live one, run it. (Otherwise the answer is a ``CancelTask``.)"""

    kind: Literal["control.proceed"] = "control.proceed"
    task_id: str
    attempt: int


class CancelTask(WireMessage):
    """Cancel a task: skip it if it arrives, stop its handler if it runs.

    ``attempt`` None cancels every attempt (the task itself was cancelled);
    a number cancels only that superseded attempt.
    """

    kind: Literal["control.cancel"] = "control.cancel"
    task_id: str
    attempt: int | None = None


class CancelTasks(WireMessage):
    """Cancel several tasks at once: each id is handled as a ``CancelTask`` with
    this ``attempt`` (None: every attempt). The orchestrator tells a new agent
    this way which queued tasks were cancelled, a chunk of ids per message."""

    kind: Literal["control.cancel_many"] = "control.cancel_many"
    task_ids: list[str] = Field(min_length=1)
    attempt: int | None = None


class Unregister(WireMessage):
    """The orchestrator removed the agent: it drops its deliveries and stops."""

    kind: Literal["control.unregister"] = "control.unregister"
    agent_id: str


class Reannounce(WireMessage):
    """The orchestrator does not know the agent (it restarted): announce again."""

    kind: Literal["control.reannounce"] = "control.reannounce"


class SyncReports(WireMessage):
    """To every agent: answer with ``TasksReported`` once what you ran is told.

    Sent when a redelivered copy asks to run an attempt nobody is known to
    hold (after a broker node's restart every message of its queues comes
    back marked redelivered): an agent that ran it quickly, telling no start,
    may still have its final event on the way, and the copy must not run
    beside it. Once every registered agent answered, none has; one that does
    not answer (its link is down) is waited for ``unseen_holder_grace``."""

    kind: Literal["control.sync"] = "control.sync"
    round: int = Field(ge=1)


Control = Annotated[
    ConsumeQueues | ProceedTask | CancelTask | CancelTasks | Unregister | Reannounce | SyncReports,
    Field(discriminator="kind"),
]


_task_adapter: TypeAdapter[TaskMessage] = TypeAdapter(TaskMessage)
_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)
_control_adapter: TypeAdapter[Control] = TypeAdapter(Control)


def parse_with(adapter: TypeAdapter[Any], body: bytes, what: str = "message") -> Any:
    """``body`` as ``adapter``'s type; ``InvalidMessage`` names the first bad field."""
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        if what == "request" and len(loc) > 1:
            loc = loc[1:]  # the kind the union tried; the kind is in the body
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["kind"]
        where = ".".join(str(p) for p in loc) or "body"
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidMessage(f"invalid {what}: {where}: {reason}") from None


def parse_task(body: bytes) -> TaskMessage:
    return parse_with(_task_adapter, body)


def parse_event(body: bytes) -> Event:
    return parse_with(_event_adapter, body)


def parse_control(body: bytes) -> Control:
    return parse_with(_control_adapter, body)


_MOVED_TO_RPC = frozenset(
    {
        "SubmitTaskRequest",
        "CancelTaskRequest",
        "TaskStatusRequest",
        "StatsRequest",
        "AgentsRequest",
        "QueuesRequest",
        "Request",
        "REQUEST_TYPES",
        "ErrorType",
        "ReplyError",
        "Reply",
        "TaskState",
        "ReplyResult",
        "SubmitResult",
        "TaskStatusResult",
        "CancelResult",
        "StatsResult",
        "AgentRecord",
        "QueueRecord",
        "ResultType",
        "RESULT_TYPES",
        "parse_result",
        "parse_request",
        "parse_reply",
    }
)


def __getattr__(name: str) -> Any:
    # The request protocol moved to broker.rpc; older imports from here keep working.
    # Imported on first use, since broker.rpc builds on this module.
    if name in _MOVED_TO_RPC:
        from . import rpc

        return getattr(rpc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
