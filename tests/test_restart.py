"""The orchestrator restarts while a retry waits: the broker kept the timer."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents import TaskContext
from orchestrator import SQLiteStore, Task, TaskOrchestrator, TaskPriority, TaskStatus
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


# ----------------------------------------------------- a restart while releasing dependents


def _task(task_id: str, status: TaskStatus, deps: list[str] = (), **changes) -> Task:
    task = Task(
        task_id=task_id,
        name=f"name of {task_id}",
        description="",
        task_type="j",
        priority=TaskPriority.MEDIUM,
        payload={"id": task_id},
        dependencies=list(deps),
        status=status,
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


async def _write(path: Path, *tasks: Task) -> None:
    """The store as an orchestrator killed mid-way left it."""
    store = SQLiteStore(path)
    for task in tasks:
        await store.save_task(task)
    await store.flush()
    await store.close()


async def test_dependents_left_pending_by_a_crash_run_after_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a store where a dependency completed (and was saved) but the orchestrator
    # died before publishing its dependents: they are still pending
    path = tmp_path / "state.sqlite"
    await _write(
        path,
        _task("dep", TaskStatus.COMPLETED, result={"dep": 1}, attempt=1, completed_at=1.0),
        _task("other", TaskStatus.COMPLETED, result={"other": 2}, attempt=1, completed_at=1.0),
        _task("first", TaskStatus.PENDING, ["dep"]),
        _task("second", TaskStatus.PENDING, ["dep", "other"]),
        _task("later", TaskStatus.PENDING, ["first"]),  # waits, then runs
    )

    # When a new orchestrator starts on that file, with an agent
    orchestrator = await harness.start_orchestrator(store=SQLiteStore(path))

    async def deps(ctx: TaskContext) -> dict:
        return {"deps": ctx.dependency_results}

    await harness.start_agent("worker", [], 3, deps)

    # Then every dependent runs, with its dependencies' results
    first = await orchestrator.wait_for_task("first", 15)
    second = await orchestrator.wait_for_task("second", 15)
    later = await orchestrator.wait_for_task("later", 15)
    assert first["status"] == "completed"
    assert first["result"] == {"deps": {"dep": {"dep": 1}}}
    assert second["result"] == {"deps": {"dep": {"dep": 1}, "other": {"other": 2}}}
    assert later["result"] == {"deps": {"first": first["result"]}}
    assert (await orchestrator.get_stats())["completed_tasks"] == 5


@pytest.mark.parametrize(
    ("dead", "expected"),
    [
        (TaskStatus.FAILED, "failed"),
        (TaskStatus.TIMEOUT, "failed"),
        (TaskStatus.CANCELLED, "cancelled"),
    ],
)
async def test_dependents_of_a_dead_dependency_end_after_a_restart(
    harness: Harness, tmp_path: Path, dead: TaskStatus, expected: str
) -> None:
    # Given a store where a dependency ended without completing but its
    # dependents (and theirs) were never ended
    path = tmp_path / "state.sqlite"
    await _write(
        path,
        _task("dep", dead, attempt=1, completed_at=1.0, error_message="boom"),
        _task("child", TaskStatus.PENDING, ["dep"]),
        _task("grandchild", TaskStatus.PENDING, ["child"]),
    )

    # When a new orchestrator starts on that file
    orchestrator = await harness.start_orchestrator(store=SQLiteStore(path))

    # Then they end, each naming the dependency that doomed it, as without a restart
    child = await orchestrator.wait_for_task("child", 15)
    grandchild = await orchestrator.wait_for_task("grandchild", 15)
    assert child["status"] == expected
    assert child["error_message"] == f"dependency dep (name of dep) ended {dead.value}"
    assert grandchild["status"] == expected
    assert grandchild["error_message"] == f"dependency child (name of child) ended {expected}"

    # And that is what the file says for the next orchestrator
    await orchestrator.stop()
    harness.orchestrator = None
    again = SQLiteStore(path)
    saved = {t.task_id: t.status.value for t in await again.tasks()}
    await again.close()
    assert saved == {"dep": dead.value, "child": expected, "grandchild": expected}
