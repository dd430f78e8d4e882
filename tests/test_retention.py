"""finished_task_ttl: finished tasks are forgotten, their counts are not."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from agents import TaskContext
from orchestrator import SQLiteStore, Task, TaskOrchestrator, TaskPriority
from orchestrator.retention import FinishedTasks
from orchestrator.sqlite_store import SCHEMA_VERSION
from tests.harness import FAST, Harness, wait_until

TTL = FAST.model_copy(update={"finished_task_ttl": 0.3})


async def forgotten(orchestrator: TaskOrchestrator, task_id: str) -> bool:
    return await orchestrator.get_task_status(task_id) is None


async def test_finished_tasks_are_forgotten_and_still_counted(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator(TTL)

    async def work(ctx: TaskContext) -> dict:
        if ctx.payload.get("fail"):
            raise RuntimeError("no")
        return {"n": ctx.payload["n"]}

    await harness.start_agent("w", [], 4, work)
    ids = [await orchestrator.submit_task("t", "", "j", {"n": n}) for n in range(5)]
    failing = await orchestrator.submit_task("f", "", "j", {"fail": True, "n": 9}, max_retries=0)
    for task_id in [*ids, failing]:
        await orchestrator.wait_for_task(task_id, timeout=20)
    before = await orchestrator.get_stats()

    for task_id in [*ids, failing]:
        await wait_until(lambda t=task_id: forgotten(orchestrator, t), timeout=10)
    assert await orchestrator.get_stats() == before
    assert before["tasks_created"] == 6 and before["tasks_completed"] == 5
    assert before["tasks_failed"] == 1


async def test_a_dependency_is_kept_while_a_dependent_needs_its_result(harness: Harness) -> None:
    # Given a finished task A, and B waiting for A and for a gated task G
    orchestrator = await harness.start_orchestrator(TTL)
    gate = asyncio.Event()

    async def work(ctx: TaskContext) -> dict:
        if ctx.payload.get("gate"):
            await gate.wait()
        return {"name": ctx.payload["name"], "deps": ctx.dependency_results}

    await harness.start_agent("w", [], 4, work)
    a = await orchestrator.submit_task("a", "", "j", {"name": "a"})
    await orchestrator.wait_for_task(a, timeout=20)
    g = await orchestrator.submit_task("g", "", "j", {"name": "g", "gate": True})
    b = await orchestrator.submit_task("b", "", "j", {"name": "b"}, dependencies=[a, g])

    # When several times the ttl pass, then A is still there for B
    other = await orchestrator.submit_task("c", "", "j", {"name": "c"})
    await orchestrator.wait_for_task(other, timeout=20)
    await wait_until(lambda: forgotten(orchestrator, other), timeout=10)
    assert (await orchestrator.get_task_status(a))["status"] == "completed"

    # And once G ends, B runs with A's result, and then A and B are forgotten too
    gate.set()
    status = await orchestrator.wait_for_task(b, timeout=20)
    assert status["result"]["deps"][a] == {"name": "a", "deps": {}}
    await wait_until(lambda: forgotten(orchestrator, a), timeout=10)
    await wait_until(lambda: forgotten(orchestrator, b), timeout=10)


async def test_counts_of_forgotten_tasks_survive_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    path = tmp_path / "state.sqlite"
    first = await harness.start_orchestrator(TTL, store=SQLiteStore(path))
    await harness.start_agent("w", [], 4)
    ids = [await first.submit_task("t", "", "j", {"n": n}) for n in range(3)]
    for task_id in ids:
        await first.wait_for_task(task_id, timeout=20)
    for task_id in ids:
        await wait_until(lambda t=task_id: forgotten(first, t), timeout=10)
    before = await first.get_stats()
    await first.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0

    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    second = TaskOrchestrator(bus, settings=TTL, store=SQLiteStore(path))
    harness.orchestrator = second
    await second.start()
    after = await second.get_stats()
    for key in ("tasks_created", "tasks_completed", "tasks_failed", "avg_completion_time"):
        assert after[key] == before[key], key


async def test_a_version_1_file_gains_the_meta_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
            " record TEXT NOT NULL);"
            "CREATE TABLE agents (agent_id TEXT PRIMARY KEY, record TEXT NOT NULL);"
            "PRAGMA user_version=1;"
        )
    store = SQLiteStore(path)
    await store.save_meta("k", {"v": 1})
    await store.close()
    again = SQLiteStore(path)
    assert await again.get_meta("k") == {"v": 1}
    await again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # upgraded


def test_finished_tasks_expire_in_order_unless_a_dependent_still_needs_them() -> None:
    retention = FinishedTasks(ttl=10)
    dep = Task("dep", "n", "", "j", TaskPriority.LOW, {})
    dependent = Task("dependent", "n", "", "j", TaskPriority.LOW, {}, dependencies=["dep"])
    alone = Task("alone", "n", "", "j", TaskPriority.LOW, {})
    for task in (dep, dependent, alone):
        retention.submitted(task)
    dep.completed_at, alone.completed_at = 1.0, 2.0
    retention.finished(dep)
    retention.finished(alone)
    assert retention.expired(5.0) == []
    assert retention.expired(12.5) == ["alone"]  # dep is still needed: kept one more ttl
    dependent.completed_at = 13.0
    retention.finished(dependent)
    assert retention.expired(22.0) == []
    assert retention.expired(23.0) == ["dep", "dependent"]
    assert FinishedTasks(ttl=None).expired(1e9) == []
