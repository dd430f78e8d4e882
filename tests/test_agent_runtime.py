"""The agent runtime: progress, sync handlers, graceful stop, ack after the final event."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import pytest

from agents import Agent, TaskContext
from agents.context import TaskInterrupted
from broker import (
    BusConnectionError,
    CommunicationBus,
    TaskDelivery,
    TaskFinished,
    TaskStarted,
    parse_task,
)
from orchestrator import TaskOrchestrator
from tests.harness import FAST, Harness, gone, running_on, wait_until

WAIT = 60
"""Seconds to wait for what must happen (other test runs share this machine)."""
PATIENT = FAST.model_copy(update={"timeout_grace": WAIT})
"""An orchestrator that gives an agent ample time to report a timeout itself."""


async def _submit(orch: TaskOrchestrator, **kwargs: Any) -> str:
    kwargs.setdefault("name", "job")
    kwargs.setdefault("description", "")
    kwargs.setdefault("task_type", "job")
    kwargs.setdefault("payload", {})
    kwargs.setdefault("required_capabilities", ["work"])
    return await orch.submit_task(**kwargs)


async def _waits_in_its_queue(orchestrator: TaskOrchestrator, key: str = "job.work") -> None:
    """Until a task is ready in queue ``key`` while the agent consumes it: the
    broker hands a ready message to a consumer with room at once, so one seen
    waiting there means the agent had no free slot (no fixed sleep guessing
    how long a freed slot would take to be used)."""

    async def ready() -> bool:
        return await orchestrator.bus.queue_depth(key) == 1

    await wait_until(ready, WAIT)


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_progress_shows_while_the_task_runs(harness: Harness, kind: str) -> None:
    # Given a handler that reports half its progress and then waits on a gate
    orchestrator = await harness.start_orchestrator()
    async_gate = asyncio.Event()
    thread_gate = threading.Event()

    async def async_handler(ctx: TaskContext) -> dict:
        ctx.progress(0.5)
        await async_gate.wait()
        return {"kind": "async"}

    def sync_handler(ctx: TaskContext) -> dict:
        ctx.progress(0.5)  # from a worker thread: the thread-safe path
        if not thread_gate.wait(WAIT):
            raise RuntimeError("the test never opened the gate")
        return {"kind": "sync"}

    handler = async_handler if kind == "async" else sync_handler
    await harness.start_agent("worker", ["work"], 2, handler)
    try:
        task_id = await _submit(orchestrator)

        # When it has reported, Then get_task_status shows it running at 0.5
        async def half_done() -> bool:
            status = await orchestrator.get_task_status(task_id)
            return status["status"] == "running" and status["progress"] == 0.5

        await wait_until(half_done, WAIT)
        status = await orchestrator.get_task_status(task_id)
        assert status["assigned_agent"] == "worker"
        assert status["result"] is None
    finally:
        # And once released it completes at 1.0
        async_gate.set()
        thread_gate.set()
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["progress"] == 1.0
    assert status["result"] == {"kind": kind}


# ---------------------------------------------------------------- sync handlers


async def test_sync_handler_runs_off_the_event_loop(harness: Harness) -> None:
    # Given an agent whose handler is a plain function
    orchestrator = await harness.start_orchestrator()
    threads: list[int] = []

    def handler(ctx: TaskContext) -> dict:
        threads.append(threading.get_ident())
        return {"double": ctx.payload["n"] * 2}

    await harness.start_agent("worker", ["work"], 2, handler)

    # When tasks run on it
    ids = [await _submit(orchestrator, payload={"n": n}) for n in range(3)]
    statuses = [await orchestrator.wait_for_task(t, timeout=WAIT) for t in ids]

    # Then they complete with its results, run in threads other than the event loop's
    assert [s["status"] for s in statuses] == ["completed"] * 3
    assert [s["result"] for s in statuses] == [{"double": 0}, {"double": 2}, {"double": 4}]
    assert len(threads) == 3
    assert threading.get_ident() not in threads


async def test_sync_handler_past_its_timeout_is_reported_timeout(harness: Harness) -> None:
    # Given a plain-function handler that blocks its thread until released (and an
    # orchestrator patient enough that only the agent can report the timeout)
    orchestrator = await harness.start_orchestrator(PATIENT)
    gate = threading.Event()

    def handler(ctx: TaskContext) -> dict:
        gate.wait(WAIT)
        return {"late": True}

    await harness.start_agent("worker", ["work"], 1, handler)
    try:
        # When its task's timeout passes while it blocks
        task_id = await _submit(orchestrator, timeout=0.5, max_retries=0)
        status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    finally:
        gate.set()

    # Then the task is reported timeout, with the limit in its error
    assert status["status"] == "timeout"
    assert status["error_message"] == "exceeded timeout of 0.5s"
    assert status["result"] is None
    stats = await orchestrator.get_stats()
    assert stats["tasks_failed"] == 1 and stats["tasks_completed"] == 0
    assert stats["running_tasks"] == 0


def _looping_handler(ended: threading.Event, interrupted: list[str]) -> Any:
    """A sync handler that loops until ``ctx.check()`` stops it, saying how it ended."""

    def handler(ctx: TaskContext) -> dict:
        try:
            while True:
                ctx.check()
                time.sleep(0.01)
        except TaskInterrupted:
            interrupted.append(ctx.task_id)
            raise
        finally:
            ended.set()

    return handler


async def test_sync_handler_checking_past_its_timeout_ends(harness: Harness) -> None:
    # Given a plain-function handler that loops, calling ctx.check(), and never returns
    # (an orchestrator patient enough that only the agent can report the timeout)
    orchestrator = await harness.start_orchestrator(PATIENT)
    ended = threading.Event()
    interrupted: list[str] = []
    agent = await harness.start_agent("worker", ["work"], 1, _looping_handler(ended, interrupted))

    # When its task's timeout passes
    task_id = await _submit(orchestrator, timeout=0.5, max_retries=0)
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)

    # Then the task ends "timeout", and ctx.check() ended the handler's thread
    assert status["status"] == "timeout"
    assert status["error_message"] == "exceeded timeout of 0.5s"
    assert await asyncio.to_thread(ended.wait, WAIT)
    assert interrupted == [task_id]

    # And its slot is free again once that thread is out
    async def settled() -> bool:
        return agent.counters.running == 0

    await wait_until(settled, WAIT)
    assert agent.counters.timed_out == 1


async def test_sync_handler_opting_in_is_interrupted_in_a_pure_python_loop(
    harness: Harness,
) -> None:
    # Given a plain-function handler registered with interrupt=True that spins
    # in pure Python and never checks
    orchestrator = await harness.start_orchestrator(PATIENT)
    ended = threading.Event()
    interrupted: list[str] = []

    def handler(ctx: TaskContext) -> dict:
        spins = 0
        try:
            while True:
                spins += 1
        except TaskInterrupted:
            interrupted.append(ctx.task_id)
            raise
        finally:
            ended.set()

    agent = Agent("worker", ["work"], 1, heartbeat_interval=0.3)
    agent.add_handler("*", handler, interrupt=True)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    await harness.wait_agents("worker", timeout=WAIT)

    # When its task's timeout passes
    task_id = await _submit(orchestrator, timeout=0.5, max_retries=0)
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)

    # Then the task ends "timeout", and TaskInterrupted, raised in its thread, ended it
    assert status["status"] == "timeout"
    assert await asyncio.to_thread(ended.wait, WAIT)
    assert interrupted == [task_id]

    async def settled() -> bool:
        return agent.counters.running == 0

    await wait_until(settled, WAIT)


def test_interrupt_is_only_for_sync_handlers() -> None:
    agent = Agent("worker", ["work"], 1)

    async def handler(ctx: TaskContext) -> dict:
        return {}

    with pytest.raises(ValueError, match="sync handlers"):
        agent.add_handler("*", handler, interrupt=True)


async def test_cancel_interrupts_a_running_sync_handler(harness: Harness) -> None:
    # Given a plain-function handler looping in Python, running
    orchestrator = await harness.start_orchestrator()
    ended = threading.Event()
    interrupted: list[str] = []
    agent = await harness.start_agent("worker", ["work"], 1, _looping_handler(ended, interrupted))
    task_id = await _submit(orchestrator, max_retries=0)
    await wait_until(lambda: running_on(orchestrator, task_id, "worker"), WAIT)

    # When the task is cancelled
    assert await orchestrator.cancel_task(task_id) is True

    # Then the handler's thread was interrupted and ended, and the task is cancelled
    assert await asyncio.to_thread(ended.wait, WAIT)
    assert interrupted == [task_id]
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "cancelled"

    async def counted() -> bool:
        return agent.counters.cancelled == 1 and agent.counters.running == 0

    await wait_until(counted, WAIT)


async def test_sync_handler_stuck_past_its_timeout_keeps_its_slot(harness: Harness) -> None:
    # Given an agent with one slot whose first task blocks in a C call (Event.wait)
    # and never checks, until the test releases it
    orchestrator = await harness.start_orchestrator()
    gate = threading.Event()
    stuck_ended = threading.Event()
    told: list[bool] = []
    raised: list[bool] = []

    def handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("stuck"):
            try:
                gate.wait(WAIT)
                told.append(ctx.interrupted.is_set())
            except TaskInterrupted:  # never raised in its thread: it did not opt in
                raised.append(True)
                raise
            finally:
                stuck_ended.set()
        return {"stuck_thread_ended": stuck_ended.is_set()}

    agent = await harness.start_agent("worker", ["work"], 1, handler)
    try:
        stuck = await _submit(orchestrator, payload={"stuck": True}, timeout=0.5, max_retries=0)
        status = await orchestrator.wait_for_task(stuck, timeout=WAIT)
        assert status["status"] == "timeout"

        # When a second task comes while the stuck thread still runs
        second = await _submit(orchestrator)
        await _waits_in_its_queue(orchestrator)

        # Then it waits in its queue: the timed-out task still holds the only slot
        assert not stuck_ended.is_set()
        assert (await orchestrator.get_task_status(second))["status"] in ("pending", "assigned")
        assert agent.counters.received == 1
        assert agent.counters.running == 1
    finally:
        gate.set()

    # And once the stuck thread ends (told, not raised into), the second runs
    status = await orchestrator.wait_for_task(second, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"] == {"stuck_thread_ended": True}
    assert told == [True]
    assert raised == []
    assert agent.counters.max_running == 1


# ---------------------------------------------------------------- async handlers deaf to cancel


@pytest.mark.parametrize("ended_by", ["timeout", "cancel"])
async def test_async_handler_ignoring_its_cancel_is_reported_and_keeps_its_slot(
    harness: Harness, ended_by: str
) -> None:
    # Given an agent with one slot whose first task's async handler swallows
    # CancelledError and goes on until the test releases it (an orchestrator
    # patient enough that only the agent can report the timeout)
    orchestrator = await harness.start_orchestrator(PATIENT)
    release = asyncio.Event()
    deaf_ended = asyncio.Event()
    swallowed: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("deaf"):
            try:
                while not release.is_set():
                    try:
                        await release.wait()
                    except asyncio.CancelledError:
                        swallowed.append(ctx.task_id)
            finally:
                deaf_ended.set()
            return {"late": True}
        return {"deaf_handler_ended": deaf_ended.is_set()}

    agent = await harness.start_agent("worker", ["work"], 1, handler)
    try:
        # When its timeout passes, or it is cancelled while it runs
        if ended_by == "timeout":
            deaf = await _submit(orchestrator, payload={"deaf": True}, timeout=0.5, max_retries=0)
            status = await orchestrator.wait_for_task(deaf, timeout=WAIT)

            # Then the agent reports it "timeout" (the orchestrator's deadline is far)
            assert status["status"] == "timeout"
            assert status["error_message"] == "exceeded timeout of 0.5s"
            assert agent.counters.timed_out == 1
        else:
            deaf = await _submit(orchestrator, payload={"deaf": True}, max_retries=0)
            await wait_until(lambda: running_on(orchestrator, deaf, "worker"), WAIT)
            assert await orchestrator.cancel_task(deaf) is True

            # Then the agent obeys at once and reports it cancelled
            async def reported() -> bool:
                return agent.counters.cancelled == 1

            await wait_until(reported, WAIT)
        assert swallowed == [deaf]
        assert not deaf_ended.is_set()

        # And a second task waits in its queue: the handler still holds the only slot
        second = await _submit(orchestrator)
        await _waits_in_its_queue(orchestrator)
        assert (await orchestrator.get_task_status(second))["status"] in ("pending", "assigned")
        assert agent.counters.received == 1
        assert agent.counters.running == 1
    finally:
        release.set()

    # Until the handler ends: then the second runs, after it
    status = await orchestrator.wait_for_task(second, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"] == {"deaf_handler_ended": True}
    assert agent.counters.max_running == 1
    assert agent.counters.completed == 1


async def test_stop_is_not_held_by_an_async_handler_ignoring_its_cancel(
    harness: Harness,
) -> None:
    # Given a task whose async handler swallows CancelledError, on the first of two agents
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.agent_id == "first":
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
        return {"agent": ctx.agent_id}

    first = await harness.start_agent("first", ["work"], 1, handler)
    try:
        task_id = await _submit(orchestrator)
        await wait_until(lambda: running_on(orchestrator, task_id, "first"), WAIT)
        second = await harness.start_agent("second", ["work"], 1, handler)

        # When the first stops with a tiny drain timeout
        stopping = asyncio.ensure_future(first.stop(drain_timeout=0.05))
        done, _ = await asyncio.wait([stopping], timeout=WAIT)

        # Then the stop ends without the handler (it settles, closes, and says goodbye)
        assert done, "the stop waited for a handler that ignores its cancellation"
        await stopping
    finally:
        release.set()

    # And the task, given back, completes on the second agent
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"] == {"agent": "second"}
    assert second.counters.completed == 1
    await wait_until(lambda: gone(orchestrator, "first"), WAIT)


# ---------------------------------------------------------------- cancelled while queued


async def test_a_new_agent_skips_the_tasks_cancelled_in_its_queue(harness: Harness) -> None:
    # Given tasks cancelled while they waited in a queue no agent consumed yet
    orchestrator = await harness.start_orchestrator()
    cancelled = [await _submit(orchestrator, payload={"n": n}) for n in range(3)]
    for task_id in cancelled:
        assert await orchestrator.cancel_task(task_id) is True
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.task_id)
        return {}

    # When an agent for that queue starts (it hears their ids in a CancelTasks
    # first), and one more task is queued behind them
    agent = await harness.start_agent("worker", ["work"], 1, handler)
    last = await _submit(orchestrator)

    # Then only that task ran: the cancelled ones, ahead of it, were skipped
    status = await orchestrator.wait_for_task(last, timeout=WAIT)
    assert status["status"] == "completed"
    assert ran == [last]
    for task_id in cancelled:
        assert (await orchestrator.get_task_status(task_id))["status"] == "cancelled"
    assert agent.counters.received == 1


# ---------------------------------------------------------------- graceful stop


async def test_stop_lets_a_running_task_finish_within_the_drain_timeout(
    harness: Harness,
) -> None:
    # Given a task running on the first of two agents, which ends once its agent stops
    orchestrator = await harness.start_orchestrator()
    agents: dict[str, Agent] = {}

    async def handler(ctx: TaskContext) -> dict:
        await agents[ctx.agent_id].wait_stopping()
        return {"agent": ctx.agent_id}

    agents["first"] = await harness.start_agent("first", ["work"], 1, handler)
    task_id = await _submit(orchestrator)
    await wait_until(lambda: running_on(orchestrator, task_id, "first"), WAIT)
    agents["second"] = await harness.start_agent("second", ["work"], 1, handler)

    # When the first stops with a drain timeout long enough
    await asyncio.wait_for(agents["first"].stop(drain_timeout=WAIT), WAIT)

    # Then the task finished there, during the stop (it ends only then), reported once
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "first"
    assert status["result"] == {"agent": "first"}
    assert agents["first"].counters.completed == 1
    await wait_until(lambda: gone(orchestrator, "first"), WAIT)
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == stats["completed_tasks"] == 1
    assert stats["running_tasks"] == stats["pending_tasks"] == 0
    assert stats["registered_agents"] == 1
    # (its message was acknowledged before the channel closed: nothing came back)
    assert agents["second"].counters.received == 0


async def test_stop_with_a_tiny_drain_timeout_returns_the_task(harness: Harness) -> None:
    # Given a task that never ends on the first agent, and a second agent
    orchestrator = await harness.start_orchestrator()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.agent_id == "first":
            await asyncio.sleep(3600)
        return {"agent": ctx.agent_id}

    first = await harness.start_agent("first", ["work"], 1, handler)
    task_id = await _submit(orchestrator)
    await wait_until(lambda: running_on(orchestrator, task_id, "first"), WAIT)
    second = await harness.start_agent("second", ["work"], 1, handler)

    # When the first stops with a drain timeout far too short for it
    await asyncio.wait_for(first.stop(drain_timeout=0.05), WAIT)

    # Then the task went back to the queue and completed on the second
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "second"
    assert status["result"] == {"agent": "second"}
    assert status["retry_count"] == 0  # given back, not failed
    assert first.counters.completed == 0 and second.counters.completed == 1

    # And the stats count it once, with the first agent gone
    await wait_until(lambda: gone(orchestrator, "first"), WAIT)
    stats = await orchestrator.get_stats()
    assert stats["tasks_created"] == 1
    assert stats["tasks_completed"] == stats["completed_tasks"] == 1
    assert stats["tasks_failed"] == 0
    assert stats["running_tasks"] == stats["pending_tasks"] == 0
    assert stats["registered_agents"] == 1
    assert stats["agent_utilization"] == {"second": 0.0}


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("drain", ["long", "tiny"])
async def test_sigterm_stops_an_agent_process_gracefully(harness: Harness, drain: str) -> None:
    # Given a task running in an agent process
    orchestrator = await harness.start_orchestrator()
    if drain == "long":
        # (it ends once its agent has begun to stop; 60 s is enough for that)
        payload: dict[str, Any] = {"until_stopping": True}
        stopping = harness.spawn_agent("stopping", ["work"], AGENT_MAX=1, AGENT_DRAIN=WAIT)
    else:
        # (it never ends there; the drain timeout is 0.2 s)
        payload = {"hang_on": "stopping"}
        stopping = harness.spawn_agent("stopping", ["work"], AGENT_MAX=1, AGENT_DRAIN=0.2)
    await harness.wait_agents("stopping", timeout=WAIT)
    task_id = await _submit(orchestrator, payload=payload)
    await wait_until(lambda: running_on(orchestrator, task_id, "stopping"), WAIT)
    harness.spawn_agent("other", ["work"], AGENT_MAX=1)
    await harness.wait_agents("other", timeout=WAIT)

    # When the process gets SIGTERM
    os.kill(stopping.pid, signal.SIGTERM)

    # Then it exits 0, and the task completes: there if the drain let it, else on the other
    returncode = await asyncio.to_thread(stopping.wait, WAIT)
    assert returncode == 0
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    if drain == "long":
        assert status["assigned_agent"] == "stopping"
        assert status["result"]["stopping"] is True  # it ended during the stop
        assert status["result"]["pid"] == stopping.pid
    else:
        assert status["assigned_agent"] == "other"
        assert status["result"]["agent"] == "other"
    await wait_until(lambda: gone(orchestrator, "stopping"), WAIT)
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == stats["completed_tasks"] == 1
    assert stats["running_tasks"] == stats["pending_tasks"] == 0
    assert stats["registered_agents"] == 1


# ---------------------------------------------------------------- ack after the final event


class _FaultyFinalEvent:
    """An agent's bus (the real one underneath), except that its first
    ``TaskFinished`` publish fails as an unconfirmed publish does (``fail_once``),
    or every one is confirmed only after ``delay`` seconds. It records the task
    deliveries the agent gets."""

    def __init__(self, bus: CommunicationBus, *, fail_once: bool = False, delay: float = 0.0):
        self._bus = bus
        self.fail_once = fail_once
        self.delay = delay
        self.failed: list[TaskFinished] = []
        self.deliveries: list[tuple[str, bool]] = []
        self.finishing = asyncio.Event()
        """Set when a ``TaskFinished`` publish begins."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_event(self, event: Any) -> None:
        if isinstance(event, TaskFinished):
            self.finishing.set()
            if self.fail_once and not self.failed:
                self.failed.append(event)
                raise BusConnectionError("injected: the final event was not confirmed")
            await asyncio.sleep(self.delay)
        await self._bus.publish_event(event)

    async def open_task_consumer(self, consumer_id: str, *, prefetch: int, handler: Any) -> Any:
        async def recording(delivery: TaskDelivery) -> None:
            self.deliveries.append((parse_task(delivery.body).task_id, delivery.redelivered))
            await handler(delivery)

        return await self._bus.open_task_consumer(consumer_id, prefetch=prefetch, handler=recording)


