"""One active orchestrator per prefix: standbys, takeover, fencing (issue 12).

In one process (both buses): a second ``TaskOrchestrator`` on a prefix
stands by and never breaks the first; it takes over when the first stops,
from the shared store; a leader whose store was claimed by a newer one
steps down and writes nothing. As a user runs it (``fault``: serve and
agent processes on a private broker): the leader SIGKILLed with 1,000 tasks
in flight and a standby on the same store (SQLite file, PostgreSQL); two
serves started at once.

Each scenario prints one line ``FAULT-TABLE scenario=... tasks=N
completed=N lost=N twice=N`` (run with ``-s`` to see them) for the README's
fault table: ``lost`` counts tasks not completed with their result,
``twice`` those whose handler completed more than once (the agents note
every handler end in a run log).
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agents import TaskContext
from broker import StatsRequest, SubmitTaskRequest, TaskStatusRequest
from orchestrator import SQLiteStore, TaskOrchestrator
from orchestrator.leadership import NotLeader, Role
from orchestrator.store import StoreFenced
from tests.deployment import Deployment, count_finished
from tests.harness import FAST, Harness, wait_all, wait_until

FAST_LEASE = 0.2
"""Seconds between a standby's tries of the lease in these in-process tests."""


def fault_table(scenario: str, tasks: int, completed: int, lost: int, twice: int) -> None:
    print(
        f"FAULT-TABLE scenario={scenario} tasks={tasks} completed={completed}"
        f" lost={lost} twice={twice}",
        flush=True,
    )


def orchestrator_on(bus: Any, path: Path) -> TaskOrchestrator:
    orchestrator = TaskOrchestrator(bus, settings=FAST, store=SQLiteStore(path))
    orchestrator.leadership.poll_interval = FAST_LEASE
    return orchestrator


# --------------------------------------------------------------------- in one process


async def test_the_lease_is_held_by_one_bus_at_a_time_and_freed_by_its_holder(
    harness: Harness,
) -> None:
    # Given two buses (two connections) on one prefix
    first, second = harness.new_bus(), harness.new_bus()
    for bus in (first, second):
        if not bus.is_connected:
            await bus.connect()
    mine, theirs = first.lease("first"), second.lease("second")

    # When the first takes the lease, then the second is refused while it holds it
    assert await mine.acquire()
    assert await mine.confirm()
    assert not await theirs.acquire()
    assert not theirs.held and not await theirs.confirm()

    # When the first gives it up, then it knows, and the second takes it
    await mine.release()
    await asyncio.wait_for(mine.wait_lost(), 5)
    assert not mine.held
    assert await theirs.acquire()
    assert await theirs.confirm()
    assert not await mine.acquire()
    for lease in (mine, theirs):
        await lease.release()


