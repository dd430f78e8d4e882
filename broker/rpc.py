"""The orchestrator's protocol for other services: requests, replies and their results.

Other services (and the command line) talk to a running orchestrator by AMQP
request/reply on ``<prefix>.rpc`` (see ``broker.topology``): each request is
one of the models here, and is answered by one ``Reply`` whose ``result``,
when it succeeds, is the ``ResultType`` of its kind. These are wire messages
like those of ``broker.messages``, versioned the same way; ``docs/schemas/``
and ``docs/asyncapi.json`` are generated from both (``broker.schemas``).
``answer`` is how a bus turns one request body into its reply, whichever bus.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

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
from .messages import PRIORITIES, Priority, WireMessage, parse_with

log = logging.getLogger(__name__)

TaskState = Literal["pending", "assigned", "running", "completed", "failed", "cancelled", "timeout"]
"""A task's status: the orchestrator's TaskStatus values (a test keeps them in step)."""

# --- requests (-> <prefix>.rpc) --------------------------------------------------


class SubmitTaskRequest(WireMessage):
    """Submit a task: the arguments of ``TaskOrchestrator.submit_task``.

    Replied with ``result`` = ``{"task_id": "..."}``. While the task first
    submitted with an ``idempotency_key`` is kept, a request repeating the key
    is answered with that task's id and creates nothing; the key defaults to
    the request's AMQP ``message_id``.
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
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="a repeat of the key returns the first task's id (with other parameters:"
        " invalid_request); default: the request's AMQP message_id",
    )

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


MAX_TASKS_LISTED = 1000
"""The most tasks one ``request.tasks`` lists."""


class TasksRequest(WireMessage):
    """The tasks the orchestrator holds, most recently created first.

    ``result`` is a list of ``TaskSummary``: at most ``limit``, of those that
    match every filter given (a filter left out matches every task). Tasks
    past their retention (``finished_task_ttl``) are no longer listed.
    """

    kind: Literal["request.tasks"] = "request.tasks"
    status: list[TaskState] = Field(
        default_factory=list, description="only tasks in one of these statuses; any when empty"
    )
    task_type: str | None = Field(default=None, description="only tasks of this type")
    agent_id: str | None = Field(
        default=None, description="only tasks this agent holds or ran (assigned_agent)"
    )
    limit: int = Field(default=50, ge=1, le=MAX_TASKS_LISTED, description="the most to list")


Request = Annotated[
    SubmitTaskRequest
    | CancelTaskRequest
    | TaskStatusRequest
    | StatsRequest
    | AgentsRequest
    | QueuesRequest
    | TasksRequest,
    Field(discriminator="kind"),
]

