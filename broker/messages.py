"""Every message that crosses the bus, as versioned JSON from pydantic models.

The orchestrator and the agents share nothing but these models. Each carries
``v`` (the schema version) and ``kind`` (the discriminator, also the routing
key of events), so a consumer can reject what it does not understand instead
of guessing. Task outcomes are plain strings here: ``broker`` knows nothing of
the orchestrator's enums.

Other services talk to the orchestrator with the request models at the end
(AMQP request/reply on ``<prefix>.rpc``, see ``broker.topology``); every
request is answered by one ``Reply``. ``docs/schemas/`` and
``docs/asyncapi.json`` are generated from these models (``broker.schemas``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidMessage

SCHEMA_VERSION = 1

Outcome = Literal["completed", "failed", "timeout", "cancelled"]

Priority = Literal["low", "medium", "high", "critical"]
"""The orchestrator's TaskPriority values, lowest first (a test keeps them in step)."""
PRIORITIES: tuple[str, ...] = get_args(Priority)


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
    """The final event of one attempt: its outcome with the result or the error."""

    kind: Literal["task.finished"] = "task.finished"
    task_id: str
    attempt: int
    agent_id: str
    outcome: Outcome
    result: dict[str, Any] | None = None
    error: str | None = None
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
    at: float = Field(default_factory=time.time)


class AgentLeft(WireMessage):
    kind: Literal["agent.goodbye"] = "agent.goodbye"
    agent_id: str
    unfinished: list[str] = Field(
        default=[],
        description="tasks it acknowledged early (long tasks) and stopped before the end:"
        " no queue holds them, so the orchestrator publishes them again",
    )


Event = Annotated[
    TaskStarted | TaskProgress | TaskFinished | AgentAnnounced | AgentHeartbeat | AgentLeft,
    Field(discriminator="kind"),
]


# --- control (orchestrator -> one agent, or all agents) ---------------------


class ConsumeQueues(WireMessage):
    """Tells an agent which capability queues to consume, and how eagerly."""

    kind: Literal["control.consume"] = "control.consume"
    queue_keys: list[str]
    consumer_priority: int = 0


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


Control = Annotated[
    ConsumeQueues | CancelTask | CancelTasks | Unregister | Reannounce,
    Field(discriminator="kind"),
]


# --- requests from other services (-> <prefix>.rpc) and their replies -----------


class SubmitTaskRequest(WireMessage):
    """Submit a task: the arguments of ``TaskOrchestrator.submit_task``.

    Replied with ``result`` = ``{"task_id": "..."}``.
    """

    kind: Literal["request.submit"] = "request.submit"
    name: str
    description: str = ""
    task_type: str
    payload: dict[str, Any]
    priority: Priority = Field(
        default="medium", description="low, medium, high or critical (any case is accepted)"
    )
    dependencies: list[str] = Field(
        default_factory=list, description="ids of tasks that must complete first"
    )
    required_capabilities: list[str] = Field(
        default_factory=list, description="an agent must have all of them to run the task"
    )
    estimated_duration: float = Field(default=300, description="seconds")
    timeout: float = Field(default=600, description="seconds one attempt may run")
    max_retries: int = 3

    @field_validator("priority", mode="before")
    @classmethod
    def _known_priority(cls, value: Any) -> Any:
        name = getattr(value, "value", value)  # TaskPriority.HIGH as well as "HIGH"
        if isinstance(name, str) and name.lower() in PRIORITIES:
            return name.lower()
        raise ValueError(f"must be one of {', '.join(PRIORITIES)}, got {value!r}")


class CancelTaskRequest(WireMessage):
    """Cancel a task that has not ended.

    Replied with ``result`` = ``{"task_id", "cancelled", "status"}``:
    ``cancelled`` is false when the task had already ended (``status`` says how).
    An unknown id is an error of type ``not_found``.
    """

    kind: Literal["request.cancel"] = "request.cancel"
    task_id: str


class TaskStatusRequest(WireMessage):
    """A task's status: ``result`` is exactly what ``get_task_status`` returns.

    An unknown id is an error of type ``not_found``.
    """

    kind: Literal["request.status"] = "request.status"
    task_id: str


