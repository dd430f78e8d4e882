"""A subscription whose before-ack hook failed acknowledges once it succeeds,
even if nothing else comes.

The orchestrator's events are acknowledged only after the store has written
their effects (the ``before_ack`` hook). A store outage longer than its own
retry fails the hook: what was handled stays unacknowledged, which is safe,
but with the prefetch full of those nothing else arrives to try again. The
subscription retries hook and ack on a timer. (RabbitMQ only: the in-process
bus has no acknowledgements to hold back.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker import BusSettings, RabbitMQBus, TaskFinished

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True),
]

WAIT = 30


def _finished(task_id: str) -> TaskFinished:
    return TaskFinished(task_id=task_id, attempt=1, agent_id="worker", outcome="completed")


async def test_a_failed_flush_is_retried_and_then_acknowledged(bus_settings: BusSettings) -> None:
    # Given the events subscription of an orchestrator whose store is down at
    # its first flush, and back after
    bus = RabbitMQBus(settings=bus_settings)
    await bus.connect()
    heard: list[str] = []
    calls: list[bool] = []
    flushed = asyncio.Event()

    async def on_event(event: Any) -> None:
        heard.append(event.task_id)

    async def flush() -> None:
        calls.append(not calls)
        if len(calls) == 1:
            raise RuntimeError("store down")
        flushed.set()

    try:
        subscription = await bus.subscribe_agent_events("worker", on_event, before_ack=flush)

        # When one event comes, and nothing after it
        await bus.publish_event(_finished("first"))

        # Then the flush is tried again without another message, and succeeds
        await asyncio.wait_for(flushed.wait(), WAIT)
        assert heard == ["first"]
        assert calls[:2] == [True, False]
        await subscription.close()

        # And the event was acknowledged: a new subscription of the same queue
        # hears only what comes after it
        again: list[str] = []
        fence = asyncio.Event()

        async def on_again(event: Any) -> None:
            again.append(event.task_id)
            if event.task_id == "fence":
                fence.set()

        subscription = await bus.subscribe_agent_events("worker", on_again)
        await bus.publish_event(_finished("fence"))
        await asyncio.wait_for(fence.wait(), WAIT)
        assert again == ["fence"]
        await subscription.close()
    finally:
        await bus.delete_agent_events("worker")
        await bus.close()
