"""Agents' own events queues: opened again when opening failed, kept when an
agent removed registers again (orchestrator/agent_queues.py).

An agent's results reach the orchestrator only through its own events queue:
one that failed to open (a broker blip, a channel error) must be opened by
the watch, not only by the next leader, or the agent's tasks time out. And
an agent removed and registered again while its old queue is being closed
must not hold up every event until that close gives up (``CLOSE_WAIT``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aio_pika
import pytest

from broker import (
    AgentAnnounced,
    AgentLeft,
    BusConnectionError,
    CommunicationBus,
    MemoryBus,
    RabbitMQBus,
    Subscription,
)
from broker.bus import CLOSE_WAIT
from orchestrator import MemoryStore, OrchestratorSettings, TaskOrchestrator
from orchestrator.agent_queues import OPENED_AT_ONCE, REOPENED_PER_ROUND, AgentQueues
from tests.harness import FAST, Harness, wait_until

WAIT = 15.0


class _OpenFails:
    """A bus whose next consumes of the events queue of each agent in
    ``fail_next`` (so many times) fail after the declare went through (the
    channel closed under it): the queue is bound and keeps what the agent
    publishes, but nobody reads it."""

    fail_next: dict[str, int]
    failed: list[str]

    async def subscribe_agent_events(self, agent_id: str, handler: Any, **kwargs: Any):
        subscription: Subscription = await super().subscribe_agent_events(  # type: ignore[misc]
            agent_id, handler, **kwargs
        )
        if self.fail_next.get(agent_id, 0) > 0:
            self.fail_next[agent_id] -= 1
            self.failed.append(agent_id)
            await subscription.close()
            raise BusConnectionError("channel closed by the broker (injected)")
        return subscription


class _FailingMemoryBus(_OpenFails, MemoryBus):
    pass


class _FailingRabbitMQBus(_OpenFails, RabbitMQBus):
    pass


async def _orchestrator_on(
    harness: Harness, bus: CommunicationBus, settings: OrchestratorSettings = FAST, **kwargs: Any
) -> TaskOrchestrator:
    """An orchestrator on a bus of the test's (closed with the harness)."""
    if isinstance(bus, MemoryBus):
        harness.use_memory_bus(bus)
    elif bus not in harness.buses:
        harness.buses.append(bus)
    if not bus.is_connected:
        await bus.connect()
    harness.orchestrator = TaskOrchestrator(bus, settings=settings, **kwargs)
    await harness.orchestrator.start()
    return harness.orchestrator


async def _true(value: bool) -> bool:
    return value


def _failing_bus(harness: Harness, **fail_next: int) -> _OpenFails:
    if harness.bus_kind == "memory":
        bus: _OpenFails = _FailingMemoryBus(settings=harness.settings)
    else:
        bus = _FailingRabbitMQBus(settings=harness.settings)
    bus.fail_next, bus.failed = fail_next, []
    return bus


