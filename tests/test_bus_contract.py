"""The delivery contract of ``CommunicationBus`` (see ``broker/bus.py``), on both buses.

Every test runs on the in-process ``MemoryBus`` and on a real RabbitMQ. In
memory the orchestrator, agents and monitors of a test share one bus; on
RabbitMQ each of them opens its own connection, as separate processes would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import aio_pika
import pytest

from broker import (
    MAX_PRIORITY,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    BusError,
    BusSettings,
    CancelTask,
    CommunicationBus,
    ConsumeQueues,
    Control,
    DeadLetter,
    Event,
    MemoryBus,
    MessageTooLarge,
    PublishRefused,
    RabbitMQBus,
    Reannounce,
    TaskDelivery,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TaskStarted,
    Topology,
    Unregister,
    parse_task,
)
from broker import topology as topology_module
from broker.envelope import Sender, current_sender
from tests.harness import wait_until

T = TypeVar("T")

WAIT = 5.0
"""Longest wait for something that should arrive."""

SETTLE = 0.3
"""How long to watch for a delivery that should not come."""


# --- helpers ----------------------------------------------------------------


class Buses:
    """The buses of one test, torn down at its end.

    In memory every party shares one ``MemoryBus``; on RabbitMQ each party
    (orchestrator, agent, monitor) gets its own connection.
    """

    def __init__(self, kind: str, settings: BusSettings) -> None:
        self.kind = kind
        self.settings = settings
        self.opened: list[CommunicationBus] = []
        self.queue_keys: set[str] = set()
        self.agent_ids: set[str] = {"agent-1"}
        """Agents whose events queues teardown deletes."""
        self._shared: MemoryBus | None = None

    async def connect(self) -> CommunicationBus:
        """A connected bus for one more party."""
        bus: CommunicationBus
        if self.kind == "memory":
            if self._shared is None:
                self._shared = MemoryBus(settings=self.settings)
                self.opened.append(self._shared)
            bus = self._shared
        else:
            bus = RabbitMQBus(settings=self.settings)
            self.opened.append(bus)
        await bus.connect()
        return bus

    def key(self, queue_key: str) -> str:
        """A task queue key, remembered so that teardown deletes its queue."""
        self.queue_keys.add(queue_key)
        return queue_key

    async def close(self) -> None:
        for bus in reversed(self.opened):
            await bus.close()
        if self.kind == "rabbitmq":
            cleaner = RabbitMQBus(settings=self.settings)
            await cleaner.connect()
            try:
                await cleaner.delete_topology(self.queue_keys, self.agent_ids)
            finally:
                await cleaner.close()


@pytest.fixture
async def buses(bus_kind: str, bus_settings: BusSettings) -> AsyncIterator[Buses]:
    deployment = Buses(bus_kind, bus_settings)
    try:
        yield deployment
    finally:
        await deployment.close()


class Inbox(Generic[T]):
    """What a handler was given, in arrival order, with a way to wait for it."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._arrived = asyncio.Event()

    async def put(self, item: T) -> None:
        self.items.append(item)
        self._arrived.set()

    async def wait_until(
        self, condition: Callable[[list[T]], bool], what: str, timeout: float = WAIT
    ) -> list[T]:
        """The items, once ``condition`` holds for them."""
        try:
            async with asyncio.timeout(timeout):
                while not condition(self.items):
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            pytest.fail(f"{what} within {timeout}s; got {len(self.items)}: {self.items!r:.300}")
        return self.items

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[T]:
        """The first ``count`` items, once they are in."""
        items = await self.wait_until(
            lambda items: len(items) >= count, f"expected {count} deliveries", timeout
        )
        return items[:count]

    async def stays_at(self, count: int) -> None:
        """Watch a moment and check that nothing beyond ``count`` arrives."""
        await asyncio.sleep(SETTLE)
        assert len(self.items) == count, f"expected {count} deliveries, got {len(self.items)}"


def acking(inbox: Inbox[TaskDelivery]) -> Callable[[TaskDelivery], Awaitable[None]]:
    """A task handler that acknowledges each delivery, then records it."""

    async def handle(delivery: TaskDelivery) -> None:
        await delivery.ack()
        await inbox.put(delivery)

    return handle


def task(task_id: str, **changes: Any) -> TaskMessage:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "attempt": 1,
        "name": f"task {task_id}",
        "task_type": "analysis",
        "payload": {"n": task_id},
        "priority": "medium",
        "timeout": 30.0,
        "estimated_duration": 1.0,
    }
    return TaskMessage(**{**fields, **changes})


def ids(deliveries: list[TaskDelivery]) -> list[str]:
    return [parse_task(d.body).task_id for d in deliveries]


