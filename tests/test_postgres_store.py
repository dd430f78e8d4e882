"""The PostgreSQL store beyond the contract suite: migrations, outages, ``serve`` on it.

The contract (snapshots, copies, durability, fencing) is tests/test_store_contract.py.
Here: an old schema is upgraded at open, and two processes opening at once
migrate once; a newer schema is refused; a flush during an outage waits for
the server and loses nothing; ``serve --store postgresql://...`` fails fast on
a bad URL or an unreachable server; and (fault) serve with an agent goes on
through a restart of its PostgreSQL with every task completed once.

Outages use a private PostgreSQL server of the test module's own
(``tests/brokers.LocalPostgres``), never the shared one at 5432.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker import QueuesRequest, SubmitTaskRequest, TaskStatusRequest
from orchestrator import PostgresStore, StoreFenced, Task, TaskPriority, TaskStatus
from orchestrator.postgres_store import MIGRATIONS, SCHEMA_VERSION
from orchestrator.records_codec import task_to_record
from tests.brokers import LocalPostgres, Unavailable, skip_or_fail
from tests.deployment import Deployment, base_env, run
from tests.harness import wait_until


def make_task(task_id: str, **changes: Any) -> Task:
    task = Task(task_id, "n", "d", "t", TaskPriority.HIGH, {"x": [1, {"y": "z"}]})
    for key, value in changes.items():
        setattr(task, key, value)
    return task


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


# --------------------------------------------------------------- migrations


async def test_an_old_schema_is_upgraded_at_open_and_its_records_kept(postgres_url: str) -> None:
    # Given a database at schema version 1 (before the leader epoch) holding a task
    con = await asyncpg.connect(postgres_url)
    await con.execute(
        "CREATE TABLE schema_version (version integer PRIMARY KEY,"
        " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for statement in MIGRATIONS[0].statements:
        await con.execute(statement)
    await con.execute("INSERT INTO schema_version (version, description) VALUES (1, 'v1')")
    old = make_task("old", status=TaskStatus.COMPLETED, result={"r": 1})
    await con.execute(
        "INSERT INTO tasks VALUES ($1, $2, $3)", "old", "completed", task_to_record(old)
    )
    await con.close()

    # When the store opens it
    store = PostgresStore(postgres_url, flush_interval=60)
    assert await store.get_task("old") == old

    # Then every later migration was applied, once, and what they add works
    versions = await query(postgres_url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert await store.claim_epoch("me") == 1
    await store.close()


async def test_two_stores_opening_a_new_database_at_once_migrate_it_once(
    postgres_url: str,
) -> None:
    stores = [PostgresStore(postgres_url, flush_interval=60) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    rows = await query(postgres_url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    for store in stores:
        await store.close()


async def test_a_database_of_a_newer_schema_is_refused_by_name(postgres_url: str) -> None:
    first = PostgresStore(postgres_url)
    await first.open()
    await first.close()
    await query(postgres_url, "INSERT INTO schema_version (version, description) VALUES (99, 'x')")
    store = PostgresStore(postgres_url)
    with pytest.raises(RuntimeError, match="schema version 99; this orchestrator reads up to"):
        await store.open()
    await store.close()


async def test_a_flush_racing_a_claim_waits_for_it_and_then_writes_nothing(
    postgres_url: str,
) -> None:
    # Given a leader's store, and a new leader's claim under way (its transaction
    # has raised the epoch, not yet committed)
    leader = PostgresStore(postgres_url, flush_interval=60)
    epoch = await leader.claim_epoch("old-leader")
    claim = await asyncpg.connect(postgres_url)
    transaction = claim.transaction()
    await transaction.start()
    await claim.execute("UPDATE leader SET epoch = epoch + 1, holder = 'new-leader'")

    # When the old leader flushes meanwhile
    await leader.save_task(make_task("late"))
    flushing = asyncio.ensure_future(leader.flush())

    async def waits_on_the_epoch_row() -> bool:
        rows = await query(
            postgres_url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%FROM leader%FOR UPDATE%'",
        )
        return bool(rows)

    await wait_until(waits_on_the_epoch_row, timeout=10)
    assert not flushing.done()

    # Then once the claim commits, the flush sees the newer epoch and writes nothing
    await transaction.commit()
    await claim.close()
    with pytest.raises(StoreFenced) as fenced:
        await flushing
    assert (fenced.value.epoch, fenced.value.current) == (epoch, epoch + 1)
    assert await query(postgres_url, "SELECT task_id FROM tasks") == []
    await leader.close()


def test_a_url_that_is_not_postgresql_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^url: expected postgresql://HOST/DATABASE"):
        PostgresStore("mysql://u:pw@h/db")
    with pytest.raises(ValueError, match=r"^url: the port of .* is not a number") as raised:
        PostgresStore("postgresql://u:s3cret@h:port/db")
    assert "s3cret" not in str(raised.value)


# --------------------------------------------------------------- serve fails fast

UNREACHABLE_BROKER = "amqp://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ("postgresql://postgres:s3cret@127.0.0.1:1/state", "cannot open "),
        ("postgres://postgres:s3cret@127.0.0.1:port/state", "the port of "),
        ("postgresql:///state", "no host in "),
    ],
)
async def test_serve_on_a_postgres_store_it_cannot_use_is_one_line_exit_1(
    store: str, problem: str
) -> None:
    # When serve is given a PostgreSQL store it cannot use, by option and by environment
    for args, env, setting in [
        (["--store", store], base_env(), "--store"),
        ([], base_env(ORCHESTRATOR_STORE=store), "ORCHESTRATOR_STORE="),
    ]:
        result = await run("serve", *args, "--broker", UNREACHABLE_BROKER, env=env, timeout=30)

        # Then one line names the setting and the problem, without the password;
        # exit 1: the broker was never tried
        assert result.code == 1, result
        assert result.error.startswith(f"error: {setting}"), result.error
        assert problem in result.error, result.error
        assert "s3cret" not in result.out + result.err
        assert "Traceback" not in result.err


async def test_serve_on_a_missing_database_names_it(postgres_url: str) -> None:
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_database_here"
    result = await run(
        "serve", "--store", missing, "--broker", UNREACHABLE_BROKER, env=base_env(), timeout=30
    )
    assert result.code == 1, result
    assert result.error.startswith("error: --store: cannot open "), result.error
    assert 'database "no_such_database_here" does not exist' in result.error


# --------------------------------------------------------------- outages (private server)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this module's own, which its tests stop and start."""
    try:
        server = LocalPostgres().start()
    except Unavailable as exc:
        skip_or_fail(f"no private PostgreSQL can be had: {exc}")
        raise
    try:
        yield server
    finally:
        server.stop()