async def _start_agent_on(
    harness: Harness, bus: _FaultyFinalEvent, agent_id: str, handler: Any, **settings: Any
) -> Agent:
    agent = Agent(agent_id, ["work"], 1, heartbeat_interval=0.3, **settings)
    agent.add_handler("*", handler)
    await agent.start(bus)  # type: ignore[arg-type]
    harness.agents.append(agent)
    await harness.wait_agents(agent_id, timeout=WAIT)
    return agent


async def test_task_is_acked_only_after_its_final_event_is_confirmed(harness: Harness) -> None:
    # Given an agent whose first final event fails to publish
    orchestrator = await harness.start_orchestrator()
    runs: list[int] = []

    async def handler(ctx: TaskContext) -> dict:
        runs.append(ctx.attempt)
        return {"run": len(runs)}

    bus = harness.new_bus()
    await bus.connect()  # before wrapping: the agent uses it as it is
    faulty = _FaultyFinalEvent(bus, fail_once=True)
    agent = await _start_agent_on(harness, faulty, "worker", handler)

    # When a task runs on it
    task_id = await _submit(orchestrator)
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)

    # Then its delivery was not acknowledged but requeued, ran again, and completed once
    assert [e.outcome for e in faulty.failed] == ["completed"]
    assert faulty.deliveries == [(task_id, False), (task_id, True)]
    assert runs == [1, 1]  # the same attempt, twice
    assert status["status"] == "completed"
    assert status["result"] == {"run": 2}
    assert status["retry_count"] == 0
    stats = await orchestrator.get_stats()
    assert stats["tasks_created"] == 1
    assert stats["tasks_completed"] == stats["completed_tasks"] == 1
    assert stats["tasks_failed"] == 0
    assert stats["running_tasks"] == stats["pending_tasks"] == 0
    assert agent.counters.completed == 2

    async def settled() -> bool:  # (it settles the delivery once the event is out)
        return agent.counters.running == 0

    await wait_until(settled, WAIT)