async def dead_lettered(bus: CommunicationBus, count: int) -> list[tuple[bytes, str]]:
    """(body, reason) of the first ``count`` messages in the dead-letter queue."""
    if isinstance(bus, MemoryBus):
        # Entries are (body, reason) pairs, or records with .body and .reason.
        return [
            (letter.body, letter.reason) if hasattr(letter, "reason") else tuple(letter)
            for letter in bus.dead_letters[:count]
        ]
    assert bus.settings.broker_url
    found: list[tuple[bytes, str]] = []
    connection = await aio_pika.connect(bus.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(bus.topology.dead_queue, passive=True)
        async with asyncio.timeout(WAIT):
            while len(found) < count:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                found.append((message.body, str(message.headers["x-reason"])))
    return found


# --- task queues: priorities -------------------------------------------------


async def test_waiting_tasks_are_delivered_highest_priority_first(buses: Buses) -> None:
    # Given tasks of priority 1, 9 and 5 waiting in one queue, with no consumer yet
    orchestrator = await buses.connect()
    key = buses.key("prio")
    for priority in (1, 9, 5):
        await orchestrator.publish_task(task(f"p{priority}"), queue_key=key, priority=priority)

    # When an agent consumes that queue one task at a time
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=acking(received))
    await consumer.consume([key])

    # Then it receives them highest priority first
    assert ids(await received.wait_for(3)) == ["p9", "p5", "p1"]


async def test_equal_priority_tasks_keep_publish_order(buses: Buses) -> None:
    # Given five tasks of one priority waiting in a queue
    orchestrator = await buses.connect()
    key = buses.key("fifo")
    for i in range(5):
        await orchestrator.publish_task(task(f"t{i}"), queue_key=key, priority=3)

    # When an agent consumes them one at a time
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=acking(received))
    await consumer.consume([key])

    # Then they come first in, first out
    assert ids(await received.wait_for(5)) == [f"t{i}" for i in range(5)]


async def test_priorities_above_the_maximum_count_as_the_maximum(buses: Buses) -> None:
    # Given a task at MAX_PRIORITY waiting ahead of one published with a higher number
    orchestrator = await buses.connect()
    key = buses.key("cap")
    await orchestrator.publish_task(task("at-max"), queue_key=key, priority=MAX_PRIORITY)
    await orchestrator.publish_task(task("above-max"), queue_key=key, priority=MAX_PRIORITY + 50)

    # When an agent consumes them one at a time
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=acking(received))
    await consumer.consume([key])

    # Then both rank as MAX_PRIORITY (x-max-priority) and keep publish order
    assert ids(await received.wait_for(2)) == ["at-max", "above-max"]


# --- task queues: delayed publishes -----------------------------------------


async def test_delayed_task_arrives_after_its_delay_and_by_its_arrival_bound(
    buses: Buses,
) -> None:
    # Given an agent consuming a queue
    orchestrator = await buses.connect()
    key = buses.key("delayed")
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=acking(received))
    await consumer.consume([key])

    # When a task is published with a delay
    delay = 2 * SETTLE
    bound = orchestrator.arrival_bound(delay)
    loop = asyncio.get_running_loop()
    published = loop.time()
    await orchestrator.publish_task(task("later"), queue_key=key, priority=1, delay=delay)

    # Then it is not there before the delay, and is there by the bound
    await received.stays_at(0)  # SETTLE < delay
    (delivery,) = await received.wait_for(1, timeout=bound + WAIT)
    arrived = loop.time() - published
    assert delay - 0.05 <= arrived <= bound + 0.5, arrived
    assert ids([delivery]) == ["later"]


@pytest.mark.parametrize("bus_class", [MemoryBus, RabbitMQBus])
@pytest.mark.parametrize(
    ("delay", "bound"),
    [(0, 0.0), (-1, 0.0), (0.1, 0.1), (0.3, 0.5), (61, 120.0), (2 * 3600, 3600.0)],
)
def test_arrival_bound_is_the_retry_tier_a_delayed_task_waits_in(
    bus_class: type[CommunicationBus], delay: float, bound: float
) -> None:
    # A delay past the longest tier is cut to it: the task comes early, not late
    bus = bus_class(settings=BusSettings(broker_url="amqp://broker.invalid/"))
    assert bus.arrival_bound(delay) == bound


# --- task queues: prefetch ---------------------------------------------------


async def test_prefetch_is_shared_across_all_queues_of_a_consumer(buses: Buses) -> None:
    # Given two queues holding five tasks each
    orchestrator = await buses.connect()
    keys = [buses.key("left"), buses.key("right")]
    for key in keys:
        for i in range(5):
            await orchestrator.publish_task(task(f"{key}-{i}"), queue_key=key, priority=1)

    # When an agent with prefetch 2 consumes both and settles nothing
    agent = await buses.connect()
    held: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=2, handler=held.put)
    await consumer.consume(keys)

    # Then it holds exactly two tasks, not two per queue
    await held.wait_for(2)
    await held.stays_at(2)
    assert consumer.queue_keys == frozenset(keys)

    # And acknowledging one lets exactly one more in
    await held.items[0].ack()
    await held.wait_for(3)
    await held.stays_at(3)