class StatsRequest(WireMessage):
    """Statistics: ``result`` is exactly what ``get_stats`` returns."""

    kind: Literal["request.stats"] = "request.stats"


class AgentsRequest(WireMessage):
    """The registered agents: ``result`` is a list of objects with ``agent_id``,
    ``capabilities``, ``max_concurrent_tasks``, ``current_load``, ``utilization``,
    ``performance_score``, ``specialization_score``, ``running`` and ``last_seen``."""

    kind: Literal["request.agents"] = "request.agents"


class QueuesRequest(WireMessage):
    """The capability queues: ``result`` is a list of objects with ``key``,
    ``queue``, ``capabilities`` and ``depth`` (tasks waiting, not counting
    those an agent holds)."""

    kind: Literal["request.queues"] = "request.queues"


Request = Annotated[
    SubmitTaskRequest
    | CancelTaskRequest
    | TaskStatusRequest
    | StatsRequest
    | AgentsRequest
    | QueuesRequest,
    Field(discriminator="kind"),
]

REQUEST_TYPES: tuple[type[WireMessage], ...] = (
    SubmitTaskRequest,
    CancelTaskRequest,
    TaskStatusRequest,
    StatsRequest,
    AgentsRequest,
    QueuesRequest,
)

ErrorType = str
"""``invalid_request`` (a bad field, named in the message; or a body that is
not a request), ``not_found`` (no such task), ``unavailable`` (the orchestrator
cannot reach its broker or store), ``internal`` (a bug: see the server's log).
A plain string, so that an older client can read a newer server's types."""


class ReplyError(BaseModel):
    """Why a request failed."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: ErrorType = Field(description="invalid_request, not_found, unavailable or internal")
    message: str = Field(description="one line; a bad field's name comes first")


class Reply(WireMessage):
    """The answer to one request, sent to its ``reply_to`` with its ``correlation_id``."""

    kind: Literal["reply"] = "reply"
    ok: bool
    result: Any = Field(
        default=None,
        description="what the request asked for, when ok: SubmitResult, CancelResult,"
        " TaskStatusResult, StatsResult, a list of AgentRecord or of QueueRecord",
    )
    error: ReplyError | None = Field(default=None, description="why it failed, when not ok")

    @model_validator(mode="after")
    def _error_iff_failed(self) -> Reply:
        if self.ok == (self.error is not None):
            raise ValueError("a reply has an error exactly when it is not ok")
        return self

    @classmethod
    def success(cls, result: Any = None) -> Reply:
        return cls(ok=True, result=result)

    @classmethod
    def failure(cls, type: ErrorType, message: str) -> Reply:
        return cls(ok=False, error=ReplyError(type=type, message=message))


# --- what a successful reply's ``result`` holds, by request ---------------------------

TaskState = Literal["pending", "assigned", "running", "completed", "failed", "cancelled", "timeout"]
"""A task's status: the orchestrator's TaskStatus values (a test keeps them in step)."""


class ReplyResult(BaseModel):
    """Base of the reply results. A newer orchestrator may add keys: readers ignore them."""

    model_config = ConfigDict(frozen=True, extra="allow")


class SubmitResult(ReplyResult):
    """The result of ``request.submit``."""

    task_id: str = Field(description="the new task's id, for status and cancel")


class TaskStatusResult(ReplyResult):
    """The result of ``request.status``: what ``get_task_status`` returns."""

    task_id: str
    name: str
    status: TaskState
    assigned_agent: str | None = Field(description="the agent running or that ran it")
    created_at: float = Field(description="Unix time")
    started_at: float | None = Field(description="Unix time its current attempt started")
    priority: Priority
    progress: float = Field(ge=0.0, le=1.0)
    result: dict[str, Any] | None = Field(description="the handler's result, once completed")
    error_message: str | None = Field(description="why it failed, timed out or was cancelled")
    retry_count: int = Field(ge=0, description="attempts after the first so far")


class CancelResult(ReplyResult):
    """The result of ``request.cancel``."""

    task_id: str
    cancelled: bool = Field(description="false when the task had already ended")
    status: TaskState = Field(description="the task's status after the request")


class StatsResult(ReplyResult):
    """The result of ``request.stats``: what ``get_stats`` returns."""

    tasks_created: int = Field(ge=0)
    tasks_completed: int = Field(ge=0)
    tasks_failed: int = Field(ge=0, description="failed, timed out or cancelled")
    avg_completion_time: float = Field(ge=0, description="seconds from start to completion")
    pending_tasks: int = Field(ge=0, description="waiting for dependencies or an agent")
    running_tasks: int = Field(ge=0)
    completed_tasks: int = Field(ge=0)
    registered_agents: int = Field(ge=0)
    agent_utilization: dict[str, float] = Field(description="current load / capacity, by agent")
    overall_utilization: float = Field(ge=0, description="all agents' load / capacity")


class AgentRecord(ReplyResult):
    """One agent in the result of ``request.agents``."""

    agent_id: str
    capabilities: list[str]
    max_concurrent_tasks: int = Field(ge=1)
    current_load: int = Field(ge=0)
    utilization: float = Field(ge=0)
    performance_score: float
    specialization_score: dict[str, float]
    running: list[str] = Field(description="ids of the tasks it runs now")
    last_seen: float | None = Field(description="Unix time of its last heartbeat")


class QueueRecord(ReplyResult):
    """One capability queue in the result of ``request.queues``."""

    key: str = Field(description="capability key: sorted capabilities joined by '+'; '@any'")
    queue: str = Field(description="the queue's name on the broker")
    capabilities: list[str]
    depth: int = Field(ge=0, description="tasks waiting, not counting those an agent holds")


@dataclass(frozen=True)
class ResultType:
    """What ``Reply.result`` holds when a request of one kind succeeds."""

    model: type[ReplyResult]
    """The result's model; the model of its items when it is a list."""
    list_name: str | None = None
    """The schema name of the list, when the result is a list of ``model``."""

    @property
    def schema_name(self) -> str:
        """The name of the result's schema in ``docs/``."""
        return self.list_name or self.model.__name__

    @property
    def annotation(self) -> Any:
        """The result's type, for pydantic: the model, or a list of it."""
        return self.model if self.list_name is None else list[self.model]