async def test_stop_reports_and_acks_a_finished_task_before_it_closes(harness: Harness) -> None:
    # Given an agent whose final events take a while to be confirmed, running a
    # task that ends once the agent stops, and a second agent
    orchestrator = await harness.start_orchestrator()
    agents: dict[str, Agent] = {}

    async def handler(ctx: TaskContext) -> dict:
        await agents[ctx.agent_id].wait_stopping()
        return {"agent": ctx.agent_id}

    bus = harness.new_bus()
    await bus.connect()
    slow = _FaultyFinalEvent(bus, delay=0.5)
    agents["first"] = await _start_agent_on(harness, slow, "first", handler)
    task_id = await _submit(orchestrator)
    await wait_until(lambda: running_on(orchestrator, task_id, "first"), WAIT)
    agents["second"] = await harness.start_agent("second", ["work"], 1, handler)

    # When the first stops
    await asyncio.wait_for(agents["first"].stop(drain_timeout=WAIT), WAIT)

    # Then it reported and acknowledged the task before closing: no other agent got it
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "first"
    assert slow.deliveries == [(task_id, False)]
    assert agents["first"].counters.running == 0
    await wait_until(lambda: gone(orchestrator, "first"), WAIT)
    assert agents["second"].counters.received == 0
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == 1
    assert stats["running_tasks"] == stats["pending_tasks"] == 0