async def test_paused_consumer_takes_no_more_but_can_settle_what_it_holds(buses: Buses) -> None:
    # Given an agent with prefetch 1 holding the first of three tasks
    orchestrator = await buses.connect()
    key = buses.key("pause")
    for i in range(3):
        await orchestrator.publish_task(task(f"t{i}"), queue_key=key, priority=1)
    agent = await buses.connect()
    held: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=held.put)
    await consumer.consume([key])
    (first,) = await held.wait_for(1)

    # When it pauses and then acknowledges the task it holds
    await consumer.pause()
    await first.ack()

    # Then no further task reaches it
    await held.stays_at(1)
    assert consumer.queue_keys == frozenset()

    # And another agent gets the two remaining tasks, not the acknowledged one
    other = await buses.connect()
    taken: Inbox[TaskDelivery] = Inbox()
    other_consumer = await other.open_task_consumer("agent-2", prefetch=5, handler=acking(taken))
    await other_consumer.consume([key])
    assert ids(await taken.wait_for(2)) == ["t1", "t2"]
    await taken.stays_at(2)


async def test_a_pause_during_step_aside_is_not_undone(buses: Buses) -> None:
    # Given an agent stepping aside from a task for a moment
    orchestrator = await buses.connect()
    key = buses.key("aside")
    await orchestrator.publish_task(task("t0"), queue_key=key, priority=1)
    agent = await buses.connect()
    held: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=held.put)
    await consumer.consume([key])
    (first,) = await held.wait_for(1)
    aside = asyncio.create_task(consumer.step_aside(first, 2.0))

    # When it pauses (a graceful stop) while it stands aside: once the task is back
    async def back_in_queue() -> bool:
        return await orchestrator.queue_depth(key) == 1

    await wait_until(back_in_queue, WAIT, interval=0.01)
    assert not aside.done()
    await consumer.pause()
    await aside

    # Then it does not start consuming again: the task stays for others
    assert consumer.queue_keys == frozenset()
    await held.stays_at(1)
    other = await buses.connect()
    taken: Inbox[TaskDelivery] = Inbox()
    other_consumer = await other.open_task_consumer("agent-2", prefetch=5, handler=acking(taken))
    await other_consumer.consume([key])
    assert ids(await taken.wait_for(1)) == ["t0"]


# --- task queues: unsettled deliveries --------------------------------------


@pytest.mark.parametrize("going_away", ["consumer closes", "bus closes"])
async def test_unacked_tasks_go_back_when_their_consumer_goes_away(
    buses: Buses, going_away: str
) -> None:
    # Given agent A holding two tasks without acknowledging them
    orchestrator = await buses.connect()
    key = buses.key("requeue")
    for i in range(2):
        await orchestrator.publish_task(task(f"t{i}"), queue_key=key, priority=1)
    agent_a = await buses.connect()
    held: Inbox[TaskDelivery] = Inbox()
    consumer_a = await agent_a.open_task_consumer("agent-a", prefetch=5, handler=held.put)
    await consumer_a.consume([key])
    assert [d.redelivered for d in await held.wait_for(2)] == [False, False]

    # When A goes away
    if going_away == "consumer closes":
        await consumer_a.close()
    else:
        await agent_a.close()

    # Then agent B receives both tasks, marked as redelivered
    agent_b = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer_b = await agent_b.open_task_consumer("agent-b", prefetch=5, handler=acking(received))
    await consumer_b.consume([key])
    deliveries = await received.wait_for(2)
    assert sorted(ids(deliveries)) == ["t0", "t1"]
    assert [d.redelivered for d in deliveries] == [True, True]
    assert {d.body for d in deliveries} == {d.body for d in held.items}


async def test_requeued_task_comes_again_marked_redelivered(buses: Buses) -> None:
    # Given an agent that gives back the first delivery of every task
    orchestrator = await buses.connect()
    key = buses.key("again")
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()

    async def give_back_once(delivery: TaskDelivery) -> None:
        await received.put(delivery)
        if delivery.redelivered:
            await delivery.ack()
        else:
            await delivery.requeue()

    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=give_back_once)
    await consumer.consume([key])

    # When a task is published
    await orchestrator.publish_task(task("t0"), queue_key=key, priority=1)

    # Then it arrives twice: first fresh, then redelivered
    deliveries = await received.wait_for(2)
    assert ids(deliveries) == ["t0", "t0"]
    assert [d.redelivered for d in deliveries] == [False, True]
    assert [d.queue_key for d in deliveries] == [key, key]
    await received.stays_at(2)


# --- task queues: consumer priority -----------------------------------------


async def test_idle_higher_priority_consumer_gets_the_task(buses: Buses) -> None:
    # Given two idle agents on one queue, the low-priority one subscribed first
    orchestrator = await buses.connect()
    key = buses.key("consumer-prio")
    low_inbox: Inbox[TaskDelivery] = Inbox()
    high_inbox: Inbox[TaskDelivery] = Inbox()
    low = await (await buses.connect()).open_task_consumer("low", prefetch=1, handler=low_inbox.put)
    await low.consume([key], consumer_priority=1)
    high = await (await buses.connect()).open_task_consumer(
        "high", prefetch=1, handler=high_inbox.put
    )
    await high.consume([key], consumer_priority=5)

    # When one task is published
    await orchestrator.publish_task(task("t0"), queue_key=key, priority=1)

    # Then the priority-5 agent gets it
    assert ids(await high_inbox.wait_for(1)) == ["t0"]
    await low_inbox.stays_at(0)

    # And while it is busy, the next task goes to the priority-1 agent
    await orchestrator.publish_task(task("t1"), queue_key=key, priority=1)
    assert ids(await low_inbox.wait_for(1)) == ["t1"]
    await high_inbox.stays_at(1)


