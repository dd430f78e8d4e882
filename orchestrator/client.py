"""``Client``: submit and follow tasks from another service, over the request protocol.

A service that submits tasks should not have to build a bus, hand-write
request messages and poll for a result. ``Client`` speaks the documented AMQP
protocol (``broker.rpc``: requests on ``<prefix>.rpc``, answered by ``serve``'s
``OrchestratorService``) and nothing else, so it needs only a client's
permissions: it declares no shared topology (its bus runs with
``declare_topology=False``); the one queue it declares is its own, a monitor
queue bound to the events exchange, which lives as long as the client.

    async with Client("amqp://guest:guest@localhost/", prefix="orchestrator") as client:
        handle = await client.submit("report", "", "report", {"day": "monday"})
        final = await handle.result(timeout=60)  # the status once the task has ended

``TaskHandle.result`` waits on the ``task.finished`` events of its task rather
than polling: the client subscribes before it submits, checks the status once
after subscribing (the task may have ended before), and asks again when an
event of its task arrives. The status is the orchestrator's word (a failed
attempt may be retried), so the event is only the cue to ask. An end no agent
reports (a dependency failed, a run deadline the orchestrator enforced, events
missed while the link was down) is caught by a slow re-check
(``resync_interval``).

Errors are the seed's: a bad field is a ``ValueError`` naming it, an unknown
task a ``KeyError``, an orchestrator that cannot reach its broker or store, or
a broker that cannot be reached, a ``ConnectionError``, and no reply in time a
``TimeoutError`` (``broker.NoReply``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from broker import (
    DEFAULT_REQUEST_TIMEOUT,
    AgentsRequest,
    BusSettings,
    CancelTaskRequest,
    CommunicationBus,
    Event,
    RabbitMQBus,
    Reply,
    StatsRequest,
    SubmitTaskRequest,
    Subscription,
    TaskFinished,
    TaskStatusRequest,
    TopologyMissing,
    WireMessage,
)
from broker.rpc import TasksRequest

from .models import TaskStatus
from .submit_arguments import SubmitArguments, takes_submit_arguments_and_extra

__all__ = [
    "Client",
    "TaskHandle",
    "ClientError",
    "InvalidRequest",
    "TaskNotFound",
    "OrchestratorUnavailable",
    "OrchestratorError",
    "FINISH_EVENTS",
]

log = logging.getLogger(__name__)

FINISH_EVENTS = ("task.finished",)
"""The events after which a waiting handle asks for its task's status."""
RESYNC_SECONDS = 10.0
"""How often a waiting handle asks anyway, for ends that no event announces."""
SETTLE_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""After its task's event, how long a handle waits before each further ask
while the status has not moved: the orchestrator reads the event from its own
queue, and may not have handled it yet when the client asks."""
SETTLE_PATIENCE = 30.0
"""Seconds after its task's event a handle goes on asking every last settle
delay (an orchestrator behind on its events, a loaded machine) before it
falls back to ``resync_interval``: the event said the task ended, so its
status moves soon, and a wait must not sleep a resync through it."""
POLL_SECONDS = 0.5
"""How often a handle asks when the broker refused the client its events queue."""

FINAL = frozenset(s.value for s in TaskStatus if s.is_final)


# --- errors, from the replies' error types ----------------------------------------------


class ClientError(Exception):
    """Base of the errors an orchestrator's error reply becomes."""


class InvalidRequest(ClientError, ValueError):
    """The orchestrator refused a field (named first in the message)."""


class TaskNotFound(ClientError, KeyError):
    """No task of this id: never submitted, or past its retention."""

    def __str__(self) -> str:  # KeyError's own quotes the message
        return str(self.args[0]) if self.args else ""


class OrchestratorUnavailable(ClientError, ConnectionError):
    """The orchestrator cannot reach its broker or store just now; try again."""


class OrchestratorError(ClientError, RuntimeError):
    """The orchestrator failed on the request (a bug: see its log)."""


_ERRORS: dict[str, type[ClientError]] = {
    "invalid_request": InvalidRequest,
    "not_found": TaskNotFound,
    "unavailable": OrchestratorUnavailable,
}


