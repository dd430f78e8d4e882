"""Least privilege on the real broker: a vhost of the test's own, one user per
role with exactly what ``orchestrator topology --permissions`` exports (granted
with the very ``rabbitmqctl`` commands it prints), a task that completes
through all of them, and, with plain aio_pika, what each role cannot do."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiormq
import pytest

from agents import Agent, TaskContext
from broker import (
    BusSettings,
    RabbitMQBus,
    SubmitTaskRequest,
    TaskStatusRequest,
    TopologyMissing,
)
from broker import permissions as perms
from broker.topology import Topology
from orchestrator import TaskOrchestrator
from orchestrator.service import OrchestratorService
from tests.conftest import BROKER_URL, require_broker
from tests.deployment import management_api, run, skip_or_fail
from tests.harness import FAST, wait_until

AGENT_ID = "perm-agent-1"
OTHER_AGENT = "perm-agent-2"


def rabbitmqctl(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (args[:2], result.stderr)


@dataclass
class Users:
    vhost: str
    urls: dict[str, str]
    """amqp:// URL by role ("agent" is AGENT_ID's user, "other" OTHER_AGENT's)."""
    names: dict[str, str]
    """User name by role."""


@pytest.fixture
async def users(prefix: str) -> AsyncIterator[Users]:
    """A vhost and one user per role of the test's own, with the exported
    permissions; deleted afterwards (only what this fixture created).

    The users and the vhost are made through the management API (a
    rabbitmqctl takes seconds on a busy machine); the agents' permissions are
    granted with the very ``rabbitmqctl`` commands the export prints, the
    others' from its JSON: both forms are what the broker then enforces."""
    require_broker()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl not installed")
    api = management_api()
    topology = Topology(prefix)
    vhost = f"perm-{secrets.token_hex(5)}"
    token = secrets.token_hex(3)
    roles = {
        "orchestrator": perms.orchestrator(topology, f"orch-{token}"),
        "client": perms.client(topology, f"client-{token}"),
        "monitor": perms.monitor(topology, f"monitor-{token}"),
        "agent": perms.agent(topology, AGENT_ID),
        "other": perms.agent(topology, OTHER_AGENT),
    }
    parts = urlsplit(BROKER_URL)
    address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"
    passwords = {role: secrets.token_urlsafe(12) for role in roles}
    created: list[str] = []

    def call(method: str, path: str, body: Any = None) -> None:
        status, answer = api.call(method, path, body)
        assert status < 300, (method, path, answer)

    v = quote(vhost, safe="")
    await asyncio.to_thread(call, "PUT", f"/api/vhosts/{v}", {})
    try:
        for role, granted in roles.items():
            # No tags: none of them is an administrator
            body = {"password": passwords[role], "tags": ""}
            await asyncio.to_thread(call, "PUT", f"/api/users/{quote(granted.user)}", body)
            created.append(granted.user)
        commands = [c for r in ("agent", "other") for c in roles[r].commands(vhost)]
        await asyncio.gather(*(asyncio.to_thread(rabbitmqctl, *c[1:]) for c in commands))
        for role in ("orchestrator", "client", "monitor"):
            exported = roles[role].as_json(vhost)
            user = quote(roles[role].user)
            for entry in exported["permissions"]:
                grant = {k: entry[k] for k in ("configure", "write", "read")}
                await asyncio.to_thread(call, "PUT", f"/api/permissions/{v}/{user}", grant)
            for entry in exported["topic_permissions"]:
                grant = {k: entry[k] for k in ("exchange", "write", "read")}
                await asyncio.to_thread(call, "PUT", f"/api/topic-permissions/{v}/{user}", grant)
        urls = {
            role: f"amqp://{granted.user}:{passwords[role]}@{address}/{v}"
            for role, granted in roles.items()
        }
        yield Users(vhost, urls, {role: granted.user for role, granted in roles.items()})
    finally:
        await asyncio.to_thread(api.call, "DELETE", f"/api/vhosts/{v}")
        for user in created:
            await asyncio.to_thread(api.call, "DELETE", f"/api/users/{quote(user)}")


