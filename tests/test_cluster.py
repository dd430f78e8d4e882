"""A RabbitMQ cluster: a node killed under 1,000 tasks in flight (issue 12).

One 3-node cluster of the module's own (``tests.cluster.LocalCluster``: its
own node names, ports and data folders), shared by the tests here because it
takes half a minute to form. ``orchestrator serve`` (quorum queues on, a
SQLite store) and two agents (``tests/agent_app.py``, noting every handler
run) run as processes, each given all three node addresses, in an order that
says which node each one connects to (the first that answers):

- serve on node 0, so the classic task queues it declares live on node 0
  (RabbitMQ 3.10 puts a classic queue on the node of the connection that
  declares it); its own queues (events, requests, its dead letters) are
  quorum queues, on all three nodes.
- agent ``c_1`` on node 1, agent ``c_2`` on node 2.

Scenarios, each printing ``FAULT-TABLE scenario=... tasks=N completed=N
lost=N twice=N`` (run with ``-s``):

- ``cluster-node-killed``: the beam of node 1 (agent ``c_1``'s, holding no
  task queue) SIGKILLed with tasks in flight: ``c_1`` fails over to node 2,
  its unacknowledged deliveries go back to their queue, nothing is lost.
- ``cluster-queue-node-killed``: the beam of node 0 (the serve's, and every
  task queue's) SIGKILLed. The serve's lease (an exclusive queue, on node 0
  too) goes with it, so it steps down, and its fresh connection, on another
  node, waits (saying so) for the task queue ``@any`` that only node 0 holds;
  the agents' connections fail over but cannot consume a queue whose node is
  down. The quorum queues (events, requests, dead letters) keep what was put
  in them. Node 0 is started again: the serve leads again and every task
  completes, each once. (Every message of a recovered classic queue comes
  back marked redelivered, so each asks before it runs: one ``SyncReports``
  round answers them all, where waiting ``unseen_holder_grace`` per copy
  made the rest take minutes.)
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import (
    BusConnectionError,
    BusError,
    BusSettings,
    RabbitMQBus,
    StatsRequest,
    SubmitTaskRequest,
    TaskStatusRequest,
    Topology,
    TopologyMismatch,
    redact_url,
)
from tests.brokers import Unavailable, free_port, skip_or_fail
from tests.cluster import LocalCluster
from tests.conftest import require_broker
from tests.deployment import Deployment, base_env, run
from tests.harness import wait_until

CLUSTER = [pytest.mark.rabbitmq, pytest.mark.fault, pytest.mark.slow]
"""The marks of the tests on the cluster (the others are fast)."""

TASKS = 1000


def _marked(marks: list[Any]) -> Any:
    def mark(test: Any) -> Any:
        for one in marks:
            test = one(test)
        return test

    return mark


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    try:
        nodes = LocalCluster(3)
    except Unavailable as exc:
        skip_or_fail(f"no RabbitMQ cluster here: {exc}")
        raise AssertionError("unreachable") from None
    with nodes:
        yield nodes


def addresses(cluster: LocalCluster, *order: int) -> str:
    """All the nodes' addresses, ``order`` first: the process connects to the first."""
    rest = [n for n in range(len(cluster.nodes)) if n not in order]
    return ",".join(cluster.nodes[n].url for n in (*order, *rest))


@pytest.fixture
async def deployment(cluster: LocalCluster, prefix: str, tmp_path: Path):
    for node in cluster.nodes:  # a node an earlier test killed comes back first
        if not node.running:
            node.start()
    d = Deployment(prefix, addresses(cluster, 0))
    d.env["ORCHESTRATOR_QUORUM_QUEUES"] = "true"
    d.env["ORCHESTRATOR_STORE"] = f"sqlite:{tmp_path / 'state.sqlite'}"
    try:
        yield d
    finally:
        for node in cluster.nodes:
            if not node.running:
                node.start()
        await d.close()


def fault_table(scenario: str, tasks: int, completed: int, twice: int) -> None:
    print(
        f"\nFAULT-TABLE scenario={scenario} tasks={tasks} completed={completed}"
        f" lost={tasks - completed} twice={twice}",
        flush=True,
    )


async def start(deployment: Deployment, cluster: LocalCluster, run_log: Path) -> list[str]:
    """serve on node 0, 1,000 tasks queued, then agent c_1 on node 1 and c_2 on node 2."""
    await deployment.serve()
    ids = await submit_all(deployment, TASKS)
    env = {"AGENT_RUN_LOG": str(run_log), "AGENT_MAX": "10", "AGENT_SLEEP": "0.05"}
    await deployment.agent("c_1", "cl", ORCHESTRATOR_BROKER_URL=addresses(cluster, 1), **env)
    await deployment.agent("c_2", "cl", ORCHESTRATOR_BROKER_URL=addresses(cluster, 2), **env)
    return ids


