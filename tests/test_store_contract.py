"""The contract every state store keeps (see ``orchestrator.store``), one suite for all.

A store is a write-behind journal: a save takes the record as it is at the
call, reads hand out copies, and a durable store gives back after a reopen
exactly what was saved before its last flush. Every store runs here:
memory, SQLite and PostgreSQL (a database of the test's own).

Leader fencing is part of the contract: ``claim_epoch`` raises the epoch,
and a store object whose epoch was overtaken by another one on the same
database writes nothing more (its flush raises ``StoreFenced``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from orchestrator import AgentCapability, MemoryStore, SQLiteStore, StateStore, Task, TaskPriority
from orchestrator.models import Delivery, TaskStatus
from orchestrator.postgres_store import PostgresStore
from orchestrator.store import StoreFenced

Opener = Callable[[], Awaitable[StateStore]]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the store under test; for a durable store, a new store object on the
    same data each time (as another process would)."""
    opened: list[StateStore] = []
    memory = MemoryStore()
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""

    async def open_store() -> StateStore:
        if request.param == "memory":
            store: StateStore = memory
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / "state.sqlite", flush_interval=60)
        else:
            store = PostgresStore(url, flush_interval=60)
        opened.append(store)
        return store

    open_store.durable = request.param != "memory"  # type: ignore[attr-defined]
    yield open_store
    for store in opened:
        await store.close()