async def test_an_agent_queue_that_failed_to_open_is_opened_by_the_watch(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator")
    # Given an orchestrator whose first consume of an agent's events queue fails
    bus = _failing_bus(harness, worker=1)
    orchestrator = await _orchestrator_on(harness, bus)  # type: ignore[arg-type]

    # When an agent registers (its queue declared, but not consumed) and runs a task
    await harness.start_agent("worker", [], 1)
    assert bus.failed == ["worker"]
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={"n": 1}, max_retries=0, timeout=60
    )

    # Then the watch opens the queue and the agent's result is recorded, on its
    # first attempt (before, it waited in the queue until the task timed out)
    final = await orchestrator.wait_for_task(task_id, WAIT)
    assert final["status"] == "completed", final
    assert final["retry_count"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot follow agent worker's events queue" in m for m in messages)
    assert any("following agent worker's events queue again" in m for m in messages)


async def test_an_agent_queue_that_failed_to_open_on_taking_the_lead_is_opened_by_the_watch(
    harness: Harness,
) -> None:
    # Given a registered agent, and an orchestrator stopped and started again on
    # its store, whose first two consumes of that agent's queue fail (on taking
    # the lead, and when the agent announces itself again)
    bus = _failing_bus(harness)
    store = MemoryStore()
    orchestrator = await _orchestrator_on(harness, bus, store=store)  # type: ignore[arg-type]
    await harness.start_agent("worker", [], 1)
    await orchestrator.stop()
    bus.fail_next["worker"] = 2
    orchestrator = await _orchestrator_on(harness, bus, store=store)  # type: ignore[arg-type]
    assert bus.failed == ["worker"]
    await wait_until(lambda: _true(len(bus.failed) == 2), WAIT)

    # When the agent runs a task
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={}, max_retries=0, timeout=60
    )

    # Then its result is recorded (before, only the next leader would read it)
    final = await orchestrator.wait_for_task(task_id, WAIT)
    assert final["status"] == "completed", final
    assert final["retry_count"] == 0


