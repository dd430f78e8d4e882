"""``Agent``: the runtime users build workers with.

An agent announces itself, consumes the capability queues the orchestrator
assigns it, and heartbeats. Each task runs its handler under the task's
timeout; the final event is published (and confirmed) before the task
message is acknowledged, so a crash at any point leaves the task to be run
again rather than lost. The broker never hands an agent more tasks than its
``max_concurrent_tasks`` (the channel's prefetch).

What a handler's run is and how it is stopped is ``agents.handlers``; the
attempts held here, and the cancelled ids remembered, ``agents.attempts``;
the one place a delivery is settled, ``agents.settle``; what a stop waits
for, and how long, ``agents.draining``. A task that passes its
timeout or is cancelled is reported at once, whether or not its handler obeys,
but its delivery is settled only when the handler has really ended: until
then it holds its slot of the prefetch, so the agent never runs more than
``max_concurrent_tasks`` handlers.

Through a lost link (the broker restarts, the connection drops) handlers go
on running: their final events go out once the link is back, and a copy of
their message that the broker gives back meanwhile is recognised as theirs
(``agents.tasks``). One agent id is one live process: a second one is
refused (``AgentIdInUse``).

Commands are obeyed (``agents.commands``) only from the orchestrator's broker user, and a
``ConsumeQueues`` only for queues this agent can run (``agents.trust``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from broker import (
    AGENT_ID_PATTERN,
    CAPABILITY_PATTERN,
    AgentLeft,
    BusError,
    CommunicationBus,
    Subscription,
    TaskConsumer,
    TaskDelivery,
    event_loop,
)
from broker.errors import QueueInUse

from . import presence
from .attempts import AgentCounters, Attempts, StopReason
from .commands import Commands
from .draining import Drain
from .handlers import ANY_TASK_TYPE, Handler, Handlers, Runners
from .publishing import publish_event
from .settle import Deliveries
from .tasks import Tasks
from .trust import ControlGate


class AgentIdInUse(ValueError):
    """Raised by ``Agent.start`` when another live agent process has this id on
    this prefix: two processes would share one record of the orchestrator's,
    each taking the other's commands."""