async def test_equal_priority_consumers_take_turns(buses: Buses) -> None:
    # Given two agents of equal priority, each with plenty of free prefetch
    orchestrator = await buses.connect()
    key = buses.key("turns")
    received: Inbox[TaskDelivery] = Inbox()
    by_agent: list[list[TaskDelivery]] = [[], []]
    for i, mine in enumerate(by_agent):

        async def handle(delivery: TaskDelivery, mine: list[TaskDelivery] = mine) -> None:
            await delivery.ack()
            mine.append(delivery)
            await received.put(delivery)

        consumer = await (await buses.connect()).open_task_consumer(
            f"agent-{i}", prefetch=50, handler=handle
        )
        await consumer.consume([key], consumer_priority=2)

    # When ten tasks are published
    for i in range(10):
        await orchestrator.publish_task(task(f"t{i}"), queue_key=key, priority=1)

    # Then both agents get a fair share of them, and every task is delivered once
    delivered = await received.wait_for(10)
    counts = [len(mine) for mine in by_agent]
    assert all(3 <= n <= 7 for n in counts), counts
    assert sorted(ids(delivered)) == sorted(f"t{i}" for i in range(10))
    await received.stays_at(10)


# --- events ------------------------------------------------------------------


def agent_and_task_events() -> list[Event]:
    return [
        AgentAnnounced(agent_id="agent-1", capabilities=["x"], max_concurrent_tasks=2),
        TaskStarted(task_id="t1", attempt=1, agent_id="agent-1"),
        AgentHeartbeat(agent_id="agent-1", running=1),
        TaskStarted(task_id="t2", attempt=1, agent_id="agent-1"),
        TaskFinished(
            task_id="t1", attempt=1, agent_id="agent-1", outcome="completed", result={"ok": 1}
        ),
        AgentLeft(agent_id="agent-1"),
        TaskFinished(task_id="t2", attempt=1, agent_id="agent-1", outcome="failed", error="boom"),
    ]


@pytest.mark.parametrize(
    ("patterns", "kinds"),
    [
        (["task.#"], {"task.started", "task.finished"}),
        (["agent.*"], {"agent.announce", "agent.heartbeat", "agent.goodbye"}),
        (["*.started", "agent.goodbye"], {"task.started", "agent.goodbye"}),
    ],
)
async def test_topic_subscription_sees_matching_events_in_publish_order(
    buses: Buses, patterns: list[str], kinds: set[str]
) -> None:
    # Given a monitor subscribed to some topic patterns
    monitor = await buses.connect()
    seen: Inbox[Event] = Inbox()
    await monitor.subscribe_events(seen.put, patterns=patterns)

    # When an agent publishes task and agent events, interleaved
    agent = await buses.connect()
    events = agent_and_task_events()
    for event in events:
        await agent.publish_event(event)

    # Then the monitor sees exactly the matching ones, in publish order
    expected = [e for e in events if e.kind in kinds]
    assert await seen.wait_for(len(expected)) == expected
    await seen.stays_at(len(expected))


async def test_events_are_handled_one_at_a_time(buses: Buses) -> None:
    # Given a monitor whose handler takes a while
    monitor = await buses.connect()
    running = 0
    most_at_once = 0
    seen: Inbox[Event] = Inbox()

    async def slow(event: Event) -> None:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        await asyncio.sleep(0.01)
        running -= 1
        await seen.put(event)

    await monitor.subscribe_events(slow, patterns=["#"])

    # When several events are published at once
    agent = await buses.connect()
    events = [AgentHeartbeat(agent_id="agent-1", running=i) for i in range(5)]
    for event in events:
        await agent.publish_event(event)

    # Then the handler ran for them one after the other, in order
    assert await seen.wait_for(5) == events
    assert most_at_once == 1


async def test_orchestrator_queue_keeps_events_published_before_it_subscribed(
    buses: Buses,
) -> None:
    # Given an agent registered before (its events queue declared, then left
    # alone) that published events while no orchestrator consumed them
    orchestrator = await buses.connect()
    await (await orchestrator.subscribe_agent_events("agent-1", Inbox[Event]().put)).close()
    agent = await buses.connect()
    events = agent_and_task_events()
    for event in events:
        await agent.publish_event(event)

    # When the orchestrator subscribes to its shared queue, the agent's queue
    # and its heartbeat queue
    seen: Inbox[Event] = Inbox()
    await orchestrator.subscribe_events(seen.put)
    own: Inbox[Event] = Inbox()
    await orchestrator.subscribe_agent_events("agent-1", own.put)
    beats: Inbox[Event] = Inbox()
    await orchestrator.subscribe_heartbeats(beats.put)

    # Then it receives the announcement on the shared queue, every task event
    # and the goodbye on the agent's own in publish order, the heartbeats on theirs
    announced = [e for e in events if isinstance(e, AgentAnnounced)]
    assert await seen.wait_for(len(announced)) == announced
    others = [e for e in events if not isinstance(e, (AgentHeartbeat, AgentAnnounced))]
    assert await own.wait_for(len(others)) == others
    heartbeats = [e for e in events if isinstance(e, AgentHeartbeat)]
    assert await beats.wait_for(len(heartbeats)) == heartbeats
    await seen.stays_at(len(announced))
    await own.stays_at(len(others))
    await beats.stays_at(len(heartbeats))


