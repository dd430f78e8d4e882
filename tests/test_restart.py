"""The orchestrator restarts while a retry waits: the broker kept the timer."""

from __future__ import annotations

from pathlib import Path

from agents import TaskContext
from orchestrator import SQLiteStore, TaskOrchestrator
from tests.harness import FAST, Harness, wait_until


async def test_retry_scheduled_before_a_restart_runs_after_it(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task whose first attempt failed, its retry waiting a second
    path = tmp_path / "state.sqlite"
    settings = FAST.model_copy(update={"retry_base_delay": 1.0, "retry_max_delay": 2.0})
    first = await harness.start_orchestrator(settings, store=SQLiteStore(path))

    async def fails_once(ctx: TaskContext) -> dict:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}

    await harness.start_agent("worker", [], 2, fails_once)
    task_id = await first.submit_task(name="t", description="", task_type="j", payload={})

    async def retry_waiting() -> bool:
        status = await first.get_task_status(task_id)
        return status["retry_count"] == 1 and status["status"] == "assigned"

    await wait_until(retry_waiting, timeout=10)

    # When the orchestrator stops and another starts on the same state
    await first.stop()
    bus = harness.new_bus()
    await bus.connect()
    second = TaskOrchestrator(bus, settings=settings, store=SQLiteStore(path))
    harness.orchestrator = second
    await second.start()

    # Then the retry arrives from the broker and the new orchestrator completes it
    status = await second.wait_for_task(task_id, timeout=15)
    assert status["status"] == "completed"
    assert status["result"] == {"attempt": 2}
    assert status["retry_count"] == 1