@pytest.mark.rabbitmq
async def test_an_agent_queue_refused_by_a_channel_error_is_opened_once_the_broker_lets_it(
    broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real channel error: the agent's queue exists with other arguments
    (PRECONDITION_FAILED), until someone deletes it."""
    from broker import BusSettings

    caplog.set_level(logging.INFO, logger="orchestrator")
    harness = Harness("rabbitmq", BusSettings(broker_url=broker_url, prefix=prefix))
    try:
        orchestrator = await harness.start_orchestrator()
        name = orchestrator.bus.topology.agent_events_queue("worker")
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True)  # (no length limit)

            # Given an agent registered while its queue could not be declared
            await harness.start_agent("worker", [], 1)

            async def refused() -> bool:
                return any(
                    "cannot follow agent worker's events queue" in r.getMessage()
                    for r in caplog.records
                )

            await wait_until(refused, WAIT)

            # When the queue in the way is deleted
            channel = await connection.channel()
            await channel.queue_delete(name)

        # Then the watch opens the agent's queue, and its results are recorded
        async def recovered() -> bool:
            return any(
                "following agent worker's events queue again" in r.getMessage()
                for r in caplog.records
            )

        await wait_until(recovered, WAIT)
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={}, max_retries=0, timeout=60
        )
        final = await orchestrator.wait_for_task(task_id, WAIT)
        assert final["status"] == "completed", final
    finally:
        await harness.close()


async def _backlog(harness: Harness, bus: CommunicationBus, agent_id: str, count: int) -> None:
    """``count`` task events of ``agent_id`` for a task nobody knows, as fast as can be."""
    body: dict[str, Any] = {"v": 1, "kind": "task.progress", "agent_id": agent_id}
    body |= {"task_id": "nobody-knows", "attempt": 1, "progress": 0.5}
    key = f"task.progress.{agent_id}"
    if isinstance(bus, MemoryBus):
        for _ in range(count):
            await bus.publish_raw(bus.topology.events_exchange, key, json.dumps(body).encode())
        return
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(bus.topology.events_exchange, ensure=False)
        for _ in range(count):
            message = aio_pika.Message(json.dumps(body).encode(), user_id=bus.user or "guest")
            await exchange.publish(message, routing_key=key)
        # (a confirmed publish after them: they are all queued when it returns)
        confirmed = await connection.channel()
        exchange = await confirmed.get_exchange(bus.topology.events_exchange, ensure=False)
        message = aio_pika.Message(json.dumps(body).encode(), user_id=bus.user or "guest")
        await exchange.publish(message, routing_key=key)


async def test_an_agent_registered_again_while_its_old_queue_drains_holds_up_no_event(
    harness: Harness,
) -> None:
    # Given an agent whose events queue holds a backlog when the orchestrator
    # starts, and another agent (heartbeats are not what this is about: the
    # timeout is long)
    settings = FAST.model_copy(update={"heartbeat_timeout": 60.0})
    store = MemoryStore()
    orchestrator = await harness.start_orchestrator(settings, store=store)
    await orchestrator.register_agent("worker", [], 1)
    await harness.start_agent("other", ["other"], 1)
    await orchestrator.stop()
    bus = await harness.connected_bus()
    await _backlog(harness, bus, "worker", 5000)
    orchestrator = await harness.start_orchestrator(settings, store=store)

    # When it is removed while that backlog drains, and announces itself at
    # once, and the other agent runs a task meanwhile
    await orchestrator.unregister_agent("worker")
    await bus.publish_event(
        AgentAnnounced(agent_id="worker", capabilities=[], max_concurrent_tasks=1)
    )
    started = time.monotonic()
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={}, required_capabilities=["other"]
    )

    # Then the other agent's result is recorded without waiting for worker's old
    # consumer to close (the registration waited for it under the events lock:
    # every event waited CLOSE_WAIT)
    final = await orchestrator.wait_for_task(task_id, WAIT)
    took = time.monotonic() - started
    assert final["status"] == "completed", final
    assert took < CLOSE_WAIT / 2, f"another agent's result recorded after {took:.2f}s"

    # and worker is registered, its queue kept and still followed: its goodbye
    # (published now, behind what is left of the backlog) is heard
    async def registered() -> bool:
        return "worker" in {a.agent_id for a in await orchestrator.get_agents()}

    assert await registered()
    await bus.publish_event(AgentLeft(agent_id="worker"))

    async def left() -> bool:
        return not await registered()

    await wait_until(left, WAIT)


class _Refusing:
    """Just what AgentQueues asks of a bus, refusing every consume while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.tried: list[str] = []

    async def subscribe_agent_events(self, agent_id: str, handler: Any, **kwargs: Any):
        self.tried.append(agent_id)
        if self.down:
            raise BusConnectionError("broker unreachable (injected)")
        return _Open()

    async def delete_agent_events(self, agent_id: str) -> None:
        pass


class _Open(Subscription):
    async def close(self) -> None:
        pass


async def test_each_retry_opens_a_bounded_number_of_queues_and_the_failed_go_last() -> None:
    # Given 40 agents followed whose queues the broker refused
    bus = _Refusing()
    queues = AgentQueues(bus, lambda event: _true(True))  # type: ignore[arg-type]
    agents = [f"agent-{n}" for n in range(40)]
    await queues.resume(agents)
    assert queues.unopened == agents

    # When the watch retries while the broker still refuses them
    bus.tried.clear()
    assert await queues.retry() == 0

    # Then one round tried REOPENED_PER_ROUND of them, which then wait behind the others
    assert bus.tried == agents[:REOPENED_PER_ROUND]
    assert queues.unopened == agents[REOPENED_PER_ROUND:] + agents[:REOPENED_PER_ROUND]

    # and once the broker takes them, the rounds open them all, a bounded number each
    bus.down = False
    rounds = 0
    while queues.unopened:
        assert await queues.retry() <= REOPENED_PER_ROUND
        rounds += 1
    assert rounds == -(-len(agents) // REOPENED_PER_ROUND)
    assert all(agent in queues for agent in agents)
    # and a removed agent's queue is not opened again
    queues.close("agent-0")
    assert "agent-0" not in queues and "agent-0" not in queues.unopened
    await queues.stop()


class _SlowToClose(Subscription):
    def __init__(self, closing: asyncio.Event) -> None:
        self.closing = closing

    async def close(self) -> None:
        await self.closing.wait()


async def test_an_agent_registered_again_keeps_its_queue_being_closed() -> None:
    # Given an agent followed whose consumer takes long to close (an event of its
    # backlog still being handled)
    bus = _Refusing()
    bus.down = False
    closing = asyncio.Event()
    bus.subscribe_agent_events = _opens(bus, lambda: _SlowToClose(closing))  # type: ignore[method-assign]
    deleted: list[str] = []
    bus.delete_agent_events = _records(deleted)  # type: ignore[method-assign]
    queues = AgentQueues(bus, lambda event: _true(True))  # type: ignore[arg-type]
    await queues.resume(["worker"])

    # When it is removed and registered again before that close is done
    queues.close("worker")
    await asyncio.wait_for(queues.open("worker"), 1)  # (it does not wait for the close)

    # Then once closed, its queue is consumed again, and never deleted
    closing.set()
    await wait_until(lambda: _true("worker" in queues), WAIT)
    assert bus.tried == ["worker", "worker"]
    assert deleted == []
    # and removed for good, it is deleted
    queues.close("worker")
    await queues.stop()
    assert deleted == ["worker"]


def _opens(bus: _Refusing, make: Any) -> Any:
    async def subscribe_agent_events(agent_id: str, handler: Any, **kwargs: Any):
        bus.tried.append(agent_id)
        return make()

    return subscribe_agent_events


def _records(deleted: list[str]) -> Any:
    async def delete_agent_events(agent_id: str) -> None:
        deleted.append(agent_id)

    return delete_agent_events


class _Gated(_Refusing):
    """Opens every queue once ``gate`` is set, counting the opens in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def subscribe_agent_events(self, agent_id: str, handler: Any, **kwargs: Any):
        self.tried.append(agent_id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return _Open()


async def test_taking_the_lead_opens_the_known_agents_queues_a_bounded_number_at_a_time() -> None:
    # Given 100 known agents, and a broker slow to open their queues
    bus = _Gated()
    queues = AgentQueues(bus, lambda event: _true(True))  # type: ignore[arg-type]
    agents = [f"agent-{n}" for n in range(100)]

    # When the orchestrator takes the lead
    resuming = asyncio.get_running_loop().create_task(queues.resume(agents))

    # Then OPENED_AT_ONCE of them are being opened at once, in the order known
    async def busy() -> bool:
        return bus.in_flight == OPENED_AT_ONCE

    await wait_until(busy, WAIT)
    assert bus.tried == agents[:OPENED_AT_ONCE]
    # and once the broker answers, every queue is open, never more opening at once
    bus.gate.set()
    await asyncio.wait_for(resuming, WAIT)
    assert all(agent in queues for agent in agents)
    assert bus.most_in_flight == OPENED_AT_ONCE
    await queues.stop()


async def test_a_known_agent_announced_does_not_wait_for_its_queue_to_open() -> None:
    # Given a known agent whose queue did not open on taking the lead
    bus = _Refusing()
    queues = AgentQueues(bus, lambda event: _true(True))  # type: ignore[arg-type]
    await queues.resume(["worker"])
    assert queues.unopened == ["worker"]

    # When it announces itself (under the events lock) while the broker is slow
    slow = _Gated()
    bus.subscribe_agent_events = slow.subscribe_agent_events  # type: ignore[method-assign]
    await asyncio.wait_for(queues.open("worker"), 1)  # (it does not wait for the open)

    # Then its queue is opened in the background, once the broker answers
    async def opening() -> bool:
        return slow.in_flight == 1

    await wait_until(opening, WAIT)
    assert "worker" not in queues
    slow.gate.set()
    await wait_until(lambda: _true("worker" in queues), WAIT)
    await queues.stop()


async def test_a_new_agent_announced_has_its_queue_open_before_it_is_told_anything() -> None:
    # Given an orchestrator leading, and an agent it never heard of
    bus = _Refusing()
    bus.down = False
    queues = AgentQueues(bus, lambda event: _true(True))  # type: ignore[arg-type]
    await queues.resume([])

    # When the agent announces itself, its queue is open once that returns
    # (before the agent hears of any task queue: its results have a queue)
    await queues.open("newcomer")
    assert "newcomer" in queues
    await queues.stop()