async def test_stop_acks_a_skipped_cancelled_task_before_it_closes(harness: Harness) -> None:
    # Given a task cancelled while queued, and an agent that skips it when it
    # arrives, whose "skipped" event takes a while to be confirmed
    orchestrator = await harness.start_orchestrator()
    cancelled = await _submit(orchestrator)
    assert await orchestrator.cancel_task(cancelled) is True
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.task_id)
        return {"agent": ctx.agent_id}

    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    slow = _FaultyFinalEvent(bus, delay=1.0)
    first = await _start_agent_on(harness, slow, "first", handler)

    # When it stops while that event is on its way
    await asyncio.wait_for(slow.finishing.wait(), WAIT)
    await asyncio.wait_for(first.stop(drain_timeout=WAIT), WAIT)

    # Then it acknowledged the skipped task before closing: the next agent on
    # that queue gets only what comes after it (a requeued message goes back ahead)
    assert slow.deliveries == [(cancelled, False)]
    other = harness.new_bus()
    if not other.is_connected:
        await other.connect()
    recording = _FaultyFinalEvent(other)
    await _start_agent_on(harness, recording, "second", handler)
    last = await _submit(orchestrator)
    status = await orchestrator.wait_for_task(last, timeout=WAIT)
    assert status["status"] == "completed"
    assert recording.deliveries == [(last, False)]
    assert ran == [last]
    assert first.counters.received == 0