async def submit_all(deployment: Deployment, count: int) -> list[str]:
    limit = asyncio.Semaphore(32)

    async def one(n: int) -> str:
        async with limit:
            request = SubmitTaskRequest(
                name=f"t{n}", task_type="work", payload={"n": n}, required_capabilities=["cl"]
            )
            return (await deployment.rpc(request, timeout=20))["task_id"]

    return list(await asyncio.gather(*(one(n) for n in range(count))))


def handler_ends(run_log: Path) -> collections.Counter[str]:
    lines = run_log.read_text().splitlines() if run_log.exists() else []
    return collections.Counter(line.split()[1] for line in lines if line.startswith("end "))


async def stats(deployment: Deployment) -> dict[str, Any] | None:
    try:
        return await deployment.rpc(StatsRequest(), timeout=2)
    except (AssertionError, TimeoutError, BusError):
        # The orchestrator is failing over; or the request queue (quorum) was
        # electing a leader and refused the request (a nack): asked again.
        return None


async def ended(deployment: Deployment) -> int:
    current = await stats(deployment)
    return 0 if current is None else current["tasks_completed"] + current["tasks_failed"]


async def outcome(deployment: Deployment, ids: list[str], run_log: Path) -> tuple[int, int]:
    """Once every task is final: (completed with their own result, completed twice)."""

    async def all_final() -> bool:
        return await ended(deployment) >= len(ids)

    await wait_until(all_final, timeout=120, interval=0.2)
    limit = asyncio.Semaphore(32)

    async def status(task_id: str) -> dict[str, Any]:
        async with limit:
            return await deployment.rpc(TaskStatusRequest(task_id=task_id), timeout=10)

    statuses = await asyncio.gather(*(status(t) for t in ids))
    completed = sum(
        s["status"] == "completed" and s["result"]["echo"]["n"] == n for n, s in enumerate(statuses)
    )
    ends = handler_ends(run_log)
    return completed, sum(ends[t] > 1 for t in ids)


async def in_flight(deployment: Deployment, ids: list[str]) -> None:
    """Until a fifth of the tasks has ended, and not all of them."""

    async def a_fifth() -> bool:
        return await ended(deployment) >= len(ids) // 5

    await wait_until(a_fifth, timeout=60, interval=0.05)
    assert await ended(deployment) < len(ids), "every task ended before the kill"


def alive(deployment: Deployment, *names: str) -> None:
    for name in names:
        process = deployment.processes[name][0]
        assert process.returncode is None, f"{name} exited:\n{deployment.log(name)}"


@_marked(CLUSTER)
async def test_a_node_without_task_queues_killed_loses_no_task(
    cluster: LocalCluster, deployment: Deployment, tmp_path: Path
) -> None:
    # Given serve on node 0 (the task queues' node), 1,000 tasks, agents on nodes 1 and 2
    run_log = tmp_path / "runs.log"
    ids = await start(deployment, cluster, run_log)

    # When node 1, agent c_1's, is SIGKILLed while they run
    await in_flight(deployment, ids)
    cluster.nodes[1].kill()
    killed = time.monotonic()

    # Then c_1 goes on through another node, and every task completes once
    await wait_until(lambda: _logged(deployment, "c_1", "reconnected to RabbitMQ"), timeout=30)
    print(f"\nFAULT-FAILOVER agent-reconnected seconds={time.monotonic() - killed:.2f}")
    completed, twice = await outcome(deployment, ids, run_log)
    fault_table("cluster-node-killed", len(ids), completed, twice)
    assert (completed, twice) == (TASKS, 0)
    alive(deployment, "serve", "c_1", "c_2")


@_marked(CLUSTER)
async def test_the_task_queues_node_killed_waits_for_it_and_loses_no_task(
    cluster: LocalCluster, deployment: Deployment, tmp_path: Path
) -> None:
    # Given serve on node 0 (the task queues' node), 1,000 tasks, agents on nodes 1 and 2
    run_log = tmp_path / "runs.log"
    ids = await start(deployment, cluster, run_log)

    # When node 0, the serve's and the task queues', is SIGKILLed while they run
    await in_flight(deployment, ids)
    cluster.nodes[0].kill()
    killed = time.monotonic()
    ends_at_kill = sum(handler_ends(run_log).values())

    # Then the serve's lease went with node 0: it steps down, and its fresh connection
    # (to another node) waits, saying so, for the task queue @any that node 0 holds
    await wait_until(lambda: _logged(deployment, "serve", "is unavailable"), timeout=30)
    ends_while_down = sum(handler_ends(run_log).values()) - ends_at_kill
    down_for = time.monotonic() - killed

    # And once node 0 is back, every task completes once
    cluster.nodes[0].start()
    print(
        f"\nFAULT-FAILOVER queue-node-down serve-waiting-after={down_for:.2f}s"
        f" handler-ends-while-down={ends_while_down} node-back-after="
        f"{time.monotonic() - killed:.2f}s"
    )
    completed, twice = await outcome(deployment, ids, run_log)
    fault_table("cluster-queue-node-killed", len(ids), completed, twice)
    assert (completed, twice) == (TASKS, 0)
    alive(deployment, "serve", "c_1", "c_2")