async def test_task_events_of_an_agent_without_a_queue_reach_no_orchestrator_queue(
    buses: Buses,
) -> None:
    # Given an orchestrator following agent-1's queue and its shared one
    orchestrator = await buses.connect()
    seen: Inbox[Event] = Inbox()
    await orchestrator.subscribe_events(seen.put)
    own: Inbox[Event] = Inbox()
    await orchestrator.subscribe_agent_events("agent-1", own.put)

    # When a stranger publishes task events and a goodbye of ids nobody
    # registered, then agent-1 its result
    stranger = await buses.connect()
    for n in range(50):
        await stranger.publish_event(TaskStarted(task_id="t1", attempt=1, agent_id=f"ghost-{n}"))
        await stranger.publish_event(AgentLeft(agent_id=f"ghost-{n}"))
    result = TaskFinished(task_id="t1", attempt=1, agent_id="agent-1", outcome="completed")
    await stranger.publish_event(result)

    # Then the orchestrator hears agent-1's result alone: the rest reached no queue
    assert await own.wait_for(1) == [result]
    await own.stays_at(1)
    await seen.stays_at(0)


async def test_a_full_agent_queue_refuses_a_publish_and_keeps_what_it_holds(
    monkeypatch: pytest.MonkeyPatch, buses: Buses
) -> None:
    # Given agent-1's events queue, declared to keep 10, and nobody consuming it
    monkeypatch.setattr(topology_module, "AGENT_EVENTS_KEEP", 10)
    orchestrator = await buses.connect()
    await (await orchestrator.subscribe_agent_events("agent-1", Inbox[Event]().put)).close()
    agent = await buses.connect()

    # When 10 events are published, then an 11th
    events = [TaskProgress(task_id="t1", attempt=1, agent_id="agent-1", progress=i / 10)
              for i in range(10)]  # fmt: skip
    for event in events:
        await agent.publish_event(event)
    late = TaskFinished(task_id="t1", attempt=1, agent_id="agent-1", outcome="completed")

    # Then the 11th is refused (a nack), the 10 are kept, and once they are read
    # the 11th goes through
    with pytest.raises(PublishRefused):
        await agent.publish_event(late)
    own: Inbox[Event] = Inbox()
    subscription = await orchestrator.subscribe_agent_events("agent-1", own.put)
    assert await own.wait_for(10) == events
    await agent.publish_event(late)
    assert await own.wait_for(11) == [*events, late]

    # And once deleted, the queue takes nothing more
    await subscription.close()
    await orchestrator.delete_agent_events("agent-1")
    await orchestrator.delete_agent_events("agent-1")  # idempotent
    await agent.publish_event(late)
    again: Inbox[Event] = Inbox()
    await orchestrator.subscribe_agent_events("agent-1", again.put)
    await again.stays_at(0)


async def test_heartbeats_have_a_bounded_queue_of_their_own(
    monkeypatch: pytest.MonkeyPatch, buses: Buses
) -> None:
    # Given an orchestrator's heartbeat queue that keeps 100 (drop-head; patched
    # first, so that it holds until the buses' teardown is done)
    monkeypatch.setattr(
        Topology,
        "heartbeat_queue_arguments",
        staticmethod(lambda: {"x-queue-type": "classic", "x-max-length": 100,
                              "x-overflow": "drop-head"}),
    )  # fmt: skip
    agent = await buses.connect()
    orchestrator = await buses.connect()
    await (await orchestrator.subscribe_agent_events("agent-1", Inbox[Event]().put)).close()

    # When 1,000 heartbeats, then a result, are published while nobody consumes
    beats = [AgentHeartbeat(agent_id="agent-1", running=i) for i in range(1000)]
    for event in beats:
        await agent.publish_event(event)
    result = TaskFinished(task_id="t1", attempt=1, agent_id="agent-1", outcome="completed")
    await agent.publish_event(result)

    # Then the agent's events queue holds the result alone, and the heartbeat
    # queue only the newest 100 heartbeats
    seen: Inbox[Event] = Inbox()
    await orchestrator.subscribe_agent_events("agent-1", seen.put)
    assert await seen.wait_for(1) == [result]
    kept: Inbox[Event] = Inbox()
    await orchestrator.subscribe_heartbeats(kept.put)
    assert await kept.wait_for(100) == beats[-100:]
    await kept.stays_at(100)
    await seen.stays_at(1)