# ---------------------------------------------------------------- attempts meeting here


class _HeldEvents(_FaultyFinalEvent):
    """An agent's bus whose ``TaskStarted`` publishes (``hold_started``), or whose
    ``TaskFinished`` publishes of attempt ``hold_finished``, wait until ``gate``
    is set (a cancel of the publishing job ends the wait)."""

    def __init__(
        self, bus: CommunicationBus, *, hold_started: bool = False, hold_finished: int | None = None
    ) -> None:
        super().__init__(bus)
        self.hold_started = hold_started
        self.hold_finished = hold_finished
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()
        """Set when a held publish begins."""

    async def publish_event(self, event: Any) -> None:
        held = (self.hold_started and isinstance(event, TaskStarted)) or (
            isinstance(event, TaskFinished) and event.attempt == self.hold_finished
        )
        if held:
            self.holding.set()
            await self.gate.wait()
        await super().publish_event(event)


async def test_a_cancel_while_the_agent_says_it_started_is_reported_cancelled(
    harness: Harness,
) -> None:
    # Given an agent whose TaskStarted publishes wait, and a task it takes
    orchestrator = await harness.start_orchestrator()
    ran: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        ran.append(ctx.task_id)
        return {}

    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    held = _HeldEvents(bus, hold_started=True)
    # (its start told before its handler runs, as every start of a slower task is)
    agent = await _start_agent_on(harness, held, "worker", handler, report_started_after=None)
    task_id = await _submit(orchestrator)
    await asyncio.wait_for(held.holding.wait(), WAIT)

    # When it is cancelled while the agent says it started
    assert await orchestrator.cancel_task(task_id) is True

    # Then the agent reports it cancelled and acknowledges it (it is not given
    # back to come again): a task queued after it is the next delivery
    async def reported() -> bool:
        return agent.counters.cancelled == 1

    await wait_until(reported, WAIT)
    held.hold_started = False
    held.gate.set()
    last = await _submit(orchestrator)
    status = await orchestrator.wait_for_task(last, timeout=WAIT)
    assert status["status"] == "completed"
    assert held.deliveries == [(task_id, False), (last, False)]
    assert ran == [last]
    assert (await orchestrator.get_task_status(task_id))["status"] == "cancelled"