REQUEST_TYPES: tuple[type[WireMessage], ...] = (
    SubmitTaskRequest,
    CancelTaskRequest,
    TaskStatusRequest,
    StatsRequest,
    AgentsRequest,
    QueuesRequest,
    TasksRequest,
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
        " TaskStatusResult, StatsResult, a list of AgentRecord, of QueueRecord or of"
        " TaskSummary",
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
    assigned_agent: str | None = Field(
        description="the agent that holds or ran it; none while pending"
    )
    created_at: float = Field(description="Unix time")
    started_at: float | None = Field(description="Unix time its current attempt started")
    completed_at: float | None = Field(default=None, description="Unix time it ended")
    priority: Priority
    progress: float = Field(ge=0.0, le=1.0)
    result: dict[str, Any] | None = Field(description="the handler's result, once completed")
    error_message: str | None = Field(description="why it failed, timed out or was cancelled")
    retry_count: int = Field(ge=0, description="attempts after the first so far")
    traceback: str | None = Field(
        default=None, description="the last failed attempt's traceback, as its agent sent it"
    )


class CancelResult(ReplyResult):
    """The result of ``request.cancel``."""

    task_id: str
    cancelled: bool = Field(description="false when the task had already ended")
    status: TaskState = Field(description="the task's status after the request")


class LeaderRecord(ReplyResult):
    """Who leads a prefix, in the result of ``request.stats``."""

    id: str | None = Field(description="the leader's orchestrator_id; None: not known")
    epoch: int | None = Field(description="its store epoch; None: not known")


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
    refused_messages: dict[str, int] = Field(
        default={},
        description="untrusted messages refused (and dropped), by reason: wrong_user,"
        " unknown_agent, not_holder...",
    )
    dead_letters: dict[str, int] = Field(
        default={},
        description="dead letters received since this orchestrator started, by what they"
        " were: task, event, control or other",
    )
    role: Literal["leader", "standby", "stopped"] | None = Field(
        default=None, description="this orchestrator's role in its prefix"
    )
    orchestrator_id: str | None = Field(
        default=None, description="this orchestrator's name in the lease and the store"
    )
    leader: LeaderRecord | None = Field(
        default=None, description="who leads the prefix, as far as this orchestrator knows"
    )


class AgentRecord(ReplyResult):
    """One agent in the result of ``request.agents``."""

    agent_id: str
    capabilities: list[str]
    max_concurrent_tasks: int = Field(ge=1)
    current_load: int = Field(ge=0)
    utilization: float = Field(ge=0)
    performance_score: float
    specialization_score: dict[str, float]
    task_types: list[str] | None = Field(
        default=None,
        description="the task types it announced handlers for ('*': any); none until it announced",
    )
    running: list[str] = Field(description="ids of the tasks it runs now")
    last_seen: float | None = Field(description="Unix time of its last heartbeat")


class QueueRecord(ReplyResult):
    """One capability queue in the result of ``request.queues``."""

    key: str = Field(
        description="<task type>.<capability key>: the capabilities sorted and joined by '+',"
        " '@any' for none"
    )
    queue: str = Field(description="the queue's name on the broker")
    task_type: str | None = Field(default=None, description="the task type its tasks are of")
    capabilities: list[str]
    depth: int = Field(ge=0, description="tasks waiting, not counting those an agent holds")


class TaskSummary(ReplyResult):
    """One task in the result of ``request.tasks``: what a list shows of it (its
    payload and result only through ``request.status``)."""

    task_id: str
    name: str
    task_type: str
    status: TaskState
    priority: Priority
    assigned_agent: str | None = Field(description="the agent that holds or ran it")
    created_at: float = Field(description="Unix time")
    started_at: float | None = Field(description="Unix time its current attempt started")
    completed_at: float | None = Field(description="Unix time it ended")
    retry_count: int = Field(ge=0)
    error_message: str | None = Field(description="why it failed, timed out or was cancelled")


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
    "request.tasks": ResultType(TaskSummary, list_name="TasksResult"),
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


_request_adapter: TypeAdapter[Request] = TypeAdapter(Request)
_reply_adapter: TypeAdapter[Reply] = TypeAdapter(Reply)


def parse_request(body: bytes) -> Request:
    """A request of another service; ``InvalidMessage`` names the bad field."""
    return parse_with(_request_adapter, body, "request")


def parse_reply(body: bytes) -> Reply:
    return parse_with(_reply_adapter, body, "reply")


RequestHandler = Callable[[Request], Awaitable[Reply]]


async def answer(handler: RequestHandler, body: bytes, message_id: str | None = None) -> Reply:
    """The reply to one request body: the handler's, or an error reply, so that
    neither a body that is not a request nor a failing handler stops a server.

    A submit without an ``idempotency_key`` takes the message's ``message_id``
    as its key, so that the same message delivered again (its first handler
    was killed before it acknowledged it) maps to the task it made."""
    try:
        request = parse_request(body)
    except InvalidMessage as exc:
        return Reply.failure("invalid_request", str(exc))
    if isinstance(request, SubmitTaskRequest) and request.idempotency_key is None and message_id:
        request = request.model_copy(update={"idempotency_key": message_id[:255]})
    try:
        return await handler(request)
    except Exception as exc:  # a handler bug must not stop the server
        log.exception("request handler failed on %s", request.kind)
        return Reply.failure("internal", f"{type(exc).__name__}: {exc}")