async def test_the_broker_says_whether_an_agent_is_connected(buses: Buses) -> None:
    # Given an agent consuming its control queue
    agent = await buses.connect()
    subscription = await agent.subscribe_control("agent-1", Inbox[Control]().put)
    orchestrator = await buses.connect()

    # Then the broker says it is connected, and that an agent never seen is not
    assert await orchestrator.agent_connected("agent-1") is True
    assert await orchestrator.agent_connected("agent-2") is False

    # When its subscription ends (as its connection does when it dies)
    await subscription.close()

    # Then it is connected no more (the exclusive queue went with it), and asking
    # again still works (a refused passive declare closes only a channel of its own)
    assert await orchestrator.agent_connected("agent-1") is False
    assert await orchestrator.agent_connected("agent-1") is False
    await orchestrator.publish_control(Reannounce(), agent_id="agent-1")


async def test_orchestrator_queue_keeps_events_while_the_orchestrator_is_down(
    buses: Buses,
) -> None:
    # Given an orchestrator that handled one event and then stopped
    agent = await buses.connect()
    first = TaskStarted(task_id="t1", attempt=1, agent_id="agent-1")
    orchestrator = await buses.connect()
    before: Inbox[Event] = Inbox()
    subscription = await orchestrator.subscribe_agent_events("agent-1", before.put)
    await agent.publish_event(first)
    assert await before.wait_for(1) == [first]
    await subscription.close()

    # When events are published while it is down, and it comes back
    later = [
        TaskFinished(task_id="t1", attempt=1, agent_id="agent-1", outcome="completed"),
        AgentLeft(agent_id="agent-1"),
    ]
    for event in later:
        await agent.publish_event(event)
    restarted = await buses.connect()
    after: Inbox[Event] = Inbox()
    await restarted.subscribe_agent_events("agent-1", after.put)

    # Then it receives them in order (the first event may come again: at least once)
    received = await after.wait_until(
        lambda items: items[-2:] == later, "expected the later events"
    )
    assert all(event == first for event in received[:-2])


# --- control -----------------------------------------------------------------


async def test_control_reaches_one_agent_or_every_agent(buses: Buses) -> None:
    # Given agents "a" and "b" listening for commands
    inboxes: dict[str, Inbox[Control]] = {}
    for agent_id in ("a", "b"):
        inboxes[agent_id] = Inbox()
        agent = await buses.connect()
        await agent.subscribe_control(agent_id, inboxes[agent_id].put)
    orchestrator = await buses.connect()

    # When the orchestrator sends one command to "a", then one to every agent
    to_a = ConsumeQueues(queue_keys=["x"], consumer_priority=3)
    to_all = Reannounce()
    await orchestrator.publish_control(to_a, agent_id="a")
    await orchestrator.publish_control(to_all, agent_id=None)

    # Then "a" receives both in order, and "b" only the broadcast
    assert await inboxes["a"].wait_for(2) == [to_a, to_all]
    assert await inboxes["b"].wait_for(1) == [to_all]
    await inboxes["a"].stays_at(2)
    await inboxes["b"].stays_at(1)


async def test_command_to_an_agent_named_all_reaches_only_that_agent(buses: Buses) -> None:
    # Given agents "all" and "b" ("all" is a valid agent id)
    inboxes: dict[str, Inbox[Control]] = {}
    for agent_id in ("all", "b"):
        inboxes[agent_id] = Inbox()
        agent = await buses.connect()
        await agent.subscribe_control(agent_id, inboxes[agent_id].put)
    orchestrator = await buses.connect()

    # When the orchestrator unregisters agent "all", then broadcasts a command
    unregister = Unregister(agent_id="all")
    to_all = Reannounce()
    await orchestrator.publish_control(unregister, agent_id="all")
    await orchestrator.publish_control(to_all, agent_id=None)

    # Then only "all" is unregistered; "b" receives just the broadcast
    assert await inboxes["all"].wait_for(2) == [unregister, to_all]
    assert await inboxes["b"].wait_for(1) == [to_all]


# --- dead letters ------------------------------------------------------------


async def test_dead_lettered_task_lands_in_the_dead_queue_with_its_reason(buses: Buses) -> None:
    # Given a poison task (priority 9) ahead of a good one (priority 1)
    orchestrator = await buses.connect()
    key = buses.key("poison")
    poison = task("poison", payload={"bad": True})
    await orchestrator.publish_task(poison, queue_key=key, priority=9)
    await orchestrator.publish_task(task("good"), queue_key=key, priority=1)

    # When an agent with prefetch 1 dead-letters the poison task and acks the rest
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()

    async def handle(delivery: TaskDelivery) -> None:
        if parse_task(delivery.body).task_id == "poison":
            await delivery.dead_letter("payload cannot be processed")
        else:
            await delivery.ack()
        await received.put(delivery)

    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=handle)
    await consumer.consume([key])

    # Then the poison task was settled, not requeued: the good one came next, and last
    assert ids(await received.wait_for(2)) == ["poison", "good"]
    await received.stays_at(2)

    # And it waits in the dead-letter queue, with its reason
    assert await dead_lettered(agent, 1) == [(poison.encode(), "payload cannot be processed")]


