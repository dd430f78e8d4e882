"""``orchestrator serve`` on PostgreSQL through a restart of its server (issue 12).

As a user runs it: ``serve --store postgresql://...`` and three agents
(``tests/agent_app.py``, noting every handler end in a run log) as processes,
a few hundred tasks in flight, and the PostgreSQL server restarted under
them, two ways:

- ``postgres-restart-fast``: ``pg_ctl restart -m fast``, as an operator
  restarts it (the server ends every session, checkpoints, starts again);
- ``postgres-postmaster-sigkill``: the postmaster SIGKILLed (a crash; its
  backends then end on their own) and started again, which recovers from
  the WAL.

Tasks are submitted before the restart and while the server is down (those
submits wait for the store). Every task must complete with its own result,
none lost, none whose handler completed twice. Each scenario prints
``FAULT-TABLE scenario=... tasks=N completed=N lost=N twice=N`` (run with
``-s``) for the README's fault table.

The server is one of the test's own (``tests.brokers.LocalPostgres``: its
own data folder, free port and socket folder), never the shared one at 5432;
where none can be started the test skips, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import StatsRequest, SubmitTaskRequest, TaskStatusRequest
from tests.brokers import LocalPostgres, Unavailable, skip_or_fail
from tests.deployment import Deployment, count_finished
from tests.harness import wait_until

TASKS_BEFORE = 250
TASKS_DURING = 50
"""Submitted while the server is down (each submit waits for the store)."""
AGENTS = 3
AGENT_ENV = {"AGENT_MAX": "8", "AGENT_SLEEP": "0.3"}
"""24 slots of 0.3 s: the 300 tasks take some 4 s of handler time, so the
restart lands with tasks running, queued and waiting to be submitted."""


@pytest.fixture
def server() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own, stopped (and its folder removed) after."""
    try:
        pg = LocalPostgres().start()
    except Unavailable as exc:
        skip_or_fail(f"no private PostgreSQL can be had: {exc}")
        raise AssertionError("unreachable") from None
    try:
        yield pg
    finally:
        pg.stop()


def pg_ctl(server: LocalPostgres, *args: str) -> None:
    server._run(str(server.bin / "pg_ctl"), "-D", str(server.data), *args)


def start_server(server: LocalPostgres, timeout: float = 60) -> None:
    """Start it on its port and socket folder again. After a SIGKILLed postmaster
    the start is refused until its orphaned backends have noticed and ended
    (they hold its shared memory): tried again until then."""
    options = f"-F -p {server.port} -c listen_addresses=127.0.0.1 -k {server.base}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            pg_ctl(
                server, "-l", str(server.base / "server.log"), "-o", options, "-w", "-t", "60",
                "start",
            )  # fmt: skip
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def restart_fast(server: LocalPostgres) -> None:
    pg_ctl(server, "-l", str(server.base / "server.log"), "-m", "fast", "-w", "restart")


def kill_and_start(server: LocalPostgres) -> None:
    pid = server.postmaster_pid()
    assert pid is not None, "the server is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(pid):
        assert time.monotonic() < deadline, f"postmaster {pid} still runs after SIGKILL"
        time.sleep(0.02)
    start_server(server)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


RESTARTS = {
    "postgres-restart-fast": restart_fast,
    "postgres-postmaster-sigkill": kill_and_start,
}


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(RESTARTS))
async def test_postgres_restarted_under_300_tasks_every_task_completes_once(
    scenario: str, server: LocalPostgres, deployment: Deployment, tmp_path: Path
) -> None:
    # Given serve on the server's database, 250 tasks queued, and three agents
    # (that note their runs) running them
    server.admin("CREATE DATABASE state")
    deployment.env["ORCHESTRATOR_STORE"] = server.url("state")
    run_log = tmp_path / "runs.log"
    await deployment.serve()
    finished = await count_finished(deployment)
    ids = await submit(deployment, range(TASKS_BEFORE))
    await asyncio.gather(
        *(
            deployment.agent(f"pg_{n}", "pgr", AGENT_RUN_LOG=str(run_log), **AGENT_ENV)
            for n in range(AGENTS)
        )
    )

    async def a_fifth_ended() -> bool:
        return finished[0] >= TASKS_BEFORE // 5

    await wait_until(a_fifth_ended, timeout=60, interval=0.05)

    # When the server restarts while tasks run, and more are submitted meanwhile
    ended = finished[0]
    assert ended < TASKS_BEFORE, "every task ended before the restart"
    more = range(TASKS_BEFORE, TASKS_BEFORE + TASKS_DURING)
    restarted = time.monotonic()
    during = asyncio.ensure_future(submit(deployment, more))
    await asyncio.to_thread(RESTARTS[scenario], server)
    back = time.monotonic() - restarted
    print(f"\n{scenario}: {ended} of {TASKS_BEFORE} tasks had ended; back after {back:.2f}s")
    ids += await during

    # Then every task completes with its own result, each handler once
    completed, twice = await outcome(deployment, scenario, ids, run_log)
    assert (completed, twice) == (len(ids), 0)
    for name in deployment.processes:
        assert deployment.processes[name][0].returncode is None, deployment.log(name)
    # (and serve did see the outage: its writes failed and were tried again)
    log = deployment.log("serve")
    assert "trying again for up to" in log and "state written to" in log, log
    assert "Traceback" not in log, log


async def submit(deployment: Deployment, numbers: range) -> list[str]:
    """Tasks ``numbers`` through the request queue, as other services submit."""
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> str:
        async with limit:
            request = SubmitTaskRequest(
                name=f"t{n}",
                task_type="work",
                payload={"n": n},
                required_capabilities=["pgr"],
                max_retries=5,
            )
            return (await deployment.rpc(request, timeout=60))["task_id"]

    return list(await asyncio.gather(*(one(n) for n in numbers)))


async def outcome(
    deployment: Deployment, scenario: str, ids: list[str], run_log: Path
) -> tuple[int, int]:
    """Wait until every task is final; print and return (completed with their
    own result, completed twice)."""

    async def all_final() -> bool:
        stats = await deployment.rpc(StatsRequest(), timeout=10)
        return stats["tasks_completed"] + stats["tasks_failed"] >= len(ids)

    try:
        await wait_until(all_final, timeout=90, interval=0.2)
    except AssertionError:
        pass  # counted below
    limit = asyncio.Semaphore(32)

    async def status(task_id: str) -> dict[str, Any]:
        async with limit:
            return await deployment.rpc(TaskStatusRequest(task_id=task_id), timeout=10)

    numbers = {task_id: n for n, task_id in enumerate(ids)}
    statuses = await asyncio.gather(*(status(t) for t in ids))
    completed = sum(
        s["status"] == "completed"
        and s["result"] is not None
        and s["result"]["echo"]["n"] == numbers[t]
        for t, s in zip(ids, statuses, strict=True)
    )
    ends = handler_ends(run_log)
    twice = sum(ends[t] > 1 for t in ids)
    print(
        f"\nFAULT-TABLE scenario={scenario} tasks={len(ids)} completed={completed}"
        f" lost={len(ids) - completed} twice={twice}",
        flush=True,
    )
    return completed, twice


def handler_ends(run_log: Path) -> collections.Counter[str]:
    """How many times each task's handler ended (completed), by the agents' run log."""
    lines = run_log.read_text().splitlines() if run_log.exists() else []
    return collections.Counter(line.split()[1] for line in lines if line.startswith("end "))