async def test_a_second_orchestrator_stands_by_never_breaks_the_first_and_takes_over(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a leading orchestrator on a SQLite file, an agent that counts its runs
    path = tmp_path / "state.sqlite"
    runs: collections.Counter[str] = collections.Counter()

    async def counted(ctx: TaskContext) -> dict[str, Any]:
        runs[ctx.task_id] += 1
        return {"n": ctx.payload["n"]}

    first = orchestrator_on(await harness.connected_bus(), path)
    await first.start()
    harness.orchestrator = first
    agent = await harness.start_agent("ha_agent", ["ha"], 10, counted)
    before = [
        await first.submit_task("t", "", "work", {"n": n}, required_capabilities=["ha"])
        for n in range(50)
    ]

    # When a second orchestrator starts on the same prefix and store
    second = orchestrator_on(await harness.connected_bus(), path)
    await second.start()
    try:
        # Then it stands by and says who leads; its API refuses, naming the leader
        assert second.leadership.role is Role.STANDBY
        stats = await second.get_stats()
        assert stats["role"] == "standby"
        assert stats["leader"] == {"id": first.leadership.holder, "epoch": 1}
        with pytest.raises(NotLeader, match="not_leader"):
            await second.submit_task("t", "", "work", {"n": -1})
        with pytest.raises(NotLeader):
            await second.get_task_status(before[0])
        leading = await first.get_stats()
        assert leading["role"] == "leader"
        assert leading["leader"] == {"id": first.leadership.holder, "epoch": 1}

        # And the first goes on as before: every task completes once, the agent stays
        more = [
            await first.submit_task("t", "", "work", {"n": n}, required_capabilities=["ha"])
            for n in range(50, 100)
        ]
        done = await wait_all(first, before + more, timeout=60)
        assert {d["status"] for d in done} == {"completed"}
        assert "ha_agent" in {a.agent_id for a in await first.get_agents()}

        # When the first stops, then the second takes over from the store
        await first.stop()
        harness.orchestrator = second
        await asyncio.wait_for(second.leadership.wait_leading(), 10)
        assert (await second.get_stats())["leader"]["epoch"] == 2
        assert (await second.get_task_status(before[0]))["result"] == {"n": 0}
        await harness.wait_agents("ha_agent")
        after = [
            await second.submit_task("t", "", "work", {"n": n}, required_capabilities=["ha"])
            for n in range(100, 120)
        ]
        done += await wait_all(second, after, timeout=60)
    finally:
        if harness.orchestrator is not second:
            await second.stop()
    ids = before + more + after
    completed = sum(d["status"] == "completed" and d["result"] is not None for d in done)
    twice = sum(runs[t] > 1 for t in ids)
    assert (completed, twice) == (len(ids), 0)
    stopping = asyncio.ensure_future(agent.wait_stopping())
    await asyncio.sleep(0)
    assert not stopping.done(), "the agent was told to stop"
    stopping.cancel()
    fault_table(
        f"two-TaskOrchestrators-one-prefix-{harness.bus_kind}",
        len(ids),
        completed,
        len(ids) - completed,
        twice,
    )


async def test_a_leader_whose_store_a_newer_leader_claimed_steps_down_and_writes_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a leader on a SQLite file with a task it wrote
    path = tmp_path / "state.sqlite"
    old = orchestrator_on(await harness.connected_bus(), path)
    await old.start()
    harness.orchestrator = old
    kept = await old.submit_task("kept", "", "work", {}, required_capabilities=["nobody"])
    harness.queue_keys.update({"nobody", "work.nobody"})
    await old.store.flush()

    # When another orchestrator claims the store's epoch (as a new leader does
    # while the old one is paused) and the old one writes again
    newer = SQLiteStore(path)
    assert await newer.claim_epoch("the-new-leader") == 2
    with pytest.raises(StoreFenced, match="the-new-leader claimed epoch 2"):
        await old.submit_task("late", "", "work", {}, required_capabilities=["nobody"])

    # Then it steps down: it stands by, its API refuses, naming the new leader
    await asyncio.wait_for(old.leadership.stepped_down.wait(), 10)
    assert old.leadership.role is Role.STANDBY
    with pytest.raises(NotLeader, match="the-new-leader"):
        await old.submit_task("later", "", "work", {})
    assert (await old.get_stats())["leader"] == {"id": "the-new-leader", "epoch": 2}

    # And nothing it did after the claim is in the store
    await newer.close()
    reread = SQLiteStore(path)
    try:
        assert [t.name for t in await reread.tasks()] == ["kept"]
        assert (await reread.get_task(kept)) is not None
        assert await reread.current_epoch() == (2, "the-new-leader")
    finally:
        await reread.close()


# ---------------------------------------------------------- processes on a private broker

TASKS = 1000
TWO_SERVES_TASKS = 300


def store_spec(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'state.sqlite'}"
    return request.getfixturevalue("postgres_url")


async def leader_of(deployment: Deployment) -> dict[str, Any]:
    """The ``leader`` the orchestrator answering requests names (its own id)."""
    stats = await deployment.rpc(StatsRequest(), timeout=2)
    assert stats["role"] == "leader"
    return stats["leader"]


async def submit_all(deployment: Deployment, count: int, capability: str) -> list[str]:
    """``count`` no-op tasks through the request queue, as other services submit."""
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> str:
        async with limit:
            request = SubmitTaskRequest(
                name=f"t{n}",
                task_type="work",
                payload={"n": n},
                required_capabilities=[capability],
            )
            return (await deployment.rpc(request, timeout=20))["task_id"]

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def outcome(
    deployment: Deployment, scenario: str, ids: list[str], run_log: Path
) -> tuple[int, int]:
    """Wait until every task is final; (completed with their result, completed twice)."""

    async def all_final() -> bool:
        stats = await deployment.rpc(StatsRequest(), timeout=5)
        return stats["tasks_completed"] + stats["tasks_failed"] >= len(ids)

    await wait_until(all_final, timeout=120, interval=0.2)
    limit = asyncio.Semaphore(32)

    async def status(task_id: str) -> dict[str, Any]:
        async with limit:
            return await deployment.rpc(TaskStatusRequest(task_id=task_id), timeout=10)

    statuses = await asyncio.gather(*(status(t) for t in ids))
    completed = sum(
        s["status"] == "completed" and s["result"] is not None and s["result"]["echo"]["n"] >= 0
        for s in statuses
    )
    ends = handler_ends(run_log)
    twice = sum(ends[t] > 1 for t in ids)
    fault_table(scenario, len(ids), completed, len(ids) - completed, twice)
    return completed, twice


def handler_ends(run_log: Path) -> collections.Counter[str]:
    """How many times each task's handler ended (completed), by the agents' run log."""
    lines = run_log.read_text().splitlines()
    return collections.Counter(line.split()[1] for line in lines if line.startswith("end "))


def no_agent_told_to_exit(deployment: Deployment, *agents: str) -> None:
    for name in agents:
        assert deployment.processes[name][0].returncode is None, deployment.log(name)
        assert "unregistered by the orchestrator" not in deployment.log(name)


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_the_leader_sigkilled_with_1000_tasks_in_flight_a_standby_takes_over(
    deployment: Deployment, store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given a leading serve and a standby on one store, 1,000 tasks waiting in their queue
    deployment.env["ORCHESTRATOR_STORE"] = store_spec(store, tmp_path, request)
    run_log = tmp_path / "runs.log"
    agent_env = {"AGENT_RUN_LOG": str(run_log), "AGENT_MAX": "20", "AGENT_SLEEP": "0.05"}
    leader = await deployment.start("leader", "serve")
    await wait_until(lambda: answers(deployment, "leader"), timeout=30, interval=0.1)
    first = await leader_of(deployment)
    await deployment.start("standby", "serve")
    await wait_until(seen(deployment, "standby", "standing by"), timeout=30)
    assert f"leader is {first['id']} (epoch {first['epoch']})" in deployment.log("standby")
    ids = await submit_all(deployment, TASKS, "ha")

    # When two agents (that note their runs) run them and the leader is SIGKILLed meanwhile
    finished = await count_finished(deployment)
    await deployment.agent("ha_1", "ha", **agent_env)
    await deployment.agent("ha_2", "ha", **agent_env)

    async def a_fifth_ended() -> bool:
        return finished[0] >= TASKS // 5

    await wait_until(a_fifth_ended, timeout=60)
    assert finished[0] < TASKS, "every task ended before the kill: nothing was in flight"
    leader.kill()
    killed = time.monotonic()
    await leader.wait()

    # Then the standby leads within 10 s, under a newer epoch
    async def taken_over() -> bool:
        try:
            stats = await deployment.rpc(StatsRequest(), timeout=0.5)
            return stats["role"] == "leader" and stats["leader"]["id"] != first["id"]
        except (AssertionError, TimeoutError):
            return False

    await wait_until(taken_over, timeout=30, interval=0.05)
    takeover = time.monotonic() - killed
    print(f"FAULT-TAKEOVER scenario=leader-sigkill-{store} seconds={takeover:.2f}", flush=True)
    assert takeover < 10
    assert (await leader_of(deployment))["epoch"] == first["epoch"] + 1

    # And every task completes, each once, with its result; no agent was told to exit
    completed, twice = await outcome(deployment, f"leader-sigkill-standby-{store}", ids, run_log)
    assert (completed, twice) == (TASKS, 0)
    no_agent_told_to_exit(deployment, "ha_1", "ha_2")


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.slow
async def test_two_serves_started_at_once_one_leads_and_every_task_completes_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Given two serves on one prefix and store, started at the same moment
    deployment.env["ORCHESTRATOR_STORE"] = f"sqlite:{tmp_path / 'state.sqlite'}"
    run_log = tmp_path / "runs.log"
    await asyncio.gather(deployment.start("a", "serve"), deployment.start("b", "serve"))

    # Then exactly one leads and the other stands by, naming it
    async def settled() -> bool:
        return all(
            logged(deployment, name, "leading prefix") or logged(deployment, name, "standing by")
            for name in ("a", "b")
        )

    await wait_until(settled, timeout=30, interval=0.1)
    leaders = [name for name in ("a", "b") if logged(deployment, name, "leading prefix")]
    assert len(leaders) == 1, (deployment.log("a"), deployment.log("b"))
    lead = await leader_of(deployment)
    standby = "b" if leaders == ["a"] else "a"
    await wait_until(seen(deployment, standby, f"leader is {lead['id']}"), timeout=10)

    # When agents run tasks submitted through the request queue
    env = {"AGENT_RUN_LOG": str(run_log), "AGENT_MAX": "20"}
    await deployment.agent("two_1", "two", **env)
    await deployment.agent("two_2", "two", **env)
    ids = await submit_all(deployment, TWO_SERVES_TASKS, "two")

    # Then every task completes once, and no agent was told to exit
    completed, twice = await outcome(deployment, "two-serves-at-once", ids, run_log)
    assert (completed, twice) == (TWO_SERVES_TASKS, 0)
    no_agent_told_to_exit(deployment, "two_1", "two_2")
    assert not logged(deployment, standby, "leading prefix")

    # And `orchestrator agents` says who leads
    agents = await deployment.run("agents")
    assert f"leader: {lead['id']} (epoch {lead['epoch']})" in agents.out, agents


@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.slow
async def test_a_leader_paused_past_its_heartbeat_wakes_up_and_changes_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Given a leader and a standby on one SQLite file, with short AMQP heartbeats
    # (the broker drops a silent connection, and the lease with it, in seconds)
    # and agents judged silent after 3 s, running tasks
    deployment.env["ORCHESTRATOR_STORE"] = f"sqlite:{tmp_path / 'state.sqlite'}"
    deployment.env["ORCHESTRATOR_AMQP_HEARTBEAT"] = "2"
    run_log = tmp_path / "runs.log"
    old = await deployment.start("old", "serve")
    await wait_until(lambda: answers(deployment, "old"), timeout=30, interval=0.1)
    first = await leader_of(deployment)
    await deployment.start("new", "serve")
    await wait_until(seen(deployment, "new", "standing by"), timeout=30)
    env = {"AGENT_RUN_LOG": str(run_log), "AGENT_MAX": "10", "AGENT_SLEEP": "0.05"}
    await deployment.agent("p_1", "paused", **env)
    await deployment.agent("p_2", "paused", **env)
    finished = await count_finished(deployment)
    ids = await submit_all(deployment, TWO_SERVES_TASKS, "paused")

    # When the leader is paused (SIGSTOP) until the broker gave its lease to the
    # standby, and wakes up (SIGCONT) long after it last heard its agents (a
    # SQLite leader paused in a write holds the file's lock: the standby can
    # claim the store only once the old one is awake or dead)
    old.send_signal(signal.SIGSTOP)
    try:
        await wait_until(seen(deployment, "new", "took the lease"), timeout=60)
        await asyncio.sleep(4)  # the agents' heartbeat timeout (3 s) passes in its sleep
    finally:
        old.send_signal(signal.SIGCONT)

    async def taken_over() -> bool:
        try:
            stats = await deployment.rpc(StatsRequest(), timeout=0.5)
        except TimeoutError:
            return False
        return stats["leader"]["id"] != first["id"]

    await wait_until(taken_over, timeout=60, interval=0.1)

    # Then it steps down (and stands by again) without telling any agent to stop,
    # and every task completes once with its result
    await wait_until(seen(deployment, "old", "standing by again"), timeout=30)
    completed, twice = await outcome(deployment, "leader-sigstop-then-wakes", ids, run_log)
    assert (completed, twice) == (TWO_SERVES_TASKS, 0)
    no_agent_told_to_exit(deployment, "p_1", "p_2")
    assert "missed heartbeats" not in deployment.log("old")
    assert finished[0] >= TWO_SERVES_TASKS


async def answers(deployment: Deployment, name: str) -> bool:
    process = deployment.processes[name][0]
    if process.returncode is not None:
        raise AssertionError(f"{name} exited {process.returncode}:\n{deployment.log(name)}")
    try:
        await deployment.rpc(StatsRequest(), timeout=0.5)
    except TimeoutError:  # NoReply
        return False
    return True


def seen(deployment: Deployment, name: str, text: str) -> Callable[[], Awaitable[bool]]:
    """A condition: ``text`` is in the log of process ``name``."""

    async def condition() -> bool:
        return logged(deployment, name, text)

    return condition


def logged(deployment: Deployment, name: str, text: str) -> bool:
    process = deployment.processes[name][0]
    if process.returncode is not None:
        raise AssertionError(f"{name} exited {process.returncode}:\n{deployment.log(name)}")
    return text in deployment.log(name)