# --- size limit --------------------------------------------------------------


async def test_too_large_task_is_refused_before_publishing(buses: Buses) -> None:
    # Given an agent consuming a queue
    orchestrator = await buses.connect()
    key = buses.key("size")
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=5, handler=acking(received))
    await consumer.consume([key])
    limit = orchestrator.settings.max_message_bytes

    # When a task larger than the limit is published
    too_large = task("big", payload={"blob": "x" * limit})
    with pytest.raises(MessageTooLarge) as raised:
        await orchestrator.publish_task(too_large, queue_key=key, priority=9)

    # Then it raises a bus error naming the limit, and no agent ever sees it
    assert isinstance(raised.value, BusError)
    assert str(limit) in str(raised.value)
    await orchestrator.publish_task(task("small"), queue_key=key, priority=1)
    assert ids(await received.wait_for(1)) == ["small"]


async def test_task_of_exactly_the_size_limit_is_published(buses: Buses) -> None:
    # Given a task whose encoded body is exactly max_message_bytes long
    orchestrator = await buses.connect()
    key = buses.key("exact")
    limit = orchestrator.settings.max_message_bytes
    overhead = len(task("exact", payload={"blob": ""}).encode())
    exact = task("exact", payload={"blob": "x" * (limit - overhead)})
    assert len(exact.encode()) == limit

    # When it is published and consumed
    await orchestrator.publish_task(exact, queue_key=key, priority=1)
    agent = await buses.connect()
    received: Inbox[TaskDelivery] = Inbox()
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=acking(received))
    await consumer.consume([key])

    # Then it arrives whole
    (delivery,) = await received.wait_for(1)
    assert delivery.body == exact.encode()


async def test_too_large_event_and_command_are_refused_before_publishing(buses: Buses) -> None:
    # Given a monitor of every event and an agent listening for commands
    monitor = await buses.connect()
    events: Inbox[Event] = Inbox()
    await monitor.subscribe_events(events.put, patterns=["#"])
    agent = await buses.connect()
    commands: Inbox[Control] = Inbox()
    await agent.subscribe_control("a", commands.put)
    orchestrator = await buses.connect()
    blob = "x" * orchestrator.settings.max_message_bytes

    # When an oversized event and an oversized command are published
    with pytest.raises(MessageTooLarge):
        await agent.publish_event(
            TaskFinished(task_id="t", attempt=1, agent_id="a", outcome="failed", error=blob)
        )
    with pytest.raises(MessageTooLarge):
        await orchestrator.publish_control(CancelTask(task_id=blob), agent_id="a")

    # Then neither is delivered: the next small ones are the first to arrive
    small_event = AgentHeartbeat(agent_id="a", running=0)
    small_command = CancelTask(task_id="t")
    await agent.publish_event(small_event)
    await orchestrator.publish_control(small_command, agent_id="a")
    assert await events.wait_for(1) == [small_event]
    assert await commands.wait_for(1) == [small_command]


# --- connection and construction --------------------------------------------


async def test_unreachable_broker_raises_connection_error_without_the_password() -> None:
    # Given a RabbitMQ bus pointed at a port where nothing listens
    settings = BusSettings(
        broker_url="amqp://user:secret@127.0.0.1:1/", connect_attempts=1, connect_timeout=1
    )
    bus = RabbitMQBus(settings=settings)

    # When it connects
    with pytest.raises(ConnectionError) as raised:
        await bus.connect()

    # Then the error names the address but not the password
    assert isinstance(raised.value, BusError)
    assert "127.0.0.1:1" in str(raised.value)
    assert "secret" not in str(raised.value)
    assert "secret" not in repr(raised.value)
    assert not bus.is_connected


def test_bare_communication_bus_is_in_process_without_a_broker_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given no ORCHESTRATOR_BROKER_URL in the environment
    monkeypatch.delenv("ORCHESTRATOR_BROKER_URL", raising=False)

    # When a bus is made with no arguments
    bus = CommunicationBus()

    # Then it is the in-process bus, not yet connected
    assert type(bus) is MemoryBus
    assert bus.settings.broker_url is None
    assert not bus.is_connected


def test_bare_communication_bus_is_rabbitmq_with_a_broker_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given ORCHESTRATOR_BROKER_URL in the environment
    url = "amqp://user:secret@broker.invalid:5672/"
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", url)

    # When a bus is made with no arguments
    bus = CommunicationBus()

    # Then it is a RabbitMQ bus for that broker, not yet connected
    assert type(bus) is RabbitMQBus
    assert bus.settings.broker_url == url
    assert not bus.is_connected
    assert "secret" not in bus.address


