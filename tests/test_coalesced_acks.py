"""Acknowledgements go many to a frame (broker/rabbitmq_acks.py), and none too early.

Every task used to cost two ack frames, the agent's for its delivery and the
orchestrator's for its final event, each parsed and settled by the broker.
They are coalesced per channel now: what a channel's consumers handled within
a few milliseconds goes in one ack with ``multiple``. These tests count the
frames the client sends (aiormq's ``basic_ack``), on a real broker, and check
that nothing was settled that should not be: every queue ends empty, with
nothing unacknowledged, and nothing ran twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiormq
import pytest

from agents import TaskContext
from broker import BusSettings, Event, RabbitMQBus, TaskProgress
from tests.harness import FAST, Harness, queue_counts, wait_all, wait_until

WAIT = 60.0


class _AckFrames:
    """The ack frames sent, counted by whether they settle many (``multiple``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: Counter[str] = Counter()
        original = aiormq.Channel.basic_ack

        async def counted(
            channel: Any, delivery_tag: int, multiple: bool = False, **kw: Any
        ) -> Any:
            self.sent["multiple" if multiple else "single"] += 1
            return await original(channel, delivery_tag, multiple=multiple, **kw)

        monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


@pytest.mark.rabbitmq
async def test_many_agents_events_on_a_shared_channel_take_a_few_ack_frames(
    broker_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an orchestrator's bus and two agents' events queues (to be consumed on
    # one shared channel), and a count of the ack frames it sends
    bus = RabbitMQBus(settings=BusSettings(broker_url=broker_url, prefix=prefix))
    await bus.connect()
    frames = _AckFrames(monkeypatch)
    heard: Counter[str] = Counter()

    async def on_event(event: Event) -> None:
        heard[event.agent_id] += 1

    agents = ["left", "right"]
    try:
        # (declared, then left unconsumed while each agent's 300 events wait there)
        for agent_id in agents:
            await (await bus.subscribe_agent_events(agent_id, on_event)).close()

        # When each agent sends 300 events at once, and then both queues are followed
        await asyncio.gather(
            *(
                bus.publish_event(
                    TaskProgress(agent_id=agent_id, task_id=f"t{n}", attempt=1, progress=0.5)
                )
                for n in range(300)
                for agent_id in agents
            )
        )
        frames.sent.clear()
        subscriptions = [await bus.subscribe_agent_events(a, on_event) for a in agents]

        async def all_heard() -> bool:
            return all(heard[a] == 300 for a in agents)

        await wait_until(all_heard, WAIT)
        for subscription in subscriptions:
            await subscription.close()

        # Then the 600 were acknowledged in far fewer frames than one each
        assert frames.total <= 100, frames.sent  # (before: 182, batched per queue only)
        # and every one was acknowledged, once: nothing waits, nothing came twice
        for agent_id in agents:
            assert await queue_counts(broker_url, bus.topology.agent_events_queue(agent_id)) == (
                0,
                0,
            )
        assert heard == {"left": 300, "right": 300}
    finally:
        await bus.delete_topology(agent_ids=agents)
        await bus.close()


@pytest.mark.rabbitmq
async def test_an_agents_task_acks_are_coalesced_and_no_task_runs_twice(
    broker_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an orchestrator and an agent of 20 slots on RabbitMQ
    harness = Harness("rabbitmq", BusSettings(broker_url=broker_url, prefix=prefix))
    runs: Counter[str] = Counter()

    async def noop(ctx: TaskContext) -> dict:
        runs[ctx.task_id] += 1
        await asyncio.sleep(0)
        return {}

    try:
        orchestrator = await harness.start_orchestrator(FAST)
        await harness.start_agent("worker", [], 20, noop)
        frames = _AckFrames(monkeypatch)

        # When 400 no-op tasks are submitted at once
        ids = await asyncio.gather(
            *(
                orchestrator.submit_task(name="t", description="", task_type="job", payload={})
                for _ in range(400)
            )
        )
        statuses = await wait_all(orchestrator, ids, timeout=WAIT)

        # Then each ran once and completed, and the 800 deliveries (400 tasks to
        # the agent, 400 final events to the orchestrator) took far fewer frames
        assert {s["status"] for s in statuses} == {"completed"}
        assert set(runs.values()) == {1} and len(runs) == 400
        assert frames.total <= 300, frames.sent  # (before: 417, one per task delivery)
    finally:
        await harness.close()
