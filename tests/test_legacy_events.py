"""An earlier version's single events queue, ``<p>.orchestrator.events``, after an upgrade.

Every event went there before each agent had a queue of its own. Left bound
and unread it would grow without end; what waits in it (events sent before
the upgrade) must still be handled.
"""

from __future__ import annotations

import aio_pika
import aiormq
import pytest

from broker import AgentAnnounced, BusSettings, TaskFinished, Topology
from orchestrator import MemoryStore
from tests.conftest import require_broker
from tests.harness import FAST, Harness, wait_until

pytestmark = pytest.mark.rabbitmq


async def _depth(url: str, queue: str) -> int | None:
    """Messages in ``queue``; None if it does not exist."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return declared.declaration_result.message_count or 0


async def test_an_earlier_versions_events_queue_is_drained_unbound_and_deleted(
    prefix: str,
) -> None:
    url = require_broker()
    settings = BusSettings(broker_url=url, prefix=prefix, connect_attempts=1)
    harness = Harness("rabbitmq", settings)
    topology = Topology(prefix)
    legacy = topology.legacy_events_queue
    store = MemoryStore()
    try:
        # Given the events queue of an earlier version, bound as it was, with an
        # announcement that waited in it through the upgrade
        bus = await harness.connected_bus()
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                legacy, durable=True, arguments={"x-queue-type": "classic"}
            )
            for key in ("task.#", "agent.#"):
                await queue.bind(topology.events_exchange, key)
        announced = AgentAnnounced(agent_id="old", capabilities=["x"], max_concurrent_tasks=1)
        await bus.publish_event(announced)
        assert await _depth(url, legacy) == 1

        # When the new orchestrator starts
        orchestrator = await harness.start_orchestrator(FAST, store=store)

        # Then it handles what waited there (the agent is registered)
        async def registered() -> bool:
            return "old" in {a.agent_id for a in await orchestrator.get_agents()}

        await wait_until(registered, 30)

        async def drained() -> bool:
            return await _depth(url, legacy) == 0

        await wait_until(drained, 30)

        # And, the orchestrator stopped, the old queue takes nothing new
        await orchestrator.stop()
        await bus.publish_event(
            TaskFinished(task_id="t", attempt=1, agent_id="old", outcome="completed")
        )
        await bus.publish_event(announced)
        assert await _depth(url, legacy) == 0

        # And the next start deletes it, empty
        await harness.start_orchestrator(FAST, store=store)
        assert await _depth(url, legacy) is None
    finally:
        await harness.close()
