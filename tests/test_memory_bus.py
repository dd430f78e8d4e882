"""What only the in-process bus offers: ``join()`` to drain it, ``publish_raw()`` to
send it what no model would let through.

``join`` is what lets a test wait for a state (everything published has been
handled) instead of polling for it, as Dramatiq's ``StubBroker.join()`` and
taskiq's ``wait_all()`` do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker import (
    BusSettings,
    DeadLetter,
    Event,
    MemoryBus,
    Reply,
    Request,
    TaskDelivery,
    TaskFinished,
    TaskMessage,
    TaskStarted,
    parse_task,
)
from broker.rpc import StatsRequest

DRAIN = 5.0
"""Longest a join may take in these tests: longer means it hangs."""


@pytest.fixture
async def bus(prefix: str) -> AsyncIterator[MemoryBus]:
    memory = MemoryBus(settings=BusSettings(prefix=prefix))
    await memory.connect()
    try:
        yield memory
    finally:
        await memory.close()


def task(task_id: str, attempt: int = 1) -> TaskMessage:
    return TaskMessage(
        task_id=task_id,
        attempt=attempt,
        name=task_id,
        task_type="job",
        payload={},
        priority="medium",
        timeout=30.0,
        estimated_duration=1.0,
    )


async def run_what_is_runnable() -> None:
    """Let every coroutine that can go on do so (the in-process bus needs no
    wall-clock time: a join that would return has returned after this)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def drained(bus: MemoryBus, *, delayed: bool = False) -> float:
    """Seconds ``join`` took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(DRAIN):
        await bus.join(delayed=delayed)
    return loop.time() - started


async def test_join_returns_once_every_task_is_handled_and_acknowledged(bus: MemoryBus) -> None:
    # Given an agent that takes a moment per task, two at a time
    handled: list[str] = []

    async def work(delivery: TaskDelivery) -> None:
        await asyncio.sleep(0.01)
        handled.append(parse_task(delivery.body).task_id)
        await delivery.ack()

    consumer = await bus.open_task_consumer("agent", prefetch=2, handler=work)
    await consumer.consume(["k"])

    # When ten tasks are published and the bus is joined
    for i in range(10):
        await bus.publish_task(task(f"t{i}"), queue_key="k", priority=1)
    await drained(bus)

    # Then every one was handled, and none waits
    assert sorted(handled) == sorted(f"t{i}" for i in range(10))
    assert await bus.queue_depth("k") == 0


async def test_join_waits_for_a_delivery_to_be_settled(bus: MemoryBus) -> None:
    # Given an agent holding a task it has not settled (its handler returned)
    held: list[TaskDelivery] = []

    async def hold(delivery: TaskDelivery) -> None:
        held.append(delivery)

    consumer = await bus.open_task_consumer("agent", prefetch=1, handler=hold)
    await consumer.consume(["k"])
    await bus.publish_task(task("t"), queue_key="k", priority=1)

    # When the bus is joined
    join = asyncio.create_task(bus.join())
    await run_what_is_runnable()

    # Then it waits until the task is acknowledged
    assert held and not join.done()
    await held[0].ack()
    async with asyncio.timeout(DRAIN):
        await join


async def test_join_covers_what_handling_publishes_in_turn(bus: MemoryBus) -> None:
    # Given an agent that reports each task finished, and an orchestrator that
    # publishes the next task of a chain of three when one finishes
    async def run(delivery: TaskDelivery) -> None:
        message = parse_task(delivery.body)
        await bus.publish_event(
            TaskFinished(task_id=message.task_id, attempt=1, agent_id="agent", outcome="completed")
        )
        await delivery.ack()

    finished: list[str] = []
    flushes = 0

    async def on_event(event: Event) -> None:
        assert isinstance(event, TaskFinished)
        finished.append(event.task_id)
        step = int(event.task_id.removeprefix("step-"))
        if step < 3:
            await bus.publish_task(task(f"step-{step + 1}"), queue_key="k", priority=1)

    async def flush() -> None:
        nonlocal flushes
        flushes += 1

    consumer = await bus.open_task_consumer("agent", prefetch=1, handler=run)
    await consumer.consume(["k"])
    await bus.subscribe_agent_events("agent", on_event, before_ack=flush)

    # When the first task is published and the bus is joined
    await bus.publish_task(task("step-1"), queue_key="k", priority=1)
    await drained(bus)

    # Then the whole chain ran, its events handled and flushed
    assert finished == ["step-1", "step-2", "step-3"]
    assert flushes >= 1


async def test_join_leaves_delayed_tasks_unless_asked_to_wait(bus: MemoryBus) -> None:
    # Given an agent, and a task published with a delay
    handled: list[str] = []

    async def work(delivery: TaskDelivery) -> None:
        handled.append(parse_task(delivery.body).task_id)
        await delivery.ack()

    consumer = await bus.open_task_consumer("agent", prefetch=1, handler=work)
    await consumer.consume(["k"])
    await bus.publish_task(task("later"), queue_key="k", priority=1, delay=0.2)

    # When the bus is joined: it returns at once, the task still on its way
    assert await drained(bus) < 0.1
    assert handled == []

    # And joined with delayed=True: it returns once the task came and was handled
    assert await drained(bus, delayed=True) >= 0.1
    assert handled == ["later"]


async def test_join_does_not_wait_for_queues_nobody_consumes(bus: MemoryBus) -> None:
    # Given a task in a queue no agent consumes, and events for an orchestrator not
    # running (in the queue of agent a, which one registered before)
    seen: list[Event] = []

    async def record(event: Event) -> None:
        seen.append(event)

    await (await bus.subscribe_agent_events("a", record)).close()
    await bus.publish_task(task("waiting"), queue_key="nobody", priority=1)
    await bus.publish_event(TaskStarted(task_id="waiting", attempt=1, agent_id="a"))

    # When the bus is joined
    await drained(bus)

    # Then they are still there for whoever comes
    assert await bus.queue_depth("nobody") == 1
    await bus.subscribe_agent_events("a", record)
    await drained(bus)
    assert [e.kind for e in seen] == ["task.started"]


async def test_join_waits_for_requests_being_answered(bus: MemoryBus) -> None:
    # Given a server that takes a moment per request
    release, received = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Reply:
        received.set()
        await release.wait()
        return Reply.success({"kind": request.kind})

    await bus.serve_requests(slow)
    client = asyncio.create_task(bus.request(StatsRequest(), timeout=DRAIN))
    await received.wait()

    # When the bus is joined: it waits for the answer
    join = asyncio.create_task(bus.join())
    await run_what_is_runnable()
    assert not join.done()
    release.set()
    async with asyncio.timeout(DRAIN):
        await join
    assert (await client).ok


async def test_bytes_published_raw_are_routed_and_dead_lettered_if_unreadable(
    bus: MemoryBus,
) -> None:
    # Given a monitor of task events and the orchestrator's dead-letter consumer
    seen: list[Event] = []
    letters: list[DeadLetter] = []

    async def record(event: Event) -> None:
        seen.append(event)

    async def record_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    await bus.subscribe_events(record, patterns=["task.#"])
    await bus.subscribe_dead_letters(record_letter)

    # When a readable and an unreadable event are put on the events exchange as bytes
    started = TaskStarted(task_id="t", attempt=1, agent_id="a")
    events = bus.topology.events_exchange
    await bus.publish_raw(events, "task.started", started.encode())
    await bus.publish_raw(events, "task.finished", b'{"kind": "task.finished"}')
    await bus.publish_raw(events, "control.ignored", b"nobody binds this key")
    await drained(bus)

    # Then the readable one is handled, the other dead-lettered with why, from where
    assert seen == [started]
    (letter,) = letters
    assert letter.body == b'{"kind": "task.finished"}'
    assert "invalid message" in letter.reason
    assert bus.dead_letters == letters


async def test_purging_a_retry_tier_loses_the_delayed_tasks_in_it(bus: MemoryBus) -> None:
    # Given an agent, and two tasks on their way through the 1 s retry tier
    handled: list[str] = []

    async def work(delivery: TaskDelivery) -> None:
        handled.append(parse_task(delivery.body).task_id)
        await delivery.ack()

    consumer = await bus.open_task_consumer("agent", prefetch=1, handler=work)
    await consumer.consume(["k"])
    for name in ("a", "b"):
        await bus.publish_task(task(name), queue_key="k", priority=1, delay=0.6)
    assert bus.arrival_bound(0.6) == 1.0

    # When that tier is purged, as a broker that drops dead-lettered messages would
    assert await bus.purge(bus.topology.retry_queue(1_000)) == 2

    # Then nothing is left to wait for (no timer of theirs), and they never arrive
    assert await drained(bus, delayed=True) < 0.1
    assert handled == []
    assert await bus.purge(bus.topology.retry_queue(250)) == 0  # a tier never used