def test_explicit_arguments_choose_the_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no ORCHESTRATOR_BROKER_URL in the environment
    monkeypatch.delenv("ORCHESTRATOR_BROKER_URL", raising=False)

    # When buses are made with explicit settings or a URL
    memory = CommunicationBus(settings=BusSettings(prefix="explicit"))
    rabbit = CommunicationBus("amqp://guest:guest@broker.invalid:5672/")

    # Then the arguments decide, and the settings are kept
    assert type(memory) is MemoryBus
    assert memory.topology.prefix == "explicit"
    assert type(rabbit) is RabbitMQBus
    assert rabbit.settings.broker_url == "amqp://guest:guest@broker.invalid:5672/"


# --- who sent it ----------------------------------------------------------------


async def test_every_message_carries_its_publishers_user_and_handlers_see_it(
    buses: Buses,
) -> None:
    # Given an orchestrator's bus and an agent's bus (in memory: logged in as
    # another user; on RabbitMQ each its own connection, as the URL's user)
    orchestrator = await buses.connect()
    if isinstance(orchestrator, MemoryBus):
        agent = orchestrator.as_user("agent-user")
        await agent.connect()
        buses.opened.append(agent)
    else:
        agent = await buses.connect()
    assert agent.user and orchestrator.user
    senders: Inbox[tuple[str, Any]] = Inbox()

    async def on_event(event: Event) -> None:
        await senders.put(("event", current_sender()))

    async def on_control(command: Control) -> None:
        await senders.put(("control", current_sender()))

    async def on_dead(letter: DeadLetter) -> None:
        await senders.put(("dead", (letter.sender, letter.by_broker)))

    async def on_task(delivery: TaskDelivery) -> None:
        await senders.put(("task", delivery.sender))
        await delivery.dead_letter("unreadable here")

    await orchestrator.subscribe_events(on_event)
    await orchestrator.subscribe_heartbeats(on_event)
    await orchestrator.subscribe_dead_letters(on_dead)
    await agent.subscribe_control("agent-1", on_control)
    key = buses.key("analysis.@any")
    consumer = await agent.open_task_consumer("agent-1", prefetch=1, handler=on_task)
    await consumer.consume([key])

    # When each publishes what it publishes
    await agent.publish_event(AgentHeartbeat(agent_id="agent-1", running=0))
    await orchestrator.publish_control(Reannounce(), agent_id="agent-1")
    await orchestrator.publish_task(task("t1"), queue_key=key, priority=1)

    # Then every handler is told the publisher's user, as the broker checked it;
    # and outside a handler there is no sender
    got = dict(await senders.wait_for(4))
    assert got["event"] == Sender(agent.user)
    assert got["control"] == Sender(orchestrator.user)
    assert got["task"] == orchestrator.user
    assert got["dead"] == (agent.user, False)  # the agent dead-lettered it
    assert current_sender() is None


async def test_a_message_published_without_a_user_has_no_sender(buses: Buses) -> None:
    # Given an orchestrator's events subscription
    orchestrator = await buses.connect()
    senders: Inbox[Any] = Inbox()

    async def on_event(event: Event) -> None:
        await senders.put(current_sender())

    await orchestrator.subscribe_events(on_event)
    await orchestrator.subscribe_heartbeats(on_event)

    # When a plain AMQP client publishes an event without a user_id
    body = AgentHeartbeat(agent_id="agent-1", running=0).encode()
    if isinstance(orchestrator, MemoryBus):
        await orchestrator.publish_raw(
            orchestrator.topology.events_exchange, "agent.heartbeat", body
        )
        # (and one naming another user is refused, as RabbitMQ refuses it)
        with pytest.raises(BusError, match="user_id"):
            await orchestrator.publish_raw(
                orchestrator.topology.events_exchange, "agent.heartbeat", body, user_id="root"
            )
    else:
        assert orchestrator.settings.broker_url
        connection = await aio_pika.connect(orchestrator.settings.broker_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(orchestrator.topology.events_exchange)
            await exchange.publish(aio_pika.Message(body), routing_key="agent.heartbeat")

    # Then its handler sees a sender without a user
    assert await senders.wait_for(1) == [Sender(None)]


async def test_a_monitor_that_falls_behind_loses_the_oldest_events_not_the_broker(
    buses: Buses, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a monitor whose queue keeps 100 events, and whose handler is stuck
    monkeypatch.setattr(
        Topology,
        "monitor_queue_arguments",
        staticmethod(lambda: {"x-max-length": 100, "x-overflow": "drop-head"}),
    )
    monitor = await buses.connect()
    stuck = asyncio.Event()
    seen: Inbox[Event] = Inbox()

    async def slow(event: Event) -> None:
        await stuck.wait()
        await seen.put(event)

    await monitor.subscribe_events(slow, patterns=["agent.heartbeat"])

    # When 1,500 events are published meanwhile
    agent = await buses.connect()
    events = [AgentHeartbeat(agent_id="agent-1", running=i) for i in range(1500)]
    for event in events:
        await agent.publish_event(event)
    stuck.set()

    # Then it gets the newest last, and no more than the queue kept (plus what the
    # bus had taken from the broker already: its prefetch)
    received = await seen.wait_until(lambda got: got and got[-1] == events[-1], "the newest")
    assert len(received) <= 100 + 512 + 1
    assert received == sorted(received, key=lambda e: e.running)
