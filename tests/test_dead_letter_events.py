"""A bad event is dead-lettered, and must not fail the live task it names.

Events that cannot be parsed (or whose handling fails) go to the dead
letters like poison task messages do; only a dead-lettered *task message* of
the task's current attempt may end the task.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aio_pika
import pytest

from agents import TaskContext
from broker import BusConnectionError, BusSettings, MemoryBus
from tests.harness import FAST, Harness, wait_until


async def _inject_event(harness: Harness, routing_key: str, body: bytes) -> None:
    """Put raw bytes on the events exchange, as a broken publisher would."""
    bus = harness.orchestrator.bus
    if isinstance(bus, MemoryBus):
        for queue in bus._event_queues:
            if queue.matches(routing_key):
                queue.items.put_nowait(body)
        return
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(bus.topology.events_exchange)
        await exchange.publish(aio_pika.Message(body), routing_key=routing_key)


@pytest.mark.parametrize(
    "shape",
    [
        # A finished event that names the task and its attempt but does not parse.
        pytest.param({"outcome": "exploded"}, id="bad-outcome"),
        # One with no attempt at all.
        pytest.param({"outcome": "failed", "attempt": None}, id="no-attempt"),
    ],
)
async def test_unparseable_event_naming_a_running_task_leaves_it_running(
    harness: Harness, caplog: pytest.LogCaptureFixture, shape: dict
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator")
    # Given a task running on an agent, held until the test lets it finish
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> dict:
        await release.wait()
        return {"done": ctx.attempt}

    await harness.start_agent("worker", [], 1, held)
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="j", payload={}, max_retries=0
    )

    async def running() -> bool:
        return (await orchestrator.get_task_status(task_id))["status"] == "running"

    await wait_until(running, timeout=15)

    # When a malformed event naming that task (and its attempt) reaches the orchestrator
    body = {
        "v": 1,
        "kind": "task.finished",
        "task_id": task_id,
        "attempt": 1,
        "agent_id": "worker",
        **shape,
    }
    await _inject_event(harness, "task.finished", json.dumps(body).encode())

    # Then the orchestrator gets its dead letter and only logs it
    def ignored() -> bool:
        return any(
            "not a task message" in r.getMessage() and task_id in r.getMessage()
            for r in caplog.records
        )

    async def handled() -> bool:
        status = (await orchestrator.get_task_status(task_id))["status"]
        return ignored() or status != "running"

    await wait_until(handled, timeout=15)
    status = await orchestrator.get_task_status(task_id)
    assert status["status"] == "running", status
    assert ignored()

    # And the task goes on to complete normally
    release.set()
    final = await orchestrator.wait_for_task(task_id, 15)
    assert final["status"] == "completed"
    assert final["result"] == {"done": 1}


async def test_a_dependent_too_large_to_publish_fails_and_its_siblings_still_run(
    harness: Harness,
) -> None:
    # Given two tasks whose results together exceed the largest message, a task
    # that depends on both, and a small one released at the same moment
    orchestrator = await harness.start_orchestrator()
    half = harness.settings.max_message_bytes * 6 // 10
    gate = asyncio.Event()

    async def big(ctx: TaskContext) -> dict:
        if ctx.payload.get("wait"):
            await gate.wait()
        return {"blob": "x" * half} if ctx.payload.get("big") else {"small": True}

    await harness.start_agent("worker", [], 3, big)
    job = {"description": "", "task_type": "j", "max_retries": 0}
    first = await orchestrator.submit_task(name="a", payload={"big": True}, **job)
    second = await orchestrator.submit_task(name="b", payload={"big": True, "wait": True}, **job)
    await orchestrator.wait_for_task(first, 15)
    too_large = await orchestrator.submit_task(
        name="too large", payload={}, dependencies=[first, second], **job
    )
    small = await orchestrator.submit_task(name="small", payload={}, dependencies=[second], **job)

    # When the last dependency completes and both are released
    gate.set()

    # Then the one that cannot be published fails with the reason, the other runs
    failed = await orchestrator.wait_for_task(too_large, 15)
    assert failed["status"] == "failed"
    assert "not published" in failed["error_message"]
    assert (await orchestrator.wait_for_task(small, 15))["status"] == "completed"


class _FailingPublishes(MemoryBus):
    """The in-process bus, with task publishes failing as during a broker outage."""

    fail_publishes = 0

    async def publish_task(self, message, **kwargs) -> None:
        if self.fail_publishes > 0:
            self.fail_publishes -= 1
            raise BusConnectionError("broker unreachable (injected)")
        await super().publish_task(message, **kwargs)


async def test_dependents_released_while_the_bus_fails_are_published_later(
    prefix: str,
) -> None:
    # Given a task with three dependents, on a bus whose next task publish fails
    harness = Harness("memory", BusSettings(prefix=prefix))
    bus = _FailingPublishes(settings=harness.settings)
    harness._memory_bus = bus
    harness.buses.append(bus)
    try:
        orchestrator = await harness.start_orchestrator(
            FAST.model_copy(update={"lost_retry_grace": 0.2})
        )
        gate = asyncio.Event()

        async def work(ctx: TaskContext) -> dict:
            if ctx.payload.get("wait"):
                await gate.wait()
            return {"attempt": ctx.attempt}

        await harness.start_agent("worker", [], 3, work)
        job = {"description": "", "task_type": "j", "max_retries": 0}
        dep = await orchestrator.submit_task(name="dep", payload={"wait": True}, **job)
        dependents = [
            await orchestrator.submit_task(name=f"d{i}", payload={}, dependencies=[dep], **job)
            for i in range(3)
        ]

        # When the dependency completes and publishing its first dependent fails
        bus.fail_publishes = 1
        gate.set()

        # Then all three are published later by the watch and complete
        done = [await orchestrator.wait_for_task(t, 15) for t in dependents]
        assert [d["status"] for d in done] == ["completed"] * 3
        assert bus.fail_publishes == 0
        # and handling the dependency's result did not fail (no dead letter)
        assert bus.dead_letters == []
    finally:
        await harness.close()