def _pg_ctl(server: LocalPostgres, *args: str) -> None:
    server._run(str(server.bin / "pg_ctl"), "-D", str(server.data), *args)


def stop_server(server: LocalPostgres) -> None:
    """Stop it as a crash would (immediate: no checkpoint, connections cut)."""
    _pg_ctl(server, "-m", "immediate", "-w", "stop")


def start_server(server: LocalPostgres) -> None:
    options = f"-F -p {server.port} -c listen_addresses=127.0.0.1 -k {server.base}"
    _pg_ctl(server, "-l", str(server.base / "server.log"), "-o", options, "-w", "-t", "60", "start")


@pytest.fixture
def private_database(private_postgres: LocalPostgres) -> Iterator[str]:
    name = f"test_{secrets.token_hex(5)}"
    private_postgres.admin(f"CREATE DATABASE {name}")
    try:
        yield private_postgres.url(name)
    finally:
        if private_postgres.postmaster_pid() is None:
            start_server(private_postgres)
        private_postgres.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.fault
async def test_a_flush_during_an_outage_waits_for_the_server_and_loses_nothing(
    private_postgres: LocalPostgres, private_database: str
) -> None:
    # Given a store that wrote, and whose server then goes down
    store = PostgresStore(private_database, flush_interval=60, retry_for=60)
    await store.save_task(make_task("before"))
    await store.flush()
    await asyncio.to_thread(stop_server, private_postgres)

    # When changes are saved and flushed while it is down
    await store.save_task(make_task("during", status=TaskStatus.RUNNING))
    await store.delete_task("before")
    flushing = asyncio.ensure_future(store.flush())
    done, _ = await asyncio.wait([flushing], timeout=1)
    assert not done, "the flush returned while the server was down"
    await store.save_task(make_task("later"))  # saved while the flush waits

    # Then once the server is back, the flush returns, everything saved is written
    await asyncio.to_thread(start_server, private_postgres)
    await asyncio.wait_for(flushing, 60)
    await store.flush()
    await store.close()
    again = PostgresStore(private_database)
    assert {t.task_id: t.status for t in await again.tasks()} == {
        "during": TaskStatus.RUNNING,
        "later": TaskStatus.PENDING,
    }
    await again.close()