def result_of(reply: Reply) -> Any:
    """A reply's result, or its error as the exception of its type."""
    if reply.ok:
        return reply.result
    assert reply.error is not None
    raise _ERRORS.get(reply.error.type, OrchestratorError)(reply.error.message)


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "request"
    return InvalidRequest(f"{field}: {str(first['msg']).removeprefix('Value error, ')}")


# --- one task ----------------------------------------------------------------------------


class TaskHandle:
    """A submitted task: its id, and what can be asked or done about it."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.task_id = task_id

    async def status(self) -> dict[str, Any]:
        """What ``get_task_status`` returns; ``KeyError`` if the orchestrator forgot it."""
        return await self.client.status(self.task_id)

    async def cancel(self) -> bool:
        """Cancel it; False when it had already ended."""
        return await self.client.cancel(self.task_id)

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until it has ended; its status then (``status`` says how it ended,
        ``result`` holds the handler's result). ``TimeoutError`` after ``timeout``
        seconds; the task goes on."""
        return await self.client.wait(self.task_id, timeout)

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"


# --- the client ----------------------------------------------------------------------------


class Client:
    """A connection to the orchestrator serving one prefix, for another service.

    ``broker_url`` and ``prefix`` default to ``ORCHESTRATOR_BROKER_URL`` and
    ``ORCHESTRATOR_PREFIX`` (then the local broker and ``orchestrator``);
    ``settings`` gives every bus setting at once. ``bus`` uses a bus of the
    caller's (an in-process ``MemoryBus`` beside an orchestrator), which the
    client connects if it is not, and never closes.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        prefix: str | None = None,
        settings: BusSettings | None = None,
        bus: CommunicationBus | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        resync_interval: float = RESYNC_SECONDS,
        connection_name: str | None = None,
    ) -> None:
        if bus is None:
            overrides = {
                k: v for k, v in (("broker_url", broker_url), ("prefix", prefix)) if v is not None
            }
            if settings is None:
                settings = BusSettings(**overrides)
            elif overrides:
                settings = settings.model_copy(update=overrides)
            bus = RabbitMQBus(
                settings=settings,
                connection_name=connection_name or f"{settings.prefix}:client",
                declare_topology=False,
            )
            self._owns_bus = True
        else:
            self._owns_bus = False
        self.bus = bus
        self.request_timeout = request_timeout
        self.resync_interval = resync_interval
        self._events: Subscription | None = None
        self._events_refused = False
        self._subscribing = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        """The handles waiting on a task, by task id: set when an event of it arrives."""

    @classmethod
    async def connect(cls, broker_url: str | None = None, **options: Any) -> Client:
        """A connected client (the same arguments as ``Client``)."""
        client = cls(broker_url, **options)
        await client.start()
        return client

    async def start(self) -> None:
        """Connect; ``ConnectionError`` names the broker when it cannot be reached."""
        if not self.bus.is_connected:
            await self.bus.connect()

    async def close(self) -> None:
        """Stop following events and close the connection (if it is the client's own)."""
        events, self._events = self._events, None
        if events is not None:
            await events.close()
        for waiting in self._waiters.values():
            for woken in waiting:
                woken.set()
        if self._owns_bus:
            await self.bus.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # requests ------------------------------------------------------------------------------
    async def request(self, message: WireMessage) -> Any:
        """The result of one request; its error reply as the exception of its type."""
        return result_of(await self.bus.request(message, timeout=self.request_timeout))

    @takes_submit_arguments_and_extra
    async def submit(self, arguments: SubmitArguments, extra: dict[str, Any]) -> TaskHandle:
        """Submit a task (the parameters of ``TaskOrchestrator.submit_task``); its handle.

        ``idempotency_key``: a submit repeating the key of one the orchestrator
        kept gets that task's id instead of a second task, so a submit retried
        after a lost reply is safe. ``extra`` passes fields a newer protocol
        adds to ``SubmitTaskRequest``; one it does not have is a ``ValueError``.
        """
        fields = arguments.fields()
        if fields["idempotency_key"] is None:
            del fields["idempotency_key"]  # the request's message id stands in
        unknown = set(extra) - set(SubmitTaskRequest.model_fields)
        if unknown:
            raise InvalidRequest(f"{sorted(unknown)[0]}: not a field of a submit")
        try:
            request = SubmitTaskRequest(**fields, **extra)
        except ValidationError as exc:
            raise _invalid(exc) from None
        await self._follow_events()  # before the task exists: no event of it is missed
        return self.handle((await self.request(request))["task_id"])

    def handle(self, task_id: str) -> TaskHandle:
        """The handle of a task submitted before (by anyone)."""
        return TaskHandle(self, task_id)

    async def status(self, task_id: str) -> dict[str, Any]:
        """What ``get_task_status`` returns; ``KeyError`` for an unknown id."""
        return await self.request(TaskStatusRequest(task_id=task_id))

    async def get_task_status(self, task_id: str) -> dict[str, Any] | None:
        """As the seed's ``get_task_status``: None for an unknown id."""
        try:
            return await self.status(task_id)
        except TaskNotFound:
            return None

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task; False when it had already ended, ``KeyError`` if unknown."""
        return bool((await self.request(CancelTaskRequest(task_id=task_id)))["cancelled"])

    async def stats(self) -> dict[str, Any]:
        """What ``get_stats`` returns."""
        return await self.request(StatsRequest())

    async def agents(self) -> list[dict[str, Any]]:
        """The registered agents (``broker.rpc.AgentRecord`` each)."""
        return await self.request(AgentsRequest())

    async def tasks(
        self,
        status: str | TaskStatus | Iterable[str | TaskStatus] | None = None,
        task_type: str | None = None,
        agent_id: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The tasks the orchestrator holds, most recently created first
        (``broker.rpc.TaskSummary`` each): at most ``limit``, in one of the
        statuses given, of ``task_type``, held or run by ``agent_id``."""
        if status is None:
            statuses: list[Any] = []
        elif isinstance(status, str | TaskStatus):
            statuses = [status]
        else:
            statuses = list(status)
        try:
            request = TasksRequest(
                status=[getattr(s, "value", s) for s in statuses],
                task_type=task_type,
                agent_id=agent_id,
                limit=limit,
            )
        except ValidationError as exc:
            raise _invalid(exc) from None
        return await self.request(request)

    # waiting ------------------------------------------------------------------------------
    @property
    def follows_events(self) -> bool:
        """Whether waits are woken by their task's events: False before the first
        submit or wait, and when the broker refused the client a queue of its
        own on the events exchange (waits then ask every ``POLL_SECONDS``)."""
        return self._events is not None

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Until the task has ended: its status (see ``TaskHandle.result``)."""
        await self._follow_events()
        woken = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(woken)
        try:
            async with asyncio.timeout(timeout):
                return await self._until_final(task_id, woken)
        finally:
            waiting = self._waiters.get(task_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[task_id]

    async def _until_final(self, task_id: str, woken: asyncio.Event) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        settle: list[float] = []
        event_at: float | None = None
        while True:
            woken.clear()  # before asking: an event while the answer travels is kept
            status = await self.status(task_id)
            if status["status"] in FINAL:
                return status
            if self._events_refused:
                pause = POLL_SECONDS
            elif settle:
                pause = settle.pop(0)
            elif event_at is not None and loop.time() - event_at < SETTLE_PATIENCE:
                pause = min(SETTLE_DELAYS[-1], self.resync_interval)
            else:
                pause = self.resync_interval
            try:
                async with asyncio.timeout(pause):
                    await woken.wait()
            except TimeoutError:
                continue
            if self._events is None and not self._events_refused:
                raise ConnectionError("the client was closed while waiting")
            settle = list(SETTLE_DELAYS)  # its event came: the status follows shortly
            event_at = loop.time()

    async def _follow_events(self) -> None:
        """Subscribe, once, to the events after which a waiting handle asks again."""
        if self._events is not None or self._events_refused:
            return
        async with self._subscribing:
            if self._events is not None or self._events_refused:
                return
            try:
                self._events = await self.bus.subscribe_events(
                    self._on_event, patterns=FINISH_EVENTS
                )
            except TopologyMissing as exc:
                raise OrchestratorUnavailable(
                    f"{exc}: no orchestrator has served prefix {self.bus.settings.prefix!r}"
                ) from None
            except ConnectionError:
                raise
            except Exception as exc:  # a client without a monitor's permissions
                log.warning("cannot follow task events (%s): waiting by asking", exc)
                self._events_refused = True

    async def _on_event(self, event: Event) -> None:
        # Never raises: a failing handler would dead-letter the event.
        if isinstance(event, TaskFinished):
            for woken in self._waiters.get(event.task_id, ()):
                woken.set()