async def test_a_new_attempt_runs_while_the_old_one_is_still_reporting(
    harness: Harness,
) -> None:
    # Given an agent with two slots whose report of a task's first attempt
    # hangs, so that the orchestrator times that attempt out and retries it
    orchestrator = await harness.start_orchestrator()
    attempts: list[int] = []

    async def handler(ctx: TaskContext) -> dict:
        attempts.append(ctx.attempt)
        return {"attempt": ctx.attempt}

    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    held = _HeldEvents(bus, hold_finished=1)
    agent = Agent("worker", ["work"], 2, heartbeat_interval=0.3)
    agent.add_handler("*", handler)
    await agent.start(held)  # type: ignore[arg-type]
    harness.agents.append(agent)
    await harness.wait_agents("worker", timeout=WAIT)
    try:
        task_id = await _submit(orchestrator, timeout=0.5, max_retries=1)
        await asyncio.wait_for(held.holding.wait(), WAIT)

        # When the second attempt comes while the first still reports (still here)
        status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    finally:
        held.gate.set()

    # Then it is not dropped as a duplicate: it runs and completes the task
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 2}
    assert attempts == [1, 2]
    assert [d[0] for d in held.deliveries] == [task_id, task_id]

    async def settled() -> bool:
        return agent.counters.running == 0

    await wait_until(settled, WAIT)


# ---------------------------------------------------------------- handlers raising BaseException


