"""The agents' events queues share a few channels (broker/rabbitmq_shared.py).

A channel per agent capped the agents an orchestrator follows at the
connection's ``channel_max`` (2047 by default). Sharing must keep what a
channel of its own gave: an event is acknowledged only once its handler and
the before-ack hook ran (an ack with ``multiple`` on a shared channel would
settle the neighbours' deliveries too), closing one agent's subscription
hands back what it held and disturbs no other, a closed one stays closed
across a reconnect, and a queue deleted under its consumer is consumed again
(by aio-pika, else the orchestrator's watch: orchestrator/agent_queues.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import aio_pika
import pytest

from broker import BusSettings, Event, RabbitMQBus, Subscription, TaskProgress
from broker.rabbitmq_shared import CONSUMERS_PER_CHANNEL
from orchestrator.agent_queues import AgentQueues
from tests.harness import Harness, queue_counts, wait_until

WAIT = 30.0


def _event(agent_id: str, n: int) -> TaskProgress:
    return TaskProgress(agent_id=agent_id, task_id=f"t{n}", attempt=1, progress=0.5)


class _Heard:
    """Events handled, per agent id."""

    def __init__(self) -> None:
        self.by_agent: dict[str, list[str]] = defaultdict(list)

    async def __call__(self, event: Event) -> None:
        self.by_agent[event.agent_id].append(event.task_id)  # type: ignore[attr-defined]

    async def count(self, agent_id: str, n: int) -> None:
        async def heard() -> bool:
            return len(self.by_agent[agent_id]) >= n

        await wait_until(heard, WAIT)


async def _bus(broker_url: str, prefix: str) -> RabbitMQBus:
    bus = RabbitMQBus(settings=BusSettings(broker_url=broker_url, prefix=prefix))
    await bus.connect()
    return bus


@pytest.mark.rabbitmq
async def test_many_agents_queues_are_consumed_on_a_few_channels_and_each_is_heard(
    broker_url: str, prefix: str
) -> None:
    # Given an orchestrator's bus following the events queues of 600 agents
    # (more than two channels' worth), opened 16 at a time
    bus = await _bus(broker_url, prefix)
    agents = [f"agent-{n}" for n in range(600)]
    heard = _Heard()
    try:
        before = bus.open_channels
        room = asyncio.Semaphore(16)

        async def follow(agent_id: str) -> Subscription:
            async with room:
                return await bus.subscribe_agent_events(agent_id, heard)

        subscriptions = dict(zip(agents, await asyncio.gather(*map(follow, agents)), strict=True))

        # Then they take a few channels of the connection, not one each (and
        # one that declares their queues first)
        opened = bus.open_channels - before
        assert opened == -(-len(agents) // CONSUMERS_PER_CHANNEL) + 1, opened

        # and when each agent sends an event, each is heard
        for agent_id in agents:
            await bus.publish_event(_event(agent_id, 1))
        for agent_id in agents:
            await heard.count(agent_id, 1)

        # When one agent's subscription is closed, the others hear their next events
        await subscriptions.pop("agent-7").close()
        for agent_id in agents:
            await bus.publish_event(_event(agent_id, 2))
        for agent_id in subscriptions:
            await heard.count(agent_id, 2)
        # and its own waits in its queue, consumed by nobody
        name = bus.topology.agent_events_queue("agent-7")
        assert await queue_counts(broker_url, name) == (1, 0)
        assert heard.by_agent["agent-7"] == ["t1"]
        # and no channel more was opened meanwhile
        assert bus.open_channels - before == opened
        for subscription in subscriptions.values():
            await subscription.close()
    finally:
        await bus.delete_topology(agent_ids=agents)
        await bus.close()


@pytest.mark.rabbitmq
async def test_a_shared_channel_acknowledges_only_what_each_handler_and_its_hook_ran_for(
    broker_url: str, prefix: str
) -> None:
    # Given two agents' queues consumed on one shared channel, the first's
    # before-ack hook failing (its store is out), the second's succeeding
    bus = await _bus(broker_url, prefix)
    heard = _Heard()

    async def store_out() -> None:
        raise ConnectionError("store unreachable (injected)")

    async def stored() -> None:
        pass

    try:
        stuck = await bus.subscribe_agent_events("stuck", heard, before_ack=store_out)
        flowing = await bus.subscribe_agent_events("flowing", heard, before_ack=stored)
        # When each receives events, interleaved, and both handle them
        for n in range(5):
            await bus.publish_event(_event("stuck", n))
            await bus.publish_event(_event("flowing", n))
        await heard.count("stuck", 5)
        await heard.count("flowing", 5)

        # Then, closed, the first hands back all it handled (its hook never ran
        # through: nothing of it was acknowledged, not even by its neighbour's acks)
        await stuck.close()
        stuck_queue = bus.topology.agent_events_queue("stuck")
        assert await queue_counts(broker_url, stuck_queue) == (5, 0)
        # while the second's were acknowledged: nothing of it comes again
        await flowing.close()
        assert await queue_counts(broker_url, bus.topology.agent_events_queue("flowing")) == (0, 0)

        # and followed again, the first agent's events come again, in order
        again = _Heard()
        stuck = await bus.subscribe_agent_events("stuck", again)
        await again.count("stuck", 5)
        assert again.by_agent["stuck"] == [f"t{n}" for n in range(5)]
        await stuck.close()
    finally:
        await bus.delete_topology(agent_ids=["stuck", "flowing"])
        await bus.close()


@pytest.mark.rabbitmq
async def test_an_agent_queue_deleted_under_its_consumer_is_consumed_again(
    broker_url: str, prefix: str
) -> None:
    # Given two agents' queues consumed on one shared channel
    bus = await _bus(broker_url, prefix)
    heard = _Heard()
    try:
        subscriptions = [
            await bus.subscribe_agent_events(agent_id, heard) for agent_id in ("gone", "other")
        ]

        # When someone deletes the first agent's queue (the broker cancels its consumer)
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(bus.topology.agent_events_queue("gone"))

        # Then the queue is declared, bound and consumed again: the agent's events
        # are heard again (those sent before that reached no queue)
        sent = 0

        async def heard_again() -> bool:
            nonlocal sent
            if heard.by_agent["gone"]:
                return True
            sent += 1
            await bus.publish_event(_event("gone", sent))
            await asyncio.sleep(0.1)
            return bool(heard.by_agent["gone"])

        await wait_until(heard_again, WAIT)
        # and its neighbour was not disturbed
        await bus.publish_event(_event("other", 1))
        await heard.count("other", 1)
        for subscription in subscriptions:
            await subscription.close()
    finally:
        await bus.delete_topology(agent_ids=["gone", "other"])
        await bus.close()


@pytest.mark.rabbitmq
@pytest.mark.fault
async def test_an_agent_subscription_closed_while_the_broker_is_down_stays_closed(
    private_rabbitmq, prefix: str
) -> None:
    url = private_rabbitmq.url
    bus = RabbitMQBus(settings=BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=2))
    await bus.connect()
    heard = _Heard()
    try:
        # Given two agents' queues consumed on one shared channel
        closed = await bus.subscribe_agent_events("closed", heard)
        kept = await bus.subscribe_agent_events("kept", heard)

        # When the broker goes away, one subscription is closed meanwhile, and
        # the broker comes back
        private_rabbitmq.kill()

        async def down() -> bool:
            return not bus.link_up

        await wait_until(down, WAIT)
        await closed.close()
        private_rabbitmq.start_again()

        async def up() -> bool:
            return bus.link_up

        await wait_until(up, 60)

        # Then the other is consumed again, and the closed one is not: its
        # event waits in its queue
        await bus.publish_event(_event("kept", 1))
        await heard.count("kept", 1)
        await bus.publish_event(_event("closed", 1))
        assert await queue_counts(url, bus.topology.agent_events_queue("closed")) == (1, 0)
        assert heard.by_agent["closed"] == []
        await kept.close()
    finally:
        await bus.close()


@pytest.mark.rabbitmq
async def test_an_agent_queue_deleted_under_its_consumer_is_opened_again_by_the_watch(
    broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aio-pika 10 consumes a queue deleted under its consumer again by itself;
    this is for when it does not (an aio-pika without it, a failed recovery):
    the orchestrator notices the broker's cancel and opens the queue again."""
    monkeypatch.setattr(aio_pika.RobustChannel, "_on_consumer_cancel", lambda self, frame: None)
    caplog.set_level(logging.INFO, logger="orchestrator")
    harness = Harness("rabbitmq", BusSettings(broker_url=broker_url, prefix=prefix))
    try:
        # Given an agent registered, its queue followed
        orchestrator = await harness.start_orchestrator()
        await harness.start_agent("worker", [], 1)
        assert "worker" in orchestrator.agent_queues

        # When someone deletes its queue (the broker cancels the consumer)
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(orchestrator.bus.topology.agent_events_queue("worker"))

        # Then the watch notices, and opens the queue again: its results are recorded
        async def noticed() -> bool:
            return (
                any(
                    "worker's events queue is consumed no more" in r.getMessage()
                    for r in caplog.records
                )
                and "worker" in orchestrator.agent_queues
            )

        await wait_until(noticed, WAIT)
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={}, max_retries=0, timeout=60
        )
        final = await orchestrator.wait_for_task(task_id, WAIT)
        assert final["status"] == "completed", final
    finally:
        await harness.close()