@pytest.mark.fault
async def test_a_flush_that_outlasts_retry_for_raises_and_keeps_its_changes(
    private_postgres: LocalPostgres, private_database: str
) -> None:
    store = PostgresStore(private_database, flush_interval=60, retry_for=0.5)
    await store.open()
    await asyncio.to_thread(stop_server, private_postgres)
    await store.save_task(make_task("kept"))
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await store.flush()
    await asyncio.to_thread(start_server, private_postgres)
    await store.flush()  # the changes the failed flush had are written now
    await store.close()
    again = PostgresStore(private_database)
    assert [t.task_id for t in await again.tasks()] == ["kept"]
    await again.close()


# --------------------------------------------------------------- serve through a restart


TASKS_BEFORE = 60
TASKS_DURING = 5
WORK_SECONDS = 0.4


@pytest.mark.fault
async def test_serve_goes_on_through_a_postgres_restart_and_every_task_completes_once(
    deployment: Deployment,
    private_postgres: LocalPostgres,
    private_database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given serve on a PostgreSQL store and an agent running tasks
    run_log = tmp_path / "runs.log"
    deployment.env["ORCHESTRATOR_STORE"] = private_database
    await deployment.serve()
    await deployment.agent("pg_agent", "pgwork", AGENT_MAX="4", AGENT_RUN_LOG=str(run_log))
    finished: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    async def on_event(event: Any) -> None:
        finished[event.task_id].set()

    await deployment.client.subscribe_events(on_event, patterns=["task.finished"])

    async def submit(i: int, timeout: float = 5) -> str:
        request = SubmitTaskRequest(
            name=f"t{i}",
            task_type="pg",
            payload={"i": i, "sleep": WORK_SECONDS},
            required_capabilities=["pgwork"],
            max_retries=5,
        )
        return (await deployment.rpc(request, timeout=timeout))["task_id"]

    ids = {await submit(i): i for i in range(TASKS_BEFORE)}
    await wait_until(lambda: _finished(finished, ids, 8), timeout=30, interval=0.05)

    # When PostgreSQL stops (as a crash would) while tasks run, is down for a while
    # (more tasks are submitted meanwhile), and starts again
    await asyncio.to_thread(stop_server, private_postgres)
    ended_before = _ends(run_log).total()
    assert ended_before < len(ids), "every task ended before the restart"
    during = [asyncio.ensure_future(submit(TASKS_BEFORE + i, 90)) for i in range(TASKS_DURING)]

    async def results_sent_while_down() -> bool:
        return _ends(run_log).total() >= ended_before + 8

    await wait_until(results_sent_while_down, timeout=30, interval=0.05)
    await asyncio.to_thread(start_server, private_postgres)
    for future, i in zip(during, range(TASKS_BEFORE, TASKS_BEFORE + TASKS_DURING), strict=True):
        ids[await future] = i

    # Then every task completes, with its own result, and ran to its end once
    with contextlib.suppress(AssertionError):  # counted below
        await wait_until(lambda: _finished(finished, ids, len(ids)), timeout=90, interval=0.1)
    statuses = {t: await deployment.rpc(TaskStatusRequest(task_id=t)) for t in ids}
    completed = [
        t
        for t, s in statuses.items()
        if s["status"] == "completed" and s["result"]["echo"]["i"] == ids[t]
    ]
    ends = _ends(run_log)
    twice = [t for t in ids if ends[t] > 1]
    with capsys.disabled():
        print(
            f"\nFAULT-TABLE scenario=postgres-restart tasks={len(ids)} completed={len(completed)}"
            f" lost={len(ids) - len(completed)} twice={len(twice)}"
        )
    assert len(completed) == len(ids), {t: s["status"] for t, s in statuses.items()}
    assert twice == []
    # (and it did wait for its store: its writes failed during the outage)
    log = deployment.log("serve")
    assert "trying again for up to" in log and "state written to" in log, log

    # And the store holds every task completed, once serve has stopped
    deployment.queue_keys.update(q["key"] for q in await deployment.rpc(QueuesRequest()))
    assert await deployment.stop("serve") == 0
    rows = await query(private_database, "SELECT task_id, status, record FROM tasks")
    assert {r["task_id"]: r["status"] for r in rows} == {t: "completed" for t in ids}
    assert all(json.loads(r["record"])["result"]["echo"]["i"] == ids[r["task_id"]] for r in rows)


async def _finished(finished: dict[str, asyncio.Event], ids: dict[str, int], n: int) -> bool:
    """Whether at least ``n`` of the tasks ``ids`` were reported finished."""
    return sum(finished[t].is_set() for t in ids) >= n


def _ends(run_log: Path) -> collections.Counter[str]:
    """How many times the agent ran each task to its end (its run log's end lines)."""
    if not run_log.exists():
        return collections.Counter()
    lines = run_log.read_text().splitlines()
    return collections.Counter(line.split()[1] for line in lines if line.startswith("end "))


async def test_stores_in_two_schemas_of_one_database_keep_apart(postgres_url: str) -> None:
    # Given two schemas, one per prefix, named by search_path in the URL
    await query(postgres_url, "CREATE SCHEMA prefix_a")
    await query(postgres_url, "CREATE SCHEMA prefix_b")
    a = PostgresStore(f"{postgres_url}?search_path=prefix_a", flush_interval=60)
    b = PostgresStore(f"{postgres_url}?search_path=prefix_b", flush_interval=60)
    await a.save_task(make_task("in-a"))
    await a.flush()
    await b.claim_epoch("b-leader")

    # Then each has its own tables, records and epoch
    assert await b.tasks() == []
    assert await a.current_epoch() == (0, None)
    await a.close()
    await b.close()
    rows = await query(postgres_url, "SELECT task_id FROM prefix_a.tasks")
    assert [r["task_id"] for r in rows] == ["in-a"]

    # And a schema that is not there is one clear error
    missing = PostgresStore(f"{postgres_url}?search_path=nowhere")
    with pytest.raises(RuntimeError, match="cannot prepare the tables: no schema"):
        await missing.open()
    await missing.close()


@pytest.mark.fault
async def test_closing_during_an_outage_tries_once_and_says_what_was_not_written(
    private_postgres: LocalPostgres, private_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store with changes, and its server down
    store = PostgresStore(private_database, flush_interval=60, retry_for=600)
    await store.save_task(make_task("a"))
    await store.save_task(make_task("b"))
    await asyncio.to_thread(stop_server, private_postgres)

    # When it closes, then it does not wait out the outage (retry_for): it raises,
    # and logs how many records were not written
    with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await asyncio.wait_for(store.close(), 60)
    assert "closed with 2 record(s) not written" in caplog.text
    await asyncio.to_thread(start_server, private_postgres)
