"""The bus contract of per-queue consumer priorities (``TaskConsumer.consume``), on both buses.

RabbitMQ compares the priorities of one queue's consumers only, and fixes a
consumer's priority when it starts; an agent's consumer of several queues
has one priority per queue, and a change re-consumes only the queues whose
priority changed, losing no delivery on the way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker import BusSettings, TaskDelivery
from tests.test_bus_contract import Buses, Inbox, acking, ids, task


@pytest.fixture
async def buses(bus_kind: str, bus_settings: BusSettings) -> AsyncIterator[Buses]:
    deployment = Buses(bus_kind, bus_settings)
    try:
        yield deployment
    finally:
        await deployment.close()


async def test_one_consumer_has_a_priority_per_queue(buses: Buses) -> None:
    # Given agent "multi" on queue a at priority 5 and queue b at 1, and agent
    # "other" on both at 3, each with room for many deliveries
    orchestrator = await buses.connect()
    a, b = buses.key("per-queue-a"), buses.key("per-queue-b")
    multi_inbox: Inbox[TaskDelivery] = Inbox()
    other_inbox: Inbox[TaskDelivery] = Inbox()
    multi = await (await buses.connect()).open_task_consumer(
        "multi", prefetch=10, handler=multi_inbox.put
    )
    await multi.consume([a, b], priorities={a: 5, b: 1})
    other = await (await buses.connect()).open_task_consumer(
        "other", prefetch=10, handler=other_inbox.put
    )
    await other.consume([a, b], consumer_priority=3)

    # When a task goes to each queue
    await orchestrator.publish_task(task("t0"), queue_key=a, priority=1)
    assert ids(await multi_inbox.wait_for(1)) == ["t0"]
    await orchestrator.publish_task(task("t1"), queue_key=b, priority=1)

    # Then each goes to the queue's highest consumer: a's to multi, b's to other
    assert ids(await other_inbox.wait_for(1)) == ["t1"]
    await multi_inbox.stays_at(1)

    # When multi's priority on b alone rises above other's, while it holds t0 unsettled
    await multi.consume([a, b], priorities={a: 5, b: 9})
    await orchestrator.publish_task(task("t2"), queue_key=a, priority=1)
    await orchestrator.publish_task(task("t3"), queue_key=b, priority=1)

    # Then multi gets the tasks of both queues
    got = await multi_inbox.wait_for(3)
    assert sorted(ids(got)) == ["t0", "t2", "t3"]
    assert {d.queue_key for d in got[1:]} == {a, b}
    await other_inbox.stays_at(1)

    # And what it held through the change settles, and nothing comes again
    for delivery in [*multi_inbox.items, *other_inbox.items]:
        await delivery.ack()
    await multi_inbox.stays_at(3)
    await other_inbox.stays_at(1)
    assert await orchestrator.queue_depth(a) == 0
    assert await orchestrator.queue_depth(b) == 0


async def test_a_queue_without_a_priority_of_its_own_takes_the_default(buses: Buses) -> None:
    # Given agent "multi" told a priority for queue a only (default 1), and
    # agent "other" on both queues at 3
    orchestrator = await buses.connect()
    a, b = buses.key("default-a"), buses.key("default-b")
    multi_inbox: Inbox[TaskDelivery] = Inbox()
    other_inbox: Inbox[TaskDelivery] = Inbox()
    multi = await (await buses.connect()).open_task_consumer(
        "multi", prefetch=10, handler=multi_inbox.put
    )
    await multi.consume([a, b], 1, {a: 5})
    other = await (await buses.connect()).open_task_consumer(
        "other", prefetch=10, handler=other_inbox.put
    )
    await other.consume([a, b], 3)

    # When a task goes to b, then one to a
    await orchestrator.publish_task(task("t0"), queue_key=b, priority=1)
    assert ids(await other_inbox.wait_for(1)) == ["t0"]
    await orchestrator.publish_task(task("t1"), queue_key=a, priority=1)

    # Then b's went to other (multi's default 1 < 3), a's to multi (5 > 3)
    assert ids(await multi_inbox.wait_for(1)) == ["t1"]
    await other_inbox.stays_at(1)


async def test_priority_changes_while_tasks_flow_lose_and_repeat_nothing(buses: Buses) -> None:
    # Given agents "multi" and "other" acknowledging every task, on queues a and b
    orchestrator = await buses.connect()
    a, b = buses.key("flow-a"), buses.key("flow-b")
    received: Inbox[TaskDelivery] = Inbox()
    multi = await (await buses.connect()).open_task_consumer(
        "multi", prefetch=3, handler=acking(received)
    )
    await multi.consume([a, b], priorities={a: 5, b: 1})
    other = await (await buses.connect()).open_task_consumer(
        "other", prefetch=3, handler=acking(received)
    )
    await other.consume([a, b], consumer_priority=3)

    # When 40 tasks are published to both queues while multi's priority on b
    # flips above and below other's after every fourth
    for i in range(40):
        await orchestrator.publish_task(task(f"t{i}"), queue_key=(a, b)[i % 2], priority=1)
        if i % 4 == 3:
            await multi.consume([a, b], priorities={a: 5, b: (9, 1)[i // 4 % 2]})

    # Then every task is delivered exactly once, none redelivered
    delivered = await received.wait_for(40, timeout=15)
    assert sorted(ids(delivered)) == sorted(f"t{i}" for i in range(40))
    assert not any(d.redelivered for d in delivered)
    await received.stays_at(40)
    assert multi.queue_keys == {a, b}