RESULT_TYPES: dict[str, ResultType] = {
    "request.submit": ResultType(SubmitResult),
    "request.cancel": ResultType(CancelResult),
    "request.status": ResultType(TaskStatusResult),
    "request.stats": ResultType(StatsResult),
    "request.agents": ResultType(AgentRecord, list_name="AgentsResult"),
    "request.queues": ResultType(QueueRecord, list_name="QueuesResult"),
}
"""The result of a successful reply, by request kind: the one table that the
parser (``parse_result``) and the documents (``broker.schemas``) read."""

_result_adapters = {kind: TypeAdapter(result.annotation) for kind, result in RESULT_TYPES.items()}


def parse_result(request_kind: str, result: Any) -> Any:
    """A successful reply's ``result`` as its model (a list of them for agents and
    queues); ``InvalidMessage`` names what does not fit."""
    try:
        return _result_adapters[request_kind].validate_python(result)
    except KeyError:
        raise InvalidMessage(f"no result type for {request_kind!r}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        raise InvalidMessage(f"invalid result of {request_kind}: {where}: {first['msg']}") from None


_task_adapter: TypeAdapter[TaskMessage] = TypeAdapter(TaskMessage)
_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)
_control_adapter: TypeAdapter[Control] = TypeAdapter(Control)
_request_adapter: TypeAdapter[Request] = TypeAdapter(Request)
_reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)


def _parse(adapter: TypeAdapter[Any], body: bytes, what: str = "message") -> Any:
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
    return _parse(_task_adapter, body)


def parse_event(body: bytes) -> Event:
    return _parse(_event_adapter, body)


def parse_control(body: bytes) -> Control:
    return _parse(_control_adapter, body)


def parse_request(body: bytes) -> Request:
    """A request of another service; ``InvalidMessage`` names the bad field."""
    return _parse(_request_adapter, body, "request")


def parse_reply(body: bytes) -> Reply:
    return _parse(_reply_adapter, body, "reply")