class _Stoppable(Subscription):
    """A subscription whose consumer the test stops, as the broker would."""

    def __init__(self) -> None:
        self.stopped = False
        self.closed = False

    async def consuming(self) -> bool:
        return not self.stopped

    async def close(self) -> None:
        self.closed = True


async def test_a_queue_consumed_no_more_for_a_whole_round_is_closed_and_opened_again() -> None:
    # Given an agent followed
    opened: list[_Stoppable] = []

    class _Bus:
        async def subscribe_agent_events(self, agent_id: str, handler: Any, **kwargs: Any):
            opened.append(_Stoppable())
            return opened[-1]

    async def ignore(event: Event) -> None:
        pass

    queues = AgentQueues(_Bus(), ignore)  # type: ignore[arg-type]
    await queues.resume(["worker"])

    # When the broker stops its consumer, the next watch round leaves it a
    # round (the bus may consume again by itself)
    opened[0].stopped = True
    await queues.retry()
    assert len(opened) == 1 and not opened[0].closed
    # Then at the round after, it is closed and opened anew
    await queues.retry()
    assert opened[0].closed and len(opened) == 2 and "worker" in queues
    # while a consumer the bus restored within the round is left alone
    opened[1].stopped = True
    await queues.retry()
    opened[1].stopped = False
    await queues.retry()
    assert not opened[1].closed and len(opened) == 2
    await queues.stop()
