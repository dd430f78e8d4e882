"""After a restart the orchestrator declares its unfinished tasks' queues again: agents only
check them passively, and one deleted while no orchestrator ran must not strand its tasks."""

from __future__ import annotations

from pathlib import Path

from agents import TaskContext
from broker import MemoryBus, route_key
from orchestrator import SQLiteStore, TaskOrchestrator
from tests.harness import FAST, Harness


async def test_a_queue_deleted_while_no_orchestrator_ran_is_declared_again(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task queued with no agent to take it, and the orchestrator stopped
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(update={"lost_retry_grace": 0.2})
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))
    task_id = await first.submit_task(name="t", description="", task_type="j", payload={})
    await first.stop()

    # When its queue is deleted (on RabbitMQ) or emptied (in-process) meanwhile:
    # purged by an operator, or lost with a broker's data
    cleaner = harness.new_bus()
    if not cleaner.is_connected:
        await cleaner.connect()
    if isinstance(cleaner, MemoryBus):
        assert await cleaner.purge(cleaner.topology.task_queue(route_key("j", []))) == 1
    else:
        await cleaner.delete_topology({route_key("j", [])})

    # Then another orchestrator on the same store declares it again: an agent can
    # consume it and a new task of that type runs. (The deleted message is not
    # recovered: a confirmed message is the broker's to keep, and one an agent took
    # while no orchestrator ran must not run twice; see test_restart.py.)
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    harness.orchestrator = second
    await second.start()

    async def attempt(ctx: TaskContext) -> dict:
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 1, attempt, task_type="j")
    again = await second.submit_task(name="t2", description="", task_type="j", payload={})
    assert (await second.wait_for_task(again, 20))["status"] == "completed"
    assert (await second.get_task_status(task_id))["status"] == "pending"