class Agent:
    """A worker with capabilities and handlers per task type.

    >>> agent = Agent("analysis_agent_1", ["technical_analysis"], max_concurrent_tasks=5)
    >>> @agent.handler("analysis")
    ... async def analyse(ctx):
    ...     return {"symbol": ctx.payload["symbol"]}
    """

    def __init__(
        self,
        agent_id: str,
        capabilities: list[str],
        max_concurrent_tasks: int = 5,
        *,
        heartbeat_interval: float = 5.0,
        drain_timeout: float = 30.0,
        long_task_after: float | None = 1500.0,
        report_started_after: float | None = 0.075,
        specialization: dict[str, float] | None = None,
    ) -> None:
        """``specialization``: a score in 0..1 per task type this agent is
        known to be good at, announced; the orchestrator offers a type's tasks
        to its specialists first (``orchestrator.placement``), and moves the
        scores with every outcome.

        ``long_task_after``: a task whose timeout is longer (seconds) is
        acknowledged once it has started, not when it ends. RabbitMQ closes a
        channel holding a delivery unacknowledged past its ``consumer_timeout``
        (30 min by default) and requeues all of it; for those tasks the
        orchestrator's heartbeat watch replaces the broker's redelivery. None
        never acknowledges early (for brokers configured for long tasks).

        ``report_started_after``: a task's start is reported this many seconds
        after it began, unless it has ended by then: its final event says when
        it started, and a quick task costs one event rather than two (see
        ``agents.started``). None (or 0) reports every start at once."""
        if not AGENT_ID_PATTERN.match(agent_id):
            raise ValueError(f"agent_id: {agent_id!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        for cap in capabilities:
            if not CAPABILITY_PATTERN.match(cap):
                raise ValueError(f"capabilities: {cap!r} must be 1-64 of A-Z a-z 0-9 _ -")
        if max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks: must be >= 1")
        self.agent_id = agent_id
        self.capabilities = sorted(set(capabilities))
        self.max_concurrent_tasks = max_concurrent_tasks
        self.heartbeat_interval = heartbeat_interval
        """Seconds between heartbeats: as given, or shorter as the orchestrator asks."""
        self.beats = presence.Beats(heartbeat_interval)
        self.drain_timeout = drain_timeout
        self.long_task_after = long_task_after
        if report_started_after is not None and report_started_after < 0:
            raise ValueError("report_started_after: must be >= 0 or None")
        self.report_started_after = report_started_after
        self.specialization = dict(specialization or {})
        if not all(0.0 <= score <= 1.0 for score in self.specialization.values()):
            raise ValueError(f"specialization: scores must be in 0..1, got {specialization!r}")
        self.counters = AgentCounters()
        self._handlers = Handlers()
        self._runners = Runners()
        self._bus: CommunicationBus | None = None
        self._owns_bus = False
        self._consumer: TaskConsumer | None = None
        self._control: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._halted = asyncio.Event()
        """Set when a stop begins: no task is taken then, and what waits for a
        handler's thread to end stops waiting."""
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._attempts = Attempts(agent_id, self.counters, self._halted, max_concurrent_tasks)
        self._deliveries = Deliveries(self._attempts)
        self._drain = Drain(agent_id, self._attempts, self._deliveries, self._runners)
        self._tasks = Tasks(self, self._handlers, self._runners, self._attempts, self._halted)
        self.control_gate = ControlGate(agent_id)
        """Commands refused (``refused``, by reason): not the orchestrator's, or not runnable."""
        self._priorities: dict[str, int] = {}
        self._commands = Commands(self)

    @property
    def held_attempts(self) -> frozenset[tuple[str, int]]:
        """The attempts (task id, attempt) this agent holds: running, or ended
        and not settled yet (a handler that still runs, a report on its way)."""
        return self._attempts.keys()

    @property
    def task_types(self) -> list[str]:
        """The task types this agent has handlers for ('*': any), as it announces them."""
        return list(self._handlers.task_types)

    @property
    def consumer_priorities(self) -> dict[str, int]:
        """The queues this agent was told to consume and runs, each with the
        consumer priority it consumes it at (the orchestrator's last word)."""
        return dict(self._priorities)

    @property
    def consuming(self) -> frozenset[str]:
        """The keys of the task queues this agent consumes now (none before it
        starts, while every slot is held by detached tasks, or once it stops)."""
        return self._consumer.queue_keys if self._consumer is not None else frozenset()

    @property
    def serving(self) -> bool:
        """Started on a bus and not stopping (nor unregistered)."""
        return self._bus is not None and not self._halted.is_set()

    @property
    def unsettled(self) -> int:
        """How many deliveries this agent received and has not settled yet."""
        return len(self._deliveries)

    # ------------------------------------------------------------------ handlers
    def handler(
        self, task_type: str = ANY_TASK_TYPE, *, interrupt: bool = False
    ) -> Callable[[Handler], Handler]:
        """Decorator: handle tasks of ``task_type`` ('*' for any type without its own).

        A coroutine function runs as its own task on the agent's event loop and
        is cancelled past the task's timeout, on a cancel, or when its agent
        stops. A plain function runs in a worker thread; then its
        ``ctx.interrupted`` (a ``threading.Event``) is set, and it should stop
        by calling ``ctx.check()`` now and then (it raises ``TaskInterrupted``),
        or wait with ``ctx.interrupted.wait(seconds)`` instead of
        ``time.sleep``. Either way the outcome ("timeout" or "cancelled") is
        reported at once, and the task keeps its slot of
        ``max_concurrent_tasks`` until the handler has really ended: a sync
        handler that never checks holds it until it returns.

        ``interrupt=True`` (sync handlers only) also raises ``TaskInterrupted``
        in the handler's thread asynchronously (CPython's
        ``PyThreadState_SetAsyncExc``), for code that cannot check. Use it only
        for code that holds no locks: the exception can land between a lock's
        ``acquire()`` and the ``try`` that releases it (``logging``'s handlers
        do exactly that), and the lock then stays held forever, freezing every
        thread that needs it, the agent's event loop included. It is not
        raised inside a blocking C call (``time.sleep``, a socket read), only
        once the call returns."""

        def register(fn: Handler) -> Handler:
            self.add_handler(task_type, fn, interrupt=interrupt)
            return fn

        return register

    def add_handler(self, task_type: str, fn: Handler, *, interrupt: bool = False) -> None:
        """Register ``fn`` for ``task_type``, as the ``handler`` decorator does."""
        self._handlers.add(task_type, fn, interrupt=interrupt)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, bus: CommunicationBus | None = None) -> None:
        """Connect (or use ``bus``), announce, and start taking tasks.

        Raises ``AgentIdInUse`` if an agent of this id is live on this prefix
        already (its control queue is exclusive to it)."""
        if bus is None:
            bus = CommunicationBus()
            self._owns_bus = True
        if not bus.is_connected:
            if hasattr(bus, "connection_name"):
                bus.connection_name = f"agent:{self.agent_id}"  # shown in the management UI
            await bus.connect()
            self._owns_bus = True
        self._bus = self._tasks.bus = bus
        self._halted.clear()
        self._stopped.clear()
        self._runners.open(self.max_concurrent_tasks * 2, f"agent-{self.agent_id}")
        try:
            try:
                self._control = await bus.subscribe_control(self.agent_id, self._commands.obey)
            except QueueInUse:
                raise AgentIdInUse(
                    f"agent id {self.agent_id!r} is already live on prefix"
                    f" {bus.settings.prefix!r}: another agent holds its control queue"
                    f" {bus.topology.agent_control_queue(self.agent_id)!r}; give each agent"
                    " process its own id"
                ) from None
            self._consumer = await bus.open_task_consumer(
                self.agent_id, prefetch=self.max_concurrent_tasks, handler=self._on_delivery
            )
            await self._announce()
        except BaseException:
            await self._shutdown()
            raise
        self._heartbeat = asyncio.get_running_loop().create_task(
            presence.beat(self, bus, self._attempts)
        )

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Graceful stop: take no more tasks, let running ones finish (up to the
        drain timeout), give the rest back to the queue, say goodbye.

        It then waits for what ended to be reported and settled, and for the
        async handlers it cancelled to end, but only until the drain timeout
        (counted from this call) plus ``SETTLE_MARGIN`` (``agents.draining``):
        it returns within about ``drain_timeout + SETTLE_MARGIN`` seconds, plus
        the time to say goodbye and close. Handlers can ``await
        agent.wait_stopping()`` to wrap up."""
        if self._bus is None or self._halted.is_set():
            await self._stopped.wait()
            return
        loop = asyncio.get_running_loop()
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        deadline = loop.time() + timeout
        self._halted.set()
        assert self._consumer is not None
        with contextlib.suppress(BusError):
            await self._consumer.pause()
        unfinished = await self._drain.stop_all(deadline)  # what to publish again
        with contextlib.suppress(BusError):
            await publish_event(self._bus, AgentLeft(agent_id=self.agent_id, unfinished=unfinished))
        await self._shutdown()

    async def kill(self) -> None:
        """Vanish without a goodbye, as a crashed process would (for tests)."""
        if self._bus is None:
            return
        self._halted.set()
        self._attempts.stop_all(StopReason.SHUTDOWN)
        await self._drain.wait_jobs()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.close()  # unsettled deliveries go back to the queue
        if self._control is not None:
            await self._control.close()
        if self._owns_bus and self._bus is not None:
            await self._bus.close()
        self._runners.close()
        self._bus = self._tasks.bus = None
        self._consumer = self._control = self._heartbeat = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_stopping(self) -> None:
        """Until a stop has begun (``stop``, SIGTERM, or an ``Unregister``): no new
        tasks are taken then, and running ones drain. A long handler can await
        it to wrap up early when its agent stops."""
        await self._halted.wait()

    async def serve(self, bus: CommunicationBus | None = None) -> None:
        """Run until SIGINT/SIGTERM or an ``Unregister`` from the orchestrator."""
        await self.start(bus)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: self._spawn(self.stop()))
        await self._stopped.wait()

    def run(self, broker_url: str | None = None) -> None:
        """Blocking: run the agent on ``broker_url`` (or ORCHESTRATOR_BROKER_URL)."""
        bus = CommunicationBus(broker_url) if broker_url else None
        event_loop.run(self.serve(bus))  # uvloop where installed

    # ------------------------------------------------------------------ control
    async def _announce(self) -> None:
        assert self._bus is not None
        await publish_event(self._bus, presence.announcement(self))

    async def _stop_after_unregister(self) -> None:
        await self._drain.wait_jobs()
        await self._drain.wait_settled()
        await self._shutdown()

    # ------------------------------------------------------------------ tasks
    async def _on_delivery(self, delivery: TaskDelivery) -> None:
        # Shielded: a bus that cancels its consumer's work when a link is lost
        # (aiormq does, on a channel's close) must not stop the handler with it.
        # A consumer that never does (``TaskConsumer.cancels_handlers`` False: the
        # in-process bus) has the delivery handled in its own task, without one
        # more task per delivery.
        consumer = self._consumer
        if consumer is not None and not consumer.cancels_handlers:
            await self._handle(delivery)
            return
        handling = asyncio.ensure_future(self._handle(delivery))
        self._background.add(handling)
        handling.add_done_callback(self._background.discard)
        await asyncio.shield(handling)

    async def _handle(self, delivery: TaskDelivery) -> None:
        # The one place a delivery is settled: whatever the handling decides,
        # or requeued if it fails.
        assert self._consumer is not None
        async with self._deliveries.settle(delivery, self._consumer) as settlement:
            settlement.outcome = await self._tasks.take(settlement)

    def _spawn(self, coro: Any) -> None:
        """Run in the background, holding a reference so it is not collected."""
        job = asyncio.get_running_loop().create_task(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)