def bus(users: Users, role: str, prefix: str, **kwargs: Any) -> RabbitMQBus:
    settings = BusSettings(
        broker_url=users.urls[role],
        prefix=prefix,
        connect_attempts=1,
        # Agents obey commands from the orchestrator's user only
        orchestrator_user=users.names["orchestrator"],
    )
    return RabbitMQBus(settings=settings, **kwargs)


async def refused(url: str, operation: Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]):
    """Whether RabbitMQ refuses ``operation`` (ACCESS_REFUSED) on a channel of its own."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await operation(channel)
        except aiormq.exceptions.ChannelAccessRefused:
            return True
        return False
    finally:
        await connection.close()


def consume(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        declared = await channel.declare_queue(queue, passive=True)  # allowed: passive
        await declared.consume(_ignore)

    return go


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


def publish(exchange: str, key: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        target = channel.default_exchange if not exchange else await channel.get_exchange(exchange)
        await target.publish(aio_pika.Message(b"{}"), key, timeout=5)

    return go


def delete(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return go


def declare(queue: str) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(queue, exclusive=True)

    return go


def bind_own(
    queue: str, exchange: str, key: str
) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        declared = await channel.declare_queue(queue, exclusive=True, auto_delete=True)
        await declared.bind(exchange, key)

    return go


@pytest.mark.rabbitmq
async def test_each_role_does_its_part_of_a_task_and_nothing_else(
    users: Users, prefix: str
) -> None:
    t = Topology(prefix)

    # Given an agent with an agent's permissions on an empty vhost, it does
    # not start: it may not declare the shared topology, and says who should
    early = Agent(AGENT_ID, ["perm"], 2, heartbeat_interval=0.3)
    with pytest.raises(TopologyMissing, match=r"start `orchestrator serve` first"):
        await early.start(bus(users, "agent", prefix))

    # When the orchestrator runs as its user, the agent as its own, and a
    # client submits as the client user
    orchestrator = TaskOrchestrator(bus(users, "orchestrator", prefix), settings=FAST)
    await orchestrator.start()
    service = OrchestratorService(orchestrator)
    await service.start()
    agent = Agent(AGENT_ID, ["perm"], 2, heartbeat_interval=0.3)

    async def handler(ctx: TaskContext) -> dict[str, Any]:
        return {"doubled": ctx.payload["n"] * 2}

    agent.add_handler("*", handler)
    agent_bus = bus(users, "agent", prefix)
    client = bus(users, "client", prefix, declare_topology=False)
    try:
        await agent.start(agent_bus)
        assert agent_bus.declares == "own"  # found out by itself: it may not declare more

        async def registered() -> bool:
            return AGENT_ID in {a.agent_id for a in await orchestrator.get_agents()}

        await wait_until(registered, timeout=15)
        await client.connect()
        reply = await client.request(
            SubmitTaskRequest(
                name="double", task_type="math", payload={"n": 21}, required_capabilities=["perm"]
            )
        )
        assert reply.ok, reply.error
        task_id = reply.result["task_id"]

        # Then the task completes, and the client reads its result
        async def done() -> bool:
            status = await client.request(TaskStatusRequest(task_id=task_id))
            assert status.ok, status.error
            return status.result["status"] == "completed"

        await wait_until(done, timeout=20, interval=0.1)
        status = await client.request(TaskStatusRequest(task_id=task_id))
        assert status.result["result"] == {"doubled": 42}
        assert status.result["assigned_agent"] == AGENT_ID
        task_queue = next(iter(await orchestrator.get_queues()))

        # And the agent cannot consume the requests or the orchestrator's queues
        agent_url = users.urls["agent"]
        orchestrators_queues = [q.name for q in t.fixed().queues if "orchestrator" in q.name]
        assert orchestrators_queues  # whatever the topology names them
        orchestrators_queues.append(t.agent_events_queue(AGENT_ID))  # (its own results' queue)
        for queue in [t.rpc_queue, *orchestrators_queues]:
            assert await refused(agent_url, consume(queue)), queue
        # nor publish commands, to one agent or to all
        for key in (OTHER_AGENT, t.control_key(None)):
            assert await refused(agent_url, publish(t.control_exchange, key)), key
        # nor put anything into a queue through the default exchange, nor publish tasks
        assert await refused(agent_url, publish("", t.rpc_queue))
        assert await refused(agent_url, publish(t.tasks_exchange, task_queue))
        # nor delete or declare queues it does not own
        for queue in (
            t.rpc_queue,
            t.orchestrator_events_queue,
            t.agent_events_queue(AGENT_ID),
            t.task_queue(task_queue),
        ):
            assert await refused(agent_url, delete(queue)), queue
        assert await refused(agent_url, declare(t.task_queue("evil")))
        assert await refused(agent_url, declare(t.agent_control_queue(OTHER_AGENT)))
        # nor publish events under another agent's id (topic permission, {username})
        assert await refused(
            agent_url, publish(t.events_exchange, t.event_key("task.finished", OTHER_AGENT))
        )
        assert await refused(agent_url, publish(t.events_exchange, "task.finished"))
        # while events under its own id go out
        assert not await refused(
            agent_url, publish(t.events_exchange, t.event_key("agent.heartbeat", AGENT_ID))
        )
        # and another agent's user is held to its own id the same way
        assert await refused(
            users.urls["other"], publish(t.events_exchange, t.event_key("task.started", AGENT_ID))
        )

        # And the client can only submit and query: no consuming the requests,
        # the task queues or the orchestrator's queues, no events, commands or
        # tasks, no deleting, no queue of its own bound to agent events
        client_url = users.urls["client"]
        for queue in [t.rpc_queue, t.task_queue(task_queue), *orchestrators_queues]:
            assert await refused(client_url, consume(queue)), queue
        assert await refused(
            client_url, publish(t.events_exchange, t.event_key("task.finished", AGENT_ID))
        )
        assert await refused(client_url, publish(t.control_exchange, AGENT_ID))
        assert await refused(client_url, publish(t.tasks_exchange, task_queue))
        # nor put anything into a queue by name through the default exchange
        for queue in (t.orchestrator_events_queue, t.task_queue(task_queue), t.rpc_queue):
            assert await refused(client_url, publish("", queue)), queue
        assert await refused(client_url, delete(t.rpc_queue))
        assert await refused(client_url, declare(t.task_queue("evil")))
        monitor_queue = t.monitor((), secrets.token_hex(4)).queue.name
        assert await refused(client_url, bind_own(monitor_queue, t.events_exchange, "agent.#"))
        # but it may wait on task events in a queue of its own
        assert not await refused(client_url, bind_own(monitor_queue, t.events_exchange, "task.#"))

        # And the monitor reads every event and does nothing else
        monitor_url = users.urls["monitor"]
        assert not await refused(monitor_url, bind_own(monitor_queue, t.events_exchange, "#"))
        assert await refused(monitor_url, consume(t.orchestrator_events_queue))
        assert await refused(
            monitor_url, publish(t.events_exchange, t.event_key("task.finished", AGENT_ID))
        )
        assert await refused(monitor_url, publish("", t.rpc_queue))
        assert await refused(monitor_url, publish(t.control_exchange, AGENT_ID))

        # And after all that the orchestrator still answers and the task is untouched
        status = await client.request(TaskStatusRequest(task_id=task_id))
        assert status.result["status"] == "completed"
        assert status.result["result"] == {"doubled": 42}
    finally:
        await client.close()
        await agent.stop(drain_timeout=0.5)
        await service.stop()
        await orchestrator.stop()
        await orchestrator.bus.close()


# --------------------------------------------------------------- derived, not listed


def grants(pattern: str, name: str) -> bool:
    """Whether a RabbitMQ permission pattern grants ``name`` (it searches, unanchored)."""
    return re.search(pattern, name) is not None


def test_permissions_follow_the_topology_objects() -> None:
    # Whatever the topology holds (a queue added or split), the orchestrator may
    # declare, write and read it, and no agent, client or monitor may declare it
    t = Topology("shop")
    orchestrator = perms.orchestrator(t).permission
    others = [perms.agent(t, "a-1").permission, perms.client(t).permission]
    others.append(perms.monitor(t).permission)
    names = perms.names_of(perms.shared(t)) | {t.task_queue("report.pdf+finance")}
    for name in names:
        for pattern in (orchestrator.configure, orchestrator.write, orchestrator.read):
            assert grants(pattern, name), name
        for other in others:
            assert not grants(other.configure, name), name
    # Agents' and monitors' own queues are not the orchestrator's
    for own in (t.agent_control_queue("a-1"), t.monitor((), "x").queue.name):
        assert not grants(orchestrator.configure, own)

    # An agent configures and reads its own control queue, not another's (nor a
    # longer id that starts with its own), and reads the task queues
    agent = perms.agent(t, "a-1").permission
    assert grants(agent.configure, t.agent_control_queue("a-1"))
    for other in ("a-2", "a-10", "a-1x", "a.1"):
        assert not grants(agent.configure, t.agent_control_queue(other)), other
        assert not grants(agent.read, t.agent_control_queue(other)), other
    assert grants(agent.read, t.task_queue("report.@any"))
    for queue in (
        t.rpc_queue,
        t.orchestrator_events_queue,
        t.orchestrator_heartbeats_queue,
        t.orchestrator_dead_queue,
    ):
        assert not grants(agent.read, queue)
    assert t.orchestrator_heartbeats_queue in names  # the orchestrator's to declare and read
    # It publishes events and dead letters only: no commands, no tasks, no default exchange
    assert grants(agent.write, t.events_exchange) and grants(agent.write, t.dead_exchange)
    for exchange in (t.control_exchange, t.tasks_exchange, perms.DEFAULT_EXCHANGE):
        assert not grants(agent.write, exchange)
    (topic,) = perms.agent(t, "a-1").topic
    own = topic.write.replace("{username}", "a-1")  # as RabbitMQ expands it
    assert grants(own, t.event_key("task.finished", "a-1"))
    assert not grants(own, t.event_key("task.finished", "a-2"))
    assert not grants(own, "task.finished")

    # An agent's user that runs replicas has theirs too, named <id>-<anything>, and no more
    replicas = perms.agent(t, "analyst", replicas=True)
    for queue in ("analyst", "analyst-3f2a", "analyst-host.local"):
        assert grants(replicas.permission.configure, t.agent_control_queue(queue)), queue
    for queue in ("analystx", "risk-1", "analyst-"):
        assert not grants(replicas.permission.configure, t.agent_control_queue(queue)), queue
    keys = replicas.topic[0].write.replace("{username}", "analyst")
    assert grants(keys, t.event_key("task.started", "analyst-3f2a"))
    assert not grants(keys, t.event_key("task.started", "risk-1"))

    # A client may publish requests to the requests exchange only (the default
    # exchange reaches every queue by name); a monitor publishes nothing
    client = perms.client(t).permission
    assert grants(client.write, t.requests_exchange)
    assert not grants(client.write, perms.DEFAULT_EXCHANGE)
    assert not grants(perms.monitor(t).permission.write, perms.DEFAULT_EXCHANGE)
    assert not grants(perms.monitor(t).permission.write, t.requests_exchange)
    with pytest.raises(ValueError, match="agent_id"):
        perms.agent(t, "evil#agent.*")


async def test_topology_command_exports_the_permissions_as_json_and_rabbitmqctl() -> None:
    t = Topology("shop")
    printed = await run("topology", "--prefix", "shop", "--permissions", "json", "--agent", "a-1")
    assert printed.code == 0, printed
    exported = json.loads(printed.out)
    assert set(exported["roles"]) == {"orchestrator", "agent", "client", "monitor"}
    (agent,) = exported["agents"]
    assert agent == perms.agent(t, "a-1").as_json("/")
    # The agent role as a template: its user is the agent's id
    assert exported["roles"]["agent"]["user"] == "{agent_id}"

    shell = await run(
        "topology", "--prefix", "shop", "--vhost", "prod", "--permissions", "rabbitmqctl",
        "--agent", "a-1",
    )  # fmt: skip
    assert shell.code == 0, shell
    commands = [shlex.split(line) for line in shell.out.splitlines() if line.startswith("rabbitmq")]
    expected = [c for role in perms.every_role(t, ["a-1"]) for c in role.commands("prod")]
    assert commands == expected
    # The definitions are still what it prints without --permissions
    plain = await run("topology", "--prefix", "shop")
    assert json.loads(plain.out) == t.definitions()
