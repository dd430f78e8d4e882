"""``Agent``: the runtime users build workers with.

An agent announces itself, consumes the capability queues the orchestrator
assigns it, and heartbeats. Each task runs its handler under the task's
timeout; the final event is published (and confirmed) before the task
message is acknowledged, so a crash at any point leaves the task to be run
again rather than lost. The broker never hands an agent more tasks than its
``max_concurrent_tasks`` (the channel's prefetch).

How a handler runs and is stopped is ``agents.handlers``. A task that passes
its timeout or is cancelled is reported at once, whether or not its handler
obeys, but its delivery is settled only when the handler has really ended:
until then it holds its slot of the prefetch, so the agent never runs more
than ``max_concurrent_tasks`` handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker import (
    AGENT_ID_PATTERN,
    CAPABILITY_PATTERN,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    BusError,
    CancelTask,
    CommunicationBus,
    ConsumeQueues,
    Control,
    InvalidMessage,
    Reannounce,
    Subscription,
    TaskConsumer,
    TaskDelivery,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TaskStarted,
    Unregister,
    parse_task,
)
from broker.messages import CancelTasks

from .context import TaskContext
from .handlers import ANY_TASK_TYPE, Handler, Handlers, Runners

log = logging.getLogger(__name__)

_CANCELLED_MEMORY = 10_000
AVOID_PAUSE = 0.05
"""How long an agent asked to avoid a retry holds it before handing it back,
so that another agent with a free slot takes it instead."""
SETTLE_TIMEOUT = 15.0
"""How long a stopping agent waits, at most, for its ended tasks to be reported
and settled (and for its cancelled async handlers to end)."""
SETTLE_MARGIN = 2.0
"""``stop(drain_timeout=t)`` waits for that settling only until ``t`` (counted
from the call) plus this margin, so it returns within about ``t + SETTLE_MARGIN``
seconds, plus the time to say goodbye and close the connection."""
_LATE_HANDLER_WARNING = 1.0
"""A handler still running this long after its task ended here is logged."""
AVOID_DEFERRALS = 3
"""How often an agent hands back a retry it was asked to avoid before it runs
it after all (the broker may offer it the same message again)."""


@dataclass
class AgentCounters:
    """What this agent did, counted inside it (for tests and monitoring)."""

    received: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    running: int = 0
    max_running: int = 0


@dataclass
class _Running:
    message: TaskMessage
    job: asyncio.Task[Any] | None = None
    stop_reason: str | None = None
    """Why we cancelled it: 'cancelled' (report it), 'unregistered' or 'shutdown' (don't)."""
    detached: bool = False
    """Acknowledged when it started (a long task): its delivery is settled."""
    handler: asyncio.Future[Any] | None = None
    """The handler's run: an async handler's own task, or a sync handler's
    future in its worker thread. Done when the handler has really ended."""
    ending: bool = False
    """The attempt has ended here (reported, or to be run again) but its
    delivery is not settled yet: it stays known here until it is, so that a
    redelivery of the same attempt meanwhile is taken for the duplicate it is."""


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
    ) -> None:
        """``long_task_after``: a task whose timeout is longer (seconds) is
        acknowledged once it has started, not when it ends. RabbitMQ closes a
        channel holding a delivery unacknowledged past its ``consumer_timeout``
        (30 min by default) and requeues all of it; for those tasks the
        orchestrator's heartbeat watch replaces the broker's redelivery. None
        never acknowledges early (for brokers configured for long tasks)."""
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
        self.drain_timeout = drain_timeout
        self.long_task_after = long_task_after
        self.counters = AgentCounters()
        self._handlers = Handlers()
        self._runners = Runners()
        self._bus: CommunicationBus | None = None
        self._owns_bus = False
        self._consumer: TaskConsumer | None = None
        self._control: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._running: dict[tuple[str, int], _Running] = {}
        """By task id and attempt: a new attempt may come while an old one ends here."""
        self._cancelled: OrderedDict[tuple[str, int | None], None] = OrderedDict()
        self._deferred: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._stopping = False
        self._halted = asyncio.Event()
        """Set with ``_stopping``: wakes what waits for a handler's thread to end."""
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._unsettled: set[asyncio.Event] = set()
        """One per delivery received and not yet settled (and its task reported)."""

    @property
    def held_attempts(self) -> frozenset[tuple[str, int]]:
        """The attempts (task id, attempt) this agent holds: running, or ended
        and not settled yet (a handler that still runs, a report on its way)."""
        return frozenset(self._running)

    @property
    def unsettled(self) -> int:
        """How many deliveries this agent received and has not settled yet."""
        return len(self._unsettled)

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
        """Connect (or use ``bus``), announce, and start taking tasks."""
        if bus is None:
            bus = CommunicationBus()
            self._owns_bus = True
        if not bus.is_connected:
            if hasattr(bus, "connection_name"):
                bus.connection_name = f"agent:{self.agent_id}"  # shown in the management UI
            await bus.connect()
            self._owns_bus = True
        self._bus = bus
        self._stopping = False
        self._halted.clear()
        self._stopped.clear()
        self._runners.open(self.max_concurrent_tasks * 2, f"agent-{self.agent_id}")
        self._control = await bus.subscribe_control(self.agent_id, self._on_control)
        self._consumer = await bus.open_task_consumer(
            self.agent_id, prefetch=self.max_concurrent_tasks, handler=self._on_delivery
        )
        await self._announce()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Graceful stop: take no more tasks, let running ones finish (up to the
        drain timeout), give the rest back to the queue, say goodbye.

        It then waits for what ended to be reported and settled, and for the
        async handlers it cancelled to end, but only until the drain timeout
        (counted from this call) plus ``SETTLE_MARGIN``: it returns within about
        ``drain_timeout + SETTLE_MARGIN`` seconds, plus the time to say goodbye
        and close. Handlers can ``await agent.wait_stopping()`` to wrap up."""
        if self._bus is None or self._stopping:
            await self._stopped.wait()
            return
        loop = asyncio.get_running_loop()
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        deadline = loop.time() + timeout
        self._halt()
        assert self._consumer is not None
        with contextlib.suppress(BusError):
            await self._consumer.pause()
        jobs = [r.job for r in self._running.values() if r.job is not None]
        if jobs:
            await asyncio.wait(jobs, timeout=max(0.0, deadline - loop.time()))
        stopped = list(self._running.values())
        for running in stopped:
            self._stop_job(running, "shutdown")
        await self._wait_jobs()
        # Every ended task reported and settled before the goodbye and before the
        # channel closes (which would hand back a finished task to run again).
        await self._wait_settled(
            min(SETTLE_TIMEOUT, max(0.0, deadline - loop.time()) + SETTLE_MARGIN)
        )
        # Acknowledged early, they are in no queue: the orchestrator re-publishes them.
        unfinished = [
            r.message.task_id
            for r in stopped
            if r.detached
            and r.job is not None
            and r.job.cancelled()
            and r.stop_reason != "cancelled"
        ]
        with contextlib.suppress(BusError):
            await self._bus.publish_event(AgentLeft(agent_id=self.agent_id, unfinished=unfinished))
        await self._shutdown()

    async def kill(self) -> None:
        """Vanish without a goodbye, as a crashed process would (for tests)."""
        if self._bus is None:
            return
        self._halt()
        for running in list(self._running.values()):
            self._stop_job(running, "shutdown")
        await self._wait_jobs()
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
        self._bus = None
        self._stopped.set()

    def _halt(self) -> None:
        """Take no more tasks; settle those ended without waiting for their threads."""
        self._stopping = True
        self._halted.set()

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
        asyncio.run(self.serve(bus))

    # ------------------------------------------------------------------ control
    async def _announce(self) -> None:
        assert self._bus is not None
        await self._bus.publish_event(
            AgentAnnounced(
                agent_id=self.agent_id,
                capabilities=self.capabilities,
                max_concurrent_tasks=self.max_concurrent_tasks,
                task_types=self._handlers.task_types,
            )
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                assert self._bus is not None
                await self._bus.publish_event(
                    AgentHeartbeat(
                        agent_id=self.agent_id,
                        running=sum(1 for r in self._running.values() if not r.ending),
                    )
                )
            except BusError as exc:
                log.warning("agent %s: heartbeat not sent: %s", self.agent_id, exc)

    async def _on_control(self, command: Control) -> None:
        if isinstance(command, ConsumeQueues):
            if self._consumer is not None and not self._stopping:
                await self._consumer.consume(command.queue_keys, command.consumer_priority)
        elif isinstance(command, CancelTask):
            self._cancel(command.task_id, command.attempt)
        elif isinstance(command, CancelTasks):
            for task_id in command.task_ids:
                self._cancel(task_id, command.attempt)
        elif isinstance(command, Unregister):
            log.warning("agent %s was unregistered by the orchestrator; stopping", self.agent_id)
            self._halt()
            for running in list(self._running.values()):
                self._stop_job(running, "unregistered")
            self._spawn(self._stop_after_unregister())
        elif isinstance(command, Reannounce):
            await self._announce()

    def _cancel(self, task_id: str, attempt: int | None) -> None:
        """Skip the task if it arrives; stop its handler if it runs here."""
        self._remember_cancelled(task_id, attempt)
        for (running_id, running_attempt), running in list(self._running.items()):
            if running.ending:
                continue  # already reported; its handler was told to stop
            if running_id == task_id and attempt in (None, running_attempt):
                self._stop_job(running, "cancelled")

    async def _stop_after_unregister(self) -> None:
        await self._wait_jobs()
        await self._wait_settled()
        await self._shutdown()

    def _remember_cancelled(self, task_id: str, attempt: int | None) -> None:
        self._cancelled[(task_id, attempt)] = None
        while len(self._cancelled) > _CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)

    def _defer_once(self, message: TaskMessage) -> bool:
        """True the first AVOID_DEFERRALS times this attempt comes here; then it runs here."""
        key = (message.task_id, message.attempt)
        count = self._deferred.get(key, 0)
        if count >= AVOID_DEFERRALS:
            return False
        self._deferred[key] = count + 1
        while len(self._deferred) > _CANCELLED_MEMORY:
            self._deferred.popitem(last=False)
        return True

    def _is_cancelled(self, message: TaskMessage) -> bool:
        return (message.task_id, None) in self._cancelled or (
            message.task_id,
            message.attempt,
        ) in self._cancelled

    @staticmethod
    def _stop_job(running: _Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
        if running.job is not None:
            running.job.cancel()

    async def _wait_jobs(self) -> None:
        jobs = [r.job for r in self._running.values() if r.job is not None]
        if jobs:
            await asyncio.wait(jobs)

    async def _wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until every delivery received is settled (its task reported) and every
        async handler cancelled has ended; bounded: a broker that is down makes
        a publish fail only after a while, and a handler may ignore its cancel."""
        waits = [asyncio.ensure_future(event.wait()) for event in self._unsettled]
        handlers = self._runners.unended()
        if not waits and not handlers:
            return
        _, pending = await asyncio.wait([*waits, *handlers], timeout=timeout)
        for waiter in waits:
            waiter.cancel()
        unsettled = sum(1 for waiter in waits if waiter in pending)
        if unsettled:
            log.warning(
                "agent %s: %d task(s) not settled before stopping", self.agent_id, unsettled
            )
        unended = sum(1 for task in handlers if task in pending)
        if unended:
            log.warning(
                "agent %s: %d handler(s) ignored their cancellation and still run",
                self.agent_id,
                unended,
            )

    # ------------------------------------------------------------------ tasks
    async def _on_delivery(self, delivery: TaskDelivery) -> None:
        # Tracked from the start, shortcuts included: a stop waits until every
        # delivery received is settled before the channel closes (which would
        # hand back a task already reported, to run again).
        settled = asyncio.Event()
        self._unsettled.add(settled)
        try:
            await self._take(delivery)
        finally:
            self._unsettled.discard(settled)
            settled.set()

    async def _take(self, delivery: TaskDelivery) -> None:
        try:
            message = parse_task(delivery.body)
        except InvalidMessage as exc:
            await delivery.dead_letter(f"agent {self.agent_id}: {exc}")
            return
        if self._stopping:
            await delivery.requeue()
            return
        key = (message.task_id, message.attempt)
        if key in self._running:
            await delivery.ack()  # a duplicate of what runs here
            return
        # (Another attempt of the same task still running or ending here is no
        # reason to drop this one: the orchestrator has moved on to it.)
        if self._is_cancelled(message):
            # Say so, so that the orchestrator stops telling new agents about it.
            with contextlib.suppress(BusError):
                assert self._bus is not None
                await self._bus.publish_event(
                    TaskFinished(
                        task_id=message.task_id,
                        attempt=message.attempt,
                        agent_id=self.agent_id,
                        outcome="cancelled",
                        error="skipped: cancelled before it started",
                    )
                )
            await delivery.ack()
            return
        if self.agent_id in message.avoid_agents and self._defer_once(message):
            # A retry after failing here: let another agent take it if one can.
            assert self._consumer is not None
            await self._consumer.step_aside(delivery, AVOID_PAUSE)
            return
        running = _Running(message)
        self._running[key] = running
        self.counters.received += 1
        self.counters.running += 1
        self.counters.max_running = max(self.counters.max_running, self.counters.running)
        uncounted = False

        def uncount() -> None:
            # Before the delivery is settled: once it is, the broker may hand this
            # agent another task in its place, which must not find this attempt
            # still counted as running here.
            nonlocal uncounted
            if not uncounted:
                uncounted = True
                self.counters.running -= 1

        def release() -> None:
            # Before a requeue (the same attempt must run again when it comes
            # back), else once the delivery is settled: until then a redelivery
            # of this attempt (the channel lost) is a duplicate of it.
            uncount()
            if self._running.get(key) is running:  # not a redelivery's, run since
                del self._running[key]

        try:
            running.job = asyncio.get_running_loop().create_task(
                self._run(message, running, delivery)
            )
            with contextlib.suppress(asyncio.CancelledError):
                await running.job
            cancelled_early = self._cancelled_early(running)
            if running.detached:
                # Already acknowledged: report what it did; nothing to requeue.
                if not running.job.cancelled() and running.job.result() is not None:
                    assert self._bus is not None
                    await self._bus.publish_event(running.job.result())
                elif cancelled_early is not None:
                    assert self._bus is not None
                    await self._bus.publish_event(cancelled_early)
                await self._until_handler_ends(running)  # then reattach (finally)
            elif running.job.cancelled() and cancelled_early is None:
                # Stopped before it ended (a stop it outlived, or unregistered):
                # what ran it no longer counts. A job that did end is reported
                # below, even if a stop came in the meantime.
                release()
                if running.stop_reason == "unregistered":
                    await delivery.ack()  # the orchestrator has re-published it
                else:
                    await delivery.requeue()
            else:
                # It ended; or it was cancelled on request before its handler was
                # waited for (while it said it started): reported cancelled, as a
                # skipped one is.
                finished: TaskFinished | None = (
                    cancelled_early if cancelled_early is not None else running.job.result()
                )
                if finished is not None:
                    assert self._bus is not None
                    await self._bus.publish_event(finished)
                await self._until_handler_ends(running)
                uncount()
                await delivery.ack()
                release()
        except BusError as exc:
            # The final event did not go out: the task must run again. Requeue it;
            # if the channel is gone, the broker has already given it back. One
            # acknowledged early is retried by the orchestrator's run deadline.
            log.error("agent %s: task %s not reported: %s", self.agent_id, message.task_id, exc)
            await self._until_handler_ends(running)
            release()
            if not running.detached:
                await delivery.requeue()
        finally:
            release()
            if running.detached and self._consumer is not None:
                with contextlib.suppress(BusError):
                    await self._consumer.reattach()

    def _cancelled_early(self, running: _Running) -> TaskFinished | None:
        """The report of a job cancelled on request before it could report it
        itself (during its ``TaskStarted``, or before it began); else None."""
        job = running.job
        if job is None or not job.cancelled() or running.stop_reason != "cancelled":
            return None
        self.counters.cancelled += 1
        return TaskFinished(
            task_id=running.message.task_id,
            attempt=running.message.attempt,
            agent_id=self.agent_id,
            outcome="cancelled",
            error="cancelled by request",
        )

    async def _until_handler_ends(self, running: _Running) -> None:
        """Wait, before settling a delivery, until the handler that ran it has
        really ended (an async handler may ignore its cancellation, a sync one
        be stuck in a C call): until then the delivery holds its slot of the
        prefetch, so that no other task runs in its place. The attempt has
        ended here (reported, or to be run again): it is marked ending, but
        stays known here until its delivery is settled, so that a redelivery of
        the same attempt (its channel lost) is acknowledged as a duplicate
        rather than run beside this handler; a new attempt of the same task
        runs meanwhile. A stop does not wait for it (nothing new is taken then)."""
        running.ending = True
        handler = running.handler
        if handler is None or handler.done() or self._stopping:
            return
        halted = asyncio.ensure_future(self._halted.wait())
        try:
            done, _ = await asyncio.wait(
                [handler, halted],
                timeout=_LATE_HANDLER_WARNING,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                log.warning(
                    "agent %s: task %s ended but its handler still runs; its slot stays"
                    " taken until the handler ends",
                    self.agent_id,
                    running.message.task_id,
                )
                await asyncio.wait([handler, halted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halted.cancel()

    async def _run(
        self, message: TaskMessage, running: _Running, delivery: TaskDelivery
    ) -> TaskFinished | None:
        """Run one attempt; returns its final event (None when it must not be reported)."""
        bus = self._bus
        assert bus is not None
        loop = asyncio.get_running_loop()
        # Confirmed before the handler starts: the orchestrator sees events in order.
        await bus.publish_event(
            TaskStarted(task_id=message.task_id, attempt=message.attempt, agent_id=self.agent_id)
        )
        if self.long_task_after is not None and message.timeout > self.long_task_after:
            # The orchestrator knows it runs here, and will re-publish it if we vanish.
            assert self._consumer is not None
            running.detached = True
            await asyncio.shield(self._consumer.detach(delivery))  # never half done

        def report(fraction: float) -> None:
            event = TaskProgress(
                task_id=message.task_id,
                attempt=message.attempt,
                agent_id=self.agent_id,
                progress=fraction,
            )
            self._spawn(self._send_quietly(event))

        ctx = TaskContext(message, self.agent_id, report, loop)

        def final(outcome: str, result: Any = None, error: str | None = None) -> TaskFinished:
            return TaskFinished(
                task_id=message.task_id,
                attempt=message.attempt,
                agent_id=self.agent_id,
                outcome=outcome,
                result=result,
                error=error,
            )

        handler = self._handlers.find(message.task_type)
        if handler is None:
            self.counters.failed += 1
            return final(
                "failed",
                error=f"agent {self.agent_id} has no handler for task_type {message.task_type!r}",
            )
        run = self._runners.start(handler, ctx)
        running.handler = run.future
        try:
            end = await run.wait(message.timeout)
        except asyncio.CancelledError:
            if running.stop_reason == "cancelled":
                self.counters.cancelled += 1
                return final("cancelled", error="cancelled by request")
            raise
        if end.outcome == "timeout":
            self.counters.timed_out += 1
        elif end.outcome == "failed":
            self.counters.failed += 1
        else:
            self.counters.completed += 1
        return final(end.outcome, result=end.result, error=end.error)

    def _spawn(self, coro: Any) -> None:
        """Run in the background, holding a reference so it is not collected."""
        job = asyncio.get_running_loop().create_task(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _send_quietly(self, event: TaskProgress) -> None:
        if self._bus is None:
            return
        try:
            await self._bus.publish_event(event)
        except BusError as exc:
            log.debug("progress not sent: %s", exc)