@pytest.mark.parametrize("kind", ["sync_exit", "async_keyboard_interrupt"])
async def test_a_handler_raising_a_base_exception_fails_its_task_not_the_agent(
    harness: Harness, kind: str
) -> None:
    # Given an agent with one slot whose handler, for the first task, calls
    # sys.exit(3) (a sync handler) or raises KeyboardInterrupt (an async one)
    orchestrator = await harness.start_orchestrator()

    def sync_handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("boom"):
            sys.exit(3)
        return {"after": True}

    async def async_handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("boom"):
            raise KeyboardInterrupt("pressed")
        return {"after": True}

    handler = sync_handler if kind == "sync_exit" else async_handler
    agent = await harness.start_agent("worker", ["work"], 1, handler)

    # When that task runs
    boom = await _submit(orchestrator, payload={"boom": True}, max_retries=0)
    status = await orchestrator.wait_for_task(boom, timeout=WAIT)

    # Then it failed, with an error naming the exception
    assert status["status"] == "failed"
    expected = "SystemExit: 3" if kind == "sync_exit" else "KeyboardInterrupt: pressed"
    assert status["error_message"] == expected

    # And the agent goes on: its only slot is free, and the next task completes there
    after = await _submit(orchestrator)
    status = await orchestrator.wait_for_task(after, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"] == {"after": True}
    assert status["assigned_agent"] == "worker"
    assert agent.counters.failed == 1
    assert agent.counters.completed == 1

    async def settled() -> bool:
        return agent.counters.running == 0 and not agent.held_attempts

    await wait_until(settled, WAIT)
    assert agent.counters.max_running == 1


# ---------------------------------------------------------------- an attempt until it is settled


class _RecordingQueues(_FaultyFinalEvent):
    """Records, besides the deliveries, the queue key each came from."""

    def __init__(self, bus: CommunicationBus) -> None:
        super().__init__(bus)
        self.queue_keys: list[str] = []

    async def open_task_consumer(self, consumer_id: str, *, prefetch: int, handler: Any) -> Any:
        async def recording(delivery: TaskDelivery) -> None:
            self.queue_keys.append(delivery.queue_key)
            await handler(delivery)

        return await super().open_task_consumer(consumer_id, prefetch=prefetch, handler=recording)


async def test_a_redelivery_of_an_attempt_whose_handler_still_ends_is_a_duplicate(
    harness: Harness,
) -> None:
    # Given an agent with two slots, and a task whose async handler ignores its
    # cancel and still runs after the agent reported the task's timeout (an
    # orchestrator patient enough that only the agent reports it)
    orchestrator = await harness.start_orchestrator(PATIENT)
    release = asyncio.Event()
    runs: list[tuple[str, int]] = []
    messages: list[Any] = []

    async def handler(ctx: TaskContext) -> dict:
        runs.append((ctx.task_id, ctx.attempt))
        if ctx.payload.get("deaf"):
            messages.append(ctx.message)
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
            return {"late": True}
        return {"after": True}

    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    recording = _RecordingQueues(bus)
    agent = Agent("worker", ["work"], 2, heartbeat_interval=0.3)
    agent.add_handler("*", handler)
    await agent.start(recording)  # type: ignore[arg-type]
    harness.agents.append(agent)
    await harness.wait_agents("worker", timeout=WAIT)
    try:
        deaf = await _submit(orchestrator, payload={"deaf": True}, timeout=0.5, max_retries=0)
        status = await orchestrator.wait_for_task(deaf, timeout=WAIT)
        assert status["status"] == "timeout"

        # When the same attempt is delivered again meanwhile (as the broker
        # does when the channel that had it is lost before it is settled)
        await orchestrator.bus.publish_task(
            messages[0], queue_key=recording.queue_keys[0], priority=0
        )

        async def handled() -> bool:
            # acknowledged as a duplicate (only the first is unsettled), or run
            return len(recording.deliveries) == 2 and (agent.unsettled == 1 or len(runs) == 2)

        await wait_until(handled, WAIT)

        # Then it is acknowledged as a duplicate, not run beside the old handler
        assert recording.deliveries == [(deaf, False), (deaf, False)]
        assert runs == [(deaf, 1)]
        assert agent.counters.received == 1
    finally:
        release.set()

    # And once the old handler ends, nothing of that attempt is left here
    after = await _submit(orchestrator)
    status = await orchestrator.wait_for_task(after, timeout=WAIT)
    assert status["status"] == "completed"

    async def settled() -> bool:
        return agent.counters.running == 0 and not agent.held_attempts and not agent.unsettled

    await wait_until(settled, WAIT)
    assert runs == [(deaf, 1), (after, 1)]
    assert (await orchestrator.get_task_status(deaf))["status"] == "timeout"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_no_attempt_stays_known_after_its_delivery_is_settled(
    harness: Harness, kind: str
) -> None:
    # Given an agent with two slots, and tasks that complete, fail, are
    # cancelled, or time out with a handler that goes on past its timeout
    orchestrator = await harness.start_orchestrator(PATIENT)
    outcomes = ["completed", "failed", "timeout", "completed", "cancelled", "completed"]
    gates = [threading.Event() for _ in outcomes]

    def work(ctx: TaskContext) -> dict:
        outcome = ctx.payload["outcome"]
        if outcome == "failed":
            raise RuntimeError("boom")
        if outcome in ("timeout", "cancelled"):
            gates[ctx.payload["n"]].wait(WAIT)  # deaf to its interruption until then
        return {"n": ctx.payload["n"]}

    async def async_handler(ctx: TaskContext) -> dict:
        if ctx.payload["outcome"] in ("timeout", "cancelled"):
            while not gates[ctx.payload["n"]].is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)
        return work(ctx)

    agent = await harness.start_agent(
        "worker", ["work"], 2, async_handler if kind == "async" else work
    )
    try:
        ids = []
        for n, outcome in enumerate(outcomes):
            timeout = 0.5 if outcome == "timeout" else 300.0
            task_id = await _submit(
                orchestrator, payload={"outcome": outcome, "n": n}, timeout=timeout, max_retries=0
            )
            ids.append(task_id)
            if outcome == "cancelled":
                await wait_until(lambda t=task_id: running_on(orchestrator, t, "worker"), WAIT)
                assert await orchestrator.cancel_task(task_id) is True
            if outcome in ("timeout", "cancelled"):
                status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
                assert status["status"] == outcome
                gates[n].set()  # its handler ends
        # When every one of them has ended
        for task_id, outcome in zip(ids, outcomes, strict=True):
            status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
            assert status["status"] == outcome
    finally:
        for gate in gates:
            gate.set()

    # Then once their deliveries are settled, no attempt is left known here
    async def settled() -> bool:
        return agent.counters.running == 0 and not agent.held_attempts and not agent.unsettled

    await wait_until(settled, WAIT)
    assert agent.counters.received == len(outcomes)
    assert agent.counters.max_running <= 2