async def _logged(deployment: Deployment, name: str, text: str) -> bool:
    alive(deployment, name)
    return text in deployment.log(name)


# ---------------------------------------------------------------- fast: settings, shapes


def test_every_address_is_checked_and_every_password_hidden() -> None:
    two = "amqp://u:first-secret@h1:5672/,amqp://u:second-secret@h2:5673/"
    assert redact_url(two) == "amqp://u:***@h1:5672/,amqp://u:***@h2:5673/"
    assert BusSettings(broker_url=two).broker_url == two
    for bad, problem in [
        ("amqp://u:pw@h1/,amqp://v:pw@h2/", "one user"),
        ("amqp://h1/,amqps://h2/", "one scheme"),
        ("amqp://h1/a,amqp://h2/b", "one virtual host"),
        ("amqp://u:pw@h1/,http://h2/", "is not AMQP"),
        ("amqp://u:pw@h1/,amqp://:5672/", "no host"),
    ]:
        with pytest.raises(ValueError, match=problem) as caught:
            BusSettings(broker_url=bad)
        assert "pw" not in str(caught.value)


def test_the_command_line_scrubs_the_password_of_every_address() -> None:
    from orchestrator.cli.redaction import remember_secret, scrub

    remember_secret("amqp://u:first-secret@h1:5672/,amqp://u:second-secret@h2:5673/")
    said = scrub("login refused with second-secret; first-secret too")
    assert "secret" not in said.replace("***", ""), said


def test_quorum_queues_are_the_orchestrators_own_and_task_queues_stay_classic() -> None:
    classic, quorum = Topology("p"), Topology("p", quorum=True)
    own = ("p.orchestrator.announcements", "p.rpc", "p.orchestrator.dead")
    for topology, kind in ((classic, "classic"), (quorum, "quorum")):
        queues = {q["name"]: q["arguments"] for q in topology.definitions()["queues"]}
        assert {queues[name]["x-queue-type"] for name in own} == {kind}
        assert queues["p.tasks.@any"]["x-queue-type"] == "classic"
        assert queues["p.tasks.@any"]["x-max-priority"] > 1
        assert queues["p.dead"]["x-queue-type"] == "classic"
    assert BusSettings(quorum_queues=True, prefix="p").quorum_queues


async def test_the_topology_export_follows_the_setting() -> None:
    exported = await run("topology", "--prefix", "p", env=base_env(ORCHESTRATOR_QUORUM_QUEUES="1"))
    assert exported.code == 0, exported.err
    assert '"x-queue-type": "quorum"' in exported.out


@pytest.mark.rabbitmq
async def test_the_first_connect_goes_on_to_the_next_address(prefix: str) -> None:
    broker = require_broker()
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    bus = RabbitMQBus(settings=BusSettings(broker_url=f"{dead},{broker}", prefix=prefix))
    await bus.connect()
    try:
        assert bus.is_connected
        assert bus.address.startswith(redact_url(dead))
    finally:
        await bus.delete_topology()
        await bus.close()
    nobody = RabbitMQBus(
        settings=BusSettings(broker_url=f"{dead},{dead}", prefix=prefix, connect_attempts=1)
    )
    with pytest.raises(BusConnectionError, match="cannot reach RabbitMQ"):
        await nobody.connect()
    await nobody.close()


@pytest.mark.rabbitmq
async def test_a_classic_queue_cannot_become_quorum_and_the_error_names_the_setting(
    prefix: str,
) -> None:
    broker = require_broker()
    classic = RabbitMQBus(settings=BusSettings(broker_url=broker, prefix=prefix))
    await classic.connect()  # declares the events queue classic
    quorum = RabbitMQBus(settings=BusSettings(broker_url=broker, prefix=prefix, quorum_queues=True))
    try:
        with pytest.raises(TopologyMismatch, match="ORCHESTRATOR_QUORUM_QUEUES=true") as caught:
            await quorum.connect()
        assert "orchestrator.announcements" in str(caught.value)
    finally:
        await quorum.close()
        await classic.delete_topology()
        await classic.close()
