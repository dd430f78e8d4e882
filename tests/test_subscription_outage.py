"""A subscription closed while the broker is away stays closed when it is back.

aio-pika's robust channels restore, on reconnecting, every channel that was
not closed through them, with its consumers. A subscription closed while the
link was down (an orchestrator stepping down because its connection dropped)
used to skip closing its channel ("it is closed already"), so the reconnect
brought its consumer back: a ghost that took messages into an inbox nobody
read and never acknowledged them.
"""

from __future__ import annotations

import pytest

from broker import AgentAnnounced, BusSettings, Event, RabbitMQBus
from tests.harness import queue_counts, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault]


async def test_a_subscription_closed_while_the_broker_is_down_stays_closed(
    private_rabbitmq, prefix: str
) -> None:
    url = private_rabbitmq.url
    bus = RabbitMQBus(settings=BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=2))
    await bus.connect()
    handled: list[Event] = []

    async def handle(event: Event) -> None:
        handled.append(event)

    try:
        # Given the orchestrator's events subscription, consuming
        subscription = await bus.subscribe_events(handle)
        events_queue = bus.topology.orchestrator_events_queue
        assert (await queue_counts(url, events_queue))[1] == 1

        # When the broker goes away, the subscription is closed meanwhile,
        # and the broker comes back
        private_rabbitmq.kill()

        async def down() -> bool:
            return not bus.link_up

        await wait_until(down, 30)
        await subscription.close()
        private_rabbitmq.start_again()

        async def up() -> bool:
            return bus.link_up

        await wait_until(up, 60)

        # Then an event sent after the reconnect (through the bus, which restored
        # its own channels by then) waits in the queue, consumed by nobody
        await bus.publish_event(
            AgentAnnounced(agent_id="someone", capabilities=[], max_concurrent_tasks=1)
        )
        ready, consumers = await queue_counts(url, events_queue)
        assert (ready, consumers) == (1, 0)
        assert handled == []
    finally:
        await bus.close()
