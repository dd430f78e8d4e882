"""The SQLite store: what one orchestrator wrote, the next one reads, on both buses."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from agents import TaskContext
from orchestrator import SQLiteStore, Task, TaskOrchestrator, TaskPriority, TaskStatus
from orchestrator.models import AgentCapability, Delivery
from orchestrator.records_codec import task_from_record, task_to_record
from orchestrator.sqlite_store import SCHEMA_VERSION
from tests.harness import FAST, Harness, wait_until


def make_task(task_id: str, **changes) -> Task:
    task = Task(
        task_id=task_id,
        name="n",
        description="d",
        task_type="t",
        priority=TaskPriority.HIGH,
        payload={"x": [1, 2, {"y": "z"}]},
        dependencies=["a", "b"],
        required_capabilities=["gpu"],
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def test_records_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SQLiteStore(path)
    task = make_task(
        "t1",
        status=TaskStatus.FAILED,
        result={"ok": False},
        error_message="boom",
        retry_count=2,
        attempt=3,
        progress=0.5,
        started_at=12.5,
    )
    agent = AgentCapability("a1", ["gpu", "io"], max_concurrent_tasks=7, last_seen=99.0)
    agent.specialization_score["t"] = 0.9
    await store.save_task(task)
    await store.save_agent(agent)
    await store.close()

    again = SQLiteStore(path)
    [read] = await again.tasks()
    [read_agent] = await again.agents()
    await again.close()
    assert read == task
    assert (read_agent.agent_id, read_agent.capabilities) == ("a1", ["gpu", "io"])
    assert read_agent.max_concurrent_tasks == 7 and read_agent.specialization_score == {"t": 0.9}


async def test_a_flush_writes_every_change_in_one_go_and_deletes_stick(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SQLiteStore(path, flush_interval=60)  # only explicit flushes
    for i in range(200):
        await store.save_task(make_task(f"t{i}"))
    await store.save_agent(AgentCapability("a", []))
    assert rows(path, "tasks") == 0  # batched, not yet written
    await asyncio.gather(*(store.flush() for _ in range(5)))
    assert rows(path, "tasks") == 200 and rows(path, "agents") == 1

    await store.delete_task("t0")
    await store.delete_agent("a")
    task = await store.get_task("t1")
    assert task is not None
    task.status = TaskStatus.COMPLETED
    await store.save_task(task)
    await store.flush()
    await store.close()

    again = SQLiteStore(path)
    assert await again.get_task("t0") is None
    read = await again.get_task("t1")
    assert read is not None and read.status is TaskStatus.COMPLETED
    assert await again.agents() == []
    await again.close()


async def test_changes_reach_the_file_by_themselves_soon(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = SQLiteStore(path, flush_interval=0.01)
    await store.save_task(make_task("t1"))

    async def written() -> bool:
        return rows(path, "tasks") == 1

    await wait_until(written, timeout=5)
    await store.close()


async def test_a_file_from_a_newer_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    store = SQLiteStore(path)
    with pytest.raises(RuntimeError, match="schema version 99"):
        await store.tasks()
    await store.close()


async def test_a_new_file_carries_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite"
    store = SQLiteStore(path)
    await store.tasks()
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------- restarts


async def restart(harness: Harness, old: TaskOrchestrator, path: Path) -> TaskOrchestrator:
    """Stop ``old`` and start a new orchestrator on a new store over the same file."""
    await old.stop()
    bus = harness.new_bus()
    if not bus.is_connected:
        await bus.connect()
    new = TaskOrchestrator(bus, settings=FAST, store=SQLiteStore(path))
    harness.orchestrator = new
    await new.start()
    return new


async def test_a_restarted_orchestrator_knows_every_task_and_the_stats(
    harness: Harness, tmp_path: Path
) -> None:
    # Given finished, failed and waiting tasks under a SQLite store
    path = tmp_path / "state.sqlite"
    first = await harness.start_orchestrator(store=SQLiteStore(path))
    gate = asyncio.Event()

    async def work(ctx: TaskContext) -> dict:
        if ctx.payload.get("fail"):
            raise ValueError("bad input")
        if ctx.payload.get("gate"):
            await gate.wait()
        return {"n": ctx.payload.get("n"), "deps": ctx.dependency_results}

    await harness.start_agent("w1", [], 3, work)
    done = await first.submit_task("done", "", "j", {"n": 1})
    failed = await first.submit_task("fails", "", "j", {"fail": True}, max_retries=0)
    await first.wait_for_task(done, timeout=15)
    await first.wait_for_task(failed, timeout=15)
    gated = await first.submit_task("gated", "", "j", {"gate": True, "n": 2})
    waiting = await first.submit_task("after", "", "j", {"n": 3}, dependencies=[gated])
    before = await first.get_stats()

    # When the orchestrator restarts on the same file
    second = await restart(harness, first, path)

    # Then it reports the same tasks and figures
    assert (await second.get_task_status(done))["result"] == {"n": 1, "deps": {}}
    assert (await second.get_task_status(failed))["error_message"] is not None
    assert (await second.get_task_status(waiting))["status"] == "pending"
    after = await second.get_stats()
    for key in ("tasks_created", "tasks_completed", "tasks_failed"):
        assert after[key] == before[key], key
    # And the dependency it was waiting on still releases its dependent
    gate.set()
    status = await second.wait_for_task(waiting, timeout=20)
    assert status["status"] == "completed"
    assert status["result"]["deps"][gated] == {"n": 2, "deps": {}}


async def test_a_result_sent_while_the_orchestrator_is_down_is_kept(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a task running on an agent
    path = tmp_path / "state.sqlite"
    first = await harness.start_orchestrator(store=SQLiteStore(path))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(ctx: TaskContext) -> dict:
        started.set()
        await release.wait()
        return {"answer": 42}

    agent = await harness.start_agent("w1", [], 1, slow)
    task_id = await first.submit_task("slow", "", "j", {})
    await asyncio.wait_for(started.wait(), 15)
    await wait_until(lambda: running(first, task_id), timeout=15)

    # When the orchestrator stops, the task finishes, and an orchestrator starts again
    await first.stop()
    release.set()

    async def result_sent() -> bool:
        return agent.counters.completed == 1

    await wait_until(result_sent, timeout=15)
    second = await restart(harness, first, path)

    # Then the result, sent while nobody listened, completes the task
    status = await second.wait_for_task(task_id, timeout=15)
    assert status["status"] == "completed" and status["result"] == {"answer": 42}
    stats = await second.get_stats()
    assert stats["tasks_completed"] == 1 and stats["running_tasks"] == 0


async def running(orch: TaskOrchestrator, task_id: str) -> bool:
    status = await orch.get_task_status(task_id)
    return status is not None and status["status"] == "running"


async def test_a_file_of_an_older_version_is_upgraded_and_keeps_its_records(
    tmp_path: Path,
) -> None:
    # Given a file of schema version 2 (before the leader epoch) holding a task
    path = tmp_path / "state.sqlite"
    old = make_task("old", status=TaskStatus.COMPLETED, result={"r": 1})
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tasks (task_id TEXT PRIMARY KEY, status TEXT, record TEXT)")
        db.execute("CREATE TABLE agents (agent_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO tasks VALUES (?, ?, ?)", ("old", "completed", task_to_record(old)))
        db.execute("PRAGMA user_version=2")
    db.close()

    # When a store opens it, then the task is there, the file is of this version,
    # and the epoch it added works
    store = SQLiteStore(path)
    assert await store.get_task("old") == old
    assert await store.claim_epoch("me") == 1
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT epoch, holder FROM leader").fetchall() == [(1, "me")]
    db.close()


def test_a_record_of_an_older_or_newer_version_reads_with_the_fields_it_knows() -> None:
    # An older record: no delivery (then "assigned" with no agent meant queued), no key
    text = task_to_record(make_task("t", status=TaskStatus.ASSIGNED, idempotency_key="k"))
    data = json.loads(text)
    del data["delivery"], data["idempotency_key"]
    old = task_from_record(json.dumps(data))
    assert (old.status, old.delivery, old.idempotency_key) == (
        TaskStatus.PENDING,
        Delivery.NONE,
        None,
    )
    # A newer record: a field this version does not know is left out
    data = json.loads(text) | {"from_the_future": 1}
    assert task_from_record(json.dumps(data)) == task_from_record(text)


async def test_callers_waiting_behind_a_write_share_the_next_one(tmp_path: Path) -> None:
    # Given a write under way (each held until we let it go) ...
    entered = [asyncio.Event(), asyncio.Event()]
    release = [asyncio.Event(), asyncio.Event()]
    writes: list[int] = []

    class HeldStore(SQLiteStore):
        async def _transaction(self, batch, fence) -> None:
            writes.append(len(batch.task_rows))
            if len(writes) <= 2:
                entered[len(writes) - 1].set()
                await release[len(writes) - 1].wait()
            await super()._transaction(batch, fence)

    store = HeldStore(tmp_path / "state.sqlite", flush_interval=60)
    await store.save_task(make_task("first"))
    first = asyncio.ensure_future(store.flush())
    await asyncio.wait_for(entered[0].wait(), 10)

    # ... and 50 callers that each save a task and flush meanwhile
    async def save_and_flush(i: int) -> None:
        await store.save_task(make_task(f"t{i}"))
        await store.flush()

    callers = [asyncio.ensure_future(save_and_flush(i)) for i in range(50)]

    # When the write ends, the next one takes all 50, and a save comes in during it
    release[0].set()
    await asyncio.wait_for(entered[1].wait(), 10)
    await store.save_task(make_task("during"))
    release[1].set()

    # Then every caller returns with that second write: none writes again for a
    # change that is not its own (one transaction each, behind one another)
    await asyncio.wait_for(asyncio.gather(first, *callers), 10)
    assert writes == [1, 50]
    await store.close()  # which writes the last save
    assert rows(tmp_path / "state.sqlite", "tasks") == 52