def _task(task_id: str = "t1", **changes) -> Task:
    task = Task(
        task_id=task_id,
        name="name",
        description="d",
        task_type="j",
        priority=TaskPriority.HIGH,
        payload={"n": [1, 2, {"x": "y"}]},
        dependencies=["t0"],
        required_capabilities=["gpu"],
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


async def test_a_saved_task_reads_back_equal(opener: Opener) -> None:
    store = await opener()
    task = _task(
        status=TaskStatus.ASSIGNED,
        attempt=2,
        retry_due=12.5,
        delivery=Delivery.DELAYED,
        error_message="boom",
    )
    await store.save_task(task)
    assert await store.get_task("t1") == task
    assert await store.tasks() == [task]
    assert await store.get_task("nope") is None


async def test_a_save_is_a_snapshot_and_reads_are_copies(opener: Opener) -> None:
    store = await opener()
    task = _task()
    await store.save_task(task)

    task.status, task.attempt = TaskStatus.RUNNING, 7  # changed after the save
    assert (await store.get_task("t1")).status is TaskStatus.PENDING

    read = await store.get_task("t1")
    read.status = TaskStatus.FAILED  # a reader changes its copy
    (listed,) = await store.tasks()
    listed.attempt = 99
    again = await store.get_task("t1")
    assert (again.status, again.attempt) == (TaskStatus.PENDING, 0)

    await store.save_task(task)  # saved again: now it is stored
    assert (await store.get_task("t1")).attempt == 7


async def test_a_deleted_task_is_gone_and_deleting_nothing_is_harmless(opener: Opener) -> None:
    store = await opener()
    await store.save_task(_task("a"))
    await store.save_task(_task("b"))
    await store.delete_task("a")
    await store.delete_task("never-saved")
    assert [t.task_id for t in await store.tasks()] == ["b"]


async def test_agents_are_snapshots_too(opener: Opener) -> None:
    store = await opener()
    agent = AgentCapability("agent-1", ["gpu"], max_concurrent_tasks=3, last_seen=4.0)
    agent.specialization_score["j"] = 0.5
    await store.save_agent(agent)
    agent.specialization_score["j"] = 0.1
    agent.capabilities.append("cpu")

    (stored,) = await store.agents()
    assert (stored.capabilities, stored.specialization_score) == (["gpu"], {"j": 0.5})
    stored.specialization_score["j"] = 0.0
    assert (await store.agents())[0].specialization_score == {"j": 0.5}

    await store.delete_agent("agent-1")
    await store.delete_agent("agent-1")
    assert await store.agents() == []


async def test_meta_is_json_and_copied(opener: Opener) -> None:
    store = await opener()
    assert await store.get_meta("stats") is None
    value = {"created": 3, "by_status": {"completed": 2}}
    await store.save_meta("stats", value)
    value["created"] = 4
    read = await store.get_meta("stats")
    assert read == {"created": 3, "by_status": {"completed": 2}}
    read["created"] = 5
    assert (await store.get_meta("stats"))["created"] == 3


async def test_a_durable_store_gives_back_what_was_flushed(opener: Opener) -> None:
    if not opener.durable:  # type: ignore[attr-defined]
        pytest.skip("an in-memory store keeps nothing past its process, by design")
    store = await opener()
    kept = _task("kept", status=TaskStatus.COMPLETED, result={"r": 1}, completed_at=3.0)
    queued = _task("queued", status=TaskStatus.ASSIGNED, attempt=1, delivery=Delivery.CONFIRMED)
    for task in (kept, queued, _task("gone")):
        await store.save_task(task)
    await store.delete_task("gone")
    await store.save_agent(AgentCapability("agent-1", ["gpu"], last_seen=1.0))
    await store.save_meta("k", [1, "two"])
    await store.flush()
    await store.close()

    reopened = await opener()
    assert sorted((t.task_id, t) for t in await reopened.tasks()) == sorted(
        [("kept", kept), ("queued", queued)]
    )
    assert [a.agent_id for a in await reopened.agents()] == ["agent-1"]
    assert await reopened.get_meta("k") == [1, "two"]


async def test_flush_with_nothing_written_and_a_second_close_are_harmless(opener: Opener) -> None:
    store = await opener()
    await store.flush()
    await store.save_task(_task())
    await store.flush()
    await store.flush()
    await store.close()
    await store.close()


async def test_the_unicode_and_odd_numbers_an_agent_may_send_are_kept(opener: Opener) -> None:
    # An agent's result is untrusted: none of it may make a flush fail
    store = await opener()
    odd = {"nul": "a\u0000b", "emoji": "\U0001f600", "nan": float("inf"), "big": 2**70}
    await store.save_task(_task(result=odd, error_message="\u0000"))
    await store.flush()
    assert (await store.get_task("t1")).result == odd
    if opener.durable:  # type: ignore[attr-defined]
        await store.close()
        assert (await (await opener()).get_task("t1")).result == odd


# ---------------------------------------------------------------- leader fencing


async def test_each_claim_raises_the_epoch_and_names_its_holder(opener: Opener) -> None:
    store = await opener()
    assert await store.current_epoch() == (0, None)
    first = await store.claim_epoch("orchestrator-a")
    second = await store.claim_epoch("orchestrator-b")
    assert second == first + 1
    assert await store.current_epoch() == (second, "orchestrator-b")
    # And the claimer writes on under its own epoch
    await store.save_task(_task())
    await store.flush()


async def test_an_overtaken_store_writes_nothing_and_says_it_is_fenced(opener: Opener) -> None:
    if not opener.durable:  # type: ignore[attr-defined]
        pytest.skip("a memory store is one object: no other process can claim it")
    # Given a leader that claimed the store and wrote to it
    old = await opener()
    old_epoch = await old.claim_epoch("old-leader")
    await old.save_task(_task("before"))
    await old.flush()

    # When another store object on the same data claims it (a new leader)
    new = await opener()
    new_epoch = await new.claim_epoch("new-leader")
    assert new_epoch > old_epoch
    assert await old.current_epoch() == (new_epoch, "new-leader")

    # Then the old leader's next flush raises StoreFenced, naming both epochs, every time
    await old.save_task(_task("late", status=TaskStatus.COMPLETED))
    await old.save_task(_task("before", status=TaskStatus.FAILED))
    await old.delete_agent("nobody")
    for _ in range(2):
        with pytest.raises(StoreFenced) as fenced:
            await old.flush()
        assert (fenced.value.epoch, fenced.value.current) == (old_epoch, new_epoch)
        assert "new-leader" in str(fenced.value)
    # While the new leader writes on
    await new.save_task(_task("after"))
    await new.flush()
    await old.close()  # closing a fenced store is no error, and writes nothing either

    # And the data holds what the new leader sees, none of the old leader's late changes
    reader = await opener()
    stored = {t.task_id: t.status for t in await reader.tasks()}
    assert stored == {"before": TaskStatus.PENDING, "after": TaskStatus.PENDING}


async def test_a_store_that_never_claimed_is_not_fenced(opener: Opener) -> None:
    if not opener.durable:  # type: ignore[attr-defined]
        pytest.skip("a memory store is one object: no other process can claim it")
    # Given a store object that never claimed an epoch (a single orchestrator, as before)
    plain = await opener()
    await plain.save_task(_task("a"))
    await plain.flush()

    # When another claims the data, then the first still writes (nothing fences it)
    other = await opener()
    await other.claim_epoch("leader")
    await plain.save_task(_task("b"))
    await plain.flush()
    await plain.close()
    assert {t.task_id for t in await (await opener()).tasks()} == {"a", "b"}


async def test_a_claim_reads_the_records_as_they_are_at_the_claim(opener: Opener) -> None:
    if not opener.durable:  # type: ignore[attr-defined]
        pytest.skip("a memory store is one object: no other process can claim it")
    # Given a leader writing, and a standby's store that read the records early
    leader = await opener()
    await leader.claim_epoch("leader")
    await leader.save_task(_task("early"))
    await leader.flush()
    standby = await opener()
    assert [t.task_id for t in await standby.tasks()] == ["early"]

    # When the leader writes more, then the standby claims
    await leader.save_task(_task("late", status=TaskStatus.RUNNING))
    await leader.save_meta("stats", {"created": 2})
    await leader.flush()
    await standby.claim_epoch("standby")

    # Then the new leader holds the records as the claim found them, not as it read them
    assert {t.task_id: t.status for t in await standby.tasks()} == {
        "early": TaskStatus.PENDING,
        "late": TaskStatus.RUNNING,
    }
    assert await standby.get_meta("stats") == {"created": 2}