# ---------------------------------------------------------------- every delivery settled once


class _CountedDelivery(TaskDelivery):
    """A delivery that records how it is settled (the broker's own consumer
    settles it through these methods too: a step aside's requeue, a detach's
    ack), and whose body is not a task message when its payload says
    ``corrupt``."""

    def __init__(self, delivery: TaskDelivery, calls: list[str]) -> None:
        self._delivery = delivery
        self._calls = calls
        corrupt = parse_task(delivery.body).payload.get("corrupt")
        self.body = b"not a task message" if corrupt else delivery.body
        self.queue_key = delivery.queue_key
        self.redelivered = delivery.redelivered

    async def ack(self) -> None:
        self._calls.append("ack")
        await self._delivery.ack()

    async def requeue(self) -> None:
        self._calls.append("requeue")
        await self._delivery.requeue()

    async def dead_letter(self, reason: str) -> None:
        self._calls.append("dead_letter")
        await self._delivery.dead_letter(reason)


class _CountingSettles(_FaultyFinalEvent):
    """Hands the agent ``_CountedDelivery``s: ``settles`` lists, per delivery
    in the order they came, its task id and how it was settled."""

    def __init__(self, bus: CommunicationBus) -> None:
        super().__init__(bus)
        self.settles: list[tuple[str, list[str]]] = []

    async def open_task_consumer(self, consumer_id: str, *, prefetch: int, handler: Any) -> Any:
        async def counting(delivery: TaskDelivery) -> None:
            calls: list[str] = []
            self.settles.append((parse_task(delivery.body).task_id, calls))
            await handler(_CountedDelivery(delivery, calls))

        return await super().open_task_consumer(consumer_id, prefetch=prefetch, handler=counting)


async def test_every_delivery_is_settled_exactly_once(harness: Harness) -> None:
    # Given a second agent kept busy (so that a retry avoiding the first has
    # somewhere else to go, but never does), a task cancelled while queued, and
    # an agent with one slot that acknowledges tasks longer than 1000 s once
    # they start
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("block"):
            await gate.wait()
        if ctx.payload.get("fail") and ctx.attempt == 1:
            raise RuntimeError("boom")
        if ctx.payload.get("hang") and ctx.agent_id == "worker":
            await asyncio.sleep(3600)
        return {}

    await harness.start_agent("busy", ["work"], 1, handler)
    blocker = await _submit(orchestrator, payload={"block": True})
    await wait_until(lambda: running_on(orchestrator, blocker, "busy"), WAIT)
    skipped = await _submit(orchestrator)
    assert await orchestrator.cancel_task(skipped) is True
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    counting = _CountingSettles(bus)
    agent = Agent("worker", ["work"], 1, heartbeat_interval=0.3, long_task_after=1000.0)
    agent.add_handler("*", handler)
    await agent.start(counting)  # type: ignore[arg-type]
    harness.agents.append(agent)
    await harness.wait_agents("worker", timeout=WAIT)
    try:
        # When it gets tasks of every kind of ending, one after the other:
        # completed; failed, then retried avoiding it (handed back until it runs
        # it after all); not a task message; long (acknowledged when it
        # starts); and one running when it stops
        completed = await _submit(orchestrator)
        failed = await _submit(orchestrator, payload={"fail": True}, max_retries=1)
        corrupt = await _submit(orchestrator, payload={"corrupt": True}, max_retries=0)
        long = await _submit(orchestrator, timeout=1200)
        for task_id, expected in [
            (completed, "completed"),
            (failed, "completed"),
            (corrupt, "failed"),
            (long, "completed"),
        ]:
            status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
            assert status["status"] == expected
        hanging = await _submit(orchestrator, payload={"hang": True})
        await wait_until(lambda: running_on(orchestrator, hanging, "worker"), WAIT)
        await asyncio.wait_for(agent.stop(drain_timeout=0.05), WAIT)
    finally:
        gate.set()

    # Then each delivery was settled once: the skipped one, the ended ones and
    # the long one (at its start) acknowledged, the retry handed back three
    # times, the unreadable one dead-lettered, the running one given back
    settles = [(task_id, calls) for task_id, calls in counting.settles if task_id != failed]
    assert settles == [
        (skipped, ["ack"]),
        (completed, ["ack"]),
        (corrupt, ["dead_letter"]),
        (long, ["ack"]),
        (hanging, ["requeue"]),
    ]
    retried = [calls for task_id, calls in counting.settles if task_id == failed]
    assert retried == [["ack"], ["requeue"], ["requeue"], ["requeue"], ["ack"]]
    assert agent.unsettled == 0
    assert not agent.held_attempts
    assert agent.counters.running == 0
    status = await orchestrator.get_task_status(corrupt)
    assert status["error_message"].startswith("rejected: agent worker:")
