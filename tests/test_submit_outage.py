"""A submit during a broker outage answers in bounded time, and loses nothing it accepted.

Without a durable store a task the broker cannot take is refused with
``ConnectionError`` (the seed's error for a bus failure) and leaves no trace;
with one (SQLite) it is kept, marked queued, and published once the link is
back. Either way the caller hears within ``submit_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import MemoryBus
from orchestrator import SQLiteStore, TaskOrchestrator
from tests.brokers import RabbitMQNode
from tests.harness import FAST, Harness, wait_until

BOUND = FAST.model_copy(update={"submit_timeout": 0.5, "lost_retry_grace": 0.2})
JOB = {"name": "t", "description": "", "task_type": "job", "payload": {}}


class _Outage(MemoryBus):
    """The in-process bus with an outage a test switches on: the link reads
    down (``down``), or publishes hang without an answer (``hang``)."""

    down = False
    hang = False

    @property
    def link_up(self) -> bool:
        return not self.down and super().link_up

    async def publish_task(self, message, **kwargs) -> None:
        if self.hang:
            await asyncio.Event().wait()
        await super().publish_task(message, **kwargs)


@pytest.fixture
def outage(harness: Harness) -> _Outage:
    if harness.bus_kind != "memory":
        pytest.skip("an outage switched on in-process; the broker's own outage is below")
    bus = _Outage(settings=harness.settings)
    harness.use_memory_bus(bus)
    return bus


async def test_without_a_durable_store_a_submit_is_refused_in_bounded_time_leaving_nothing(
    harness: Harness, outage: _Outage
) -> None:
    # Given an orchestrator on the in-memory store, and a broker link that is down
    orchestrator = await harness.start_orchestrator(BOUND)
    outage.down = True

    # When a task is submitted
    began = time.monotonic()
    with pytest.raises(ConnectionError, match="not accepted"):
        await orchestrator.submit_task(**JOB)

    # Then it was refused within the bound, and nothing of it is left
    assert time.monotonic() - began < BOUND.submit_timeout + 1.0
    stats = await orchestrator.get_stats()
    assert (stats["tasks_created"], stats["pending_tasks"]) == (0, 0)


async def test_a_publish_that_never_answers_returns_in_bounded_time_and_runs_later(
    harness: Harness, outage: _Outage
) -> None:
    # Given a broker that takes a publish and never answers it
    orchestrator = await harness.start_orchestrator(BOUND)
    await harness.start_agent("worker", [], 1)
    outage.hang = True

    # When a task is submitted, the submit returns within the bound: the
    # message may have been routed, so the task is accepted, pending, watched
    began = time.monotonic()
    task_id = await orchestrator.submit_task(**JOB)
    assert time.monotonic() - began < BOUND.submit_timeout + 1.0
    assert (await orchestrator.get_task_status(task_id))["status"] == "pending"

    # Then once the broker answers again, the watch finds its queue empty and
    # publishes it: it runs once
    outage.hang = False
    status = await orchestrator.wait_for_task(task_id, 15)
    assert (status["status"], status["result"]["echo"]) == ("completed", {})


async def test_a_short_blip_is_waited_out_within_the_bound(
    harness: Harness, outage: _Outage
) -> None:
    orchestrator = await harness.start_orchestrator(BOUND.model_copy(update={"submit_timeout": 5}))
    await harness.start_agent("worker", [], 1)
    outage.down = True
    asyncio.get_running_loop().call_later(0.3, setattr, outage, "down", False)
    task_id = await orchestrator.submit_task(**JOB)
    assert (await orchestrator.wait_for_task(task_id, 15))["status"] == "completed"


async def test_with_a_durable_store_the_task_is_kept_and_runs_once_the_link_is_back(
    harness: Harness, outage: _Outage, tmp_path: Path
) -> None:
    # Given an orchestrator on SQLite, an agent, and a broker link that is down
    orchestrator = await harness.start_orchestrator(BOUND, store=SQLiteStore(tmp_path / "s.db"))
    await harness.start_agent("worker", [], 1)
    outage.down = True

    # When a task is submitted, it is accepted at once, pending
    began = time.monotonic()
    task_id = await orchestrator.submit_task(**JOB)
    assert time.monotonic() - began < BOUND.submit_timeout
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("pending", None)

    # Then once the link is back it is published and runs, once
    outage.down = False
    status = await orchestrator.wait_for_task(task_id, 15)
    assert (status["status"], status["result"]["echo"]) == ("completed", {})
    assert (await orchestrator.get_stats())["tasks_created"] == 1


@contextlib.asynccontextmanager
async def _stopped(node: RabbitMQNode, orchestrator: TaskOrchestrator) -> AsyncIterator[None]:
    """While inside, the broker's app is stopped and the orchestrator knows it."""
    await asyncio.to_thread(node.ctl, "stop_app")
    try:

        async def link_down() -> bool:
            return not orchestrator.bus.link_up

        await wait_until(link_down, timeout=30)
        yield
    finally:
        await asyncio.to_thread(node.ctl, "start_app")
        await asyncio.to_thread(node.ctl, "await_startup")


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_a_submit_while_the_broker_is_stopped_is_refused_in_bounded_time(
    harness: Harness, private_rabbitmq: RabbitMQNode
) -> None:
    # Given an orchestrator on a broker of the test's own, which then stops
    orchestrator = await harness.start_orchestrator(BOUND)
    async with _stopped(private_rabbitmq, orchestrator):
        # When a task is submitted, it is refused within the bound, leaving nothing
        began = time.monotonic()
        with pytest.raises(ConnectionError):
            await orchestrator.submit_task(**JOB)
        assert time.monotonic() - began < BOUND.submit_timeout + 1.0
        assert (await orchestrator.get_stats())["tasks_created"] == 0

    # And once it is back, a submit goes through again
    async def link_up() -> bool:
        return orchestrator.bus.link_up

    await wait_until(link_up, timeout=60)
    await harness.start_agent("worker", [], 1)
    task_id = await orchestrator.submit_task(**JOB)
    assert (await orchestrator.wait_for_task(task_id, 30))["status"] == "completed"


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_with_a_durable_store_a_submit_while_the_broker_is_stopped_runs_once_it_is_back(
    harness: Harness, private_rabbitmq: RabbitMQNode, tmp_path: Path
) -> None:
    # Given an orchestrator on SQLite and an agent process, on a broker of the
    # test's own, which then stops
    orchestrator = await harness.start_orchestrator(BOUND, store=SQLiteStore(tmp_path / "s.db"))
    run_log = tmp_path / "runs"
    harness.spawn_agent("worker", [], AGENT_RUN_LOG=run_log)
    await harness.wait_agents("worker", timeout=60)
    async with _stopped(private_rabbitmq, orchestrator):
        # When a task is submitted, it is accepted within the bound, pending
        began = time.monotonic()
        task_id = await orchestrator.submit_task(**JOB)
        assert time.monotonic() - began < BOUND.submit_timeout + 1.0
        status = await orchestrator.get_task_status(task_id)
        assert (status["status"], status["assigned_agent"]) == ("pending", None)

    # Then once the broker is back it is published and runs, once
    status = await orchestrator.wait_for_task(task_id, 60)
    assert (status["status"], status["retry_count"]) == ("completed", 0)
    runs = [line.split()[:2] for line in run_log.read_text().splitlines()]
    assert runs == [["start", task_id], ["end", task_id]]
    assert (await orchestrator.get_stats())["tasks_created"] == 1
