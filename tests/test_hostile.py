"""Hostile input: what a stranger on the shared broker can publish, and what it changes.

Each attack of issue 11 is published by a plain aio_pika client (not our bus)
logged in as a user of the test's own, on the real broker, against an
orchestrator and an agent that run as ``guest``. Each test asserts that the
task's outcome and result, the agents and every accepted task are untouched,
and that the attack was refused (counted by reason). The flood test prints
its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import pytest

from agents import TaskContext
from broker import (
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    BusSettings,
    CancelTask,
    ConsumeQueues,
    MemoryBus,
    Reannounce,
    TaskAssigned,
    TaskFinished,
    TaskProgress,
    TaskStarted,
    Topology,
    Unregister,
    WireMessage,
)
from broker.messages import CancelTasks
from broker.topology import AGENT_EVENTS_KEEP, HEARTBEATS_KEEP
from orchestrator import MemoryStore, TaskOrchestrator
from tests.conftest import require_broker
from tests.deployment import broker_user, management_api
from tests.harness import FAST, Harness, running_on, wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.rabbitmq]

WAIT = 30.0


class Attacker:
    """A plain AMQP client of another user, publishing whatever it likes."""

    def __init__(self, url: str, user: str, topology: Topology) -> None:
        self.url = url
        self.user = user
        self.topology = topology
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Attacker:
        connection = await self._stack.enter_async_context(await aio_pika.connect(self.url))
        self.channel = await connection.channel()
        self.fast = await connection.channel(publisher_confirms=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def publish(
        self,
        exchange: str,
        key: str,
        body: WireMessage | bytes,
        *,
        as_self: bool = False,
        fast: bool = False,
        **properties: Any,
    ) -> None:
        """``as_self``: with the attacker's own (checked) user_id; else none."""
        raw = body if isinstance(body, bytes) else body.encode()
        message = aio_pika.Message(raw, user_id=self.user if as_self else None, **properties)
        channel = self.fast if fast else self.channel
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=key)

    async def event(self, event: Any, **options: Any) -> None:
        """Keyed as an agent keys it (``Topology.event_key``: kind, then the id it
        claims), so that it reaches the queue of the agent it claims to be."""
        key = self.topology.event_key(event.kind, event.agent_id)
        key = key if len(key) <= 255 else event.kind  # (AMQP's limit; agent.announce.# takes it)
        await self.publish(self.topology.events_exchange, key, event, **options)

    async def both_ways(self, event: Any) -> None:
        """The event without a user_id and with the attacker's own."""
        await self.event(event)
        await self.event(event, as_self=True)


class Scene:
    def __init__(self, harness: Harness, attacker: Attacker) -> None:
        self.harness = harness
        self.attacker = attacker
        self.gate = asyncio.Event()

    @property
    def orchestrator(self) -> TaskOrchestrator:
        assert self.harness.orchestrator is not None
        return self.harness.orchestrator

    def refused(self) -> dict[str, int]:
        return dict(self.orchestrator.registry.refusals.counts)

    async def wait_refused(self, count: int, before: dict[str, int] | None = None) -> None:
        """Until ``count`` more messages were refused than ``before``."""
        base = sum((before or {}).values())

        async def enough() -> bool:
            return sum(self.refused().values()) - base >= count

        await wait_until(enough, WAIT)

    async def submit(self, **changes: Any) -> str:
        fields: dict[str, Any] = {
            "name": "t",
            "description": "",
            "task_type": "job",
            "payload": {"n": 1},
            "max_retries": 2,
        }
        return await self.orchestrator.submit_task(**{**fields, **changes})

    async def status(self, task_id: str) -> dict[str, Any]:
        status = await self.orchestrator.get_task_status(task_id)
        assert status is not None
        return status


@pytest.fixture
async def scene(prefix: str) -> AsyncIterator[Scene]:
    """An orchestrator and agent ``worker`` (capability ``work``, handler held
    until ``scene.gate`` is set) as guest, and an attacker of its own user."""
    url = require_broker()
    settings = BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)
    harness = Harness("rabbitmq", settings)
    with broker_user(management_api(url), url) as user:
        try:
            await harness.start_orchestrator(FAST)
            scene_ = None

            async def held(ctx: TaskContext) -> dict[str, Any]:
                assert scene_ is not None
                await scene_.gate.wait()
                return {"real": ctx.task_id}

            await harness.start_agent("worker", ["work"], 5, held)
            async with Attacker(user.url, user.name, Topology(prefix)) as attacker:
                scene_ = Scene(harness, attacker)
                yield scene_
        finally:
            await harness.close()


async def _running(scene: Scene, count: int = 1, **changes: Any) -> list[str]:
    ids = [await scene.submit(**changes) for _ in range(count)]
    for task_id in ids:
        await wait_until(lambda t=task_id: running_on(scene.orchestrator, t, "worker"), WAIT)
    return ids


async def _ends_real(scene: Scene, task_id: str, retries: int = 0) -> None:
    """The task completes on worker with worker's result, no retry spent."""
    scene.gate.set()
    status = await scene.orchestrator.wait_for_task(task_id, WAIT)
    assert (status["status"], status["result"], status["assigned_agent"]) == (
        "completed",
        {"real": task_id},
        "worker",
    )
    assert status["retry_count"] == retries


async def _agents_untouched(scene: Scene) -> None:
    (agent,) = await scene.orchestrator.get_agents()
    assert (agent.agent_id, agent.capabilities) == ("worker", ["work"])
    (real,) = scene.harness.agents
    assert real.serving, "the agent stopped"


# --------------------------------------------------------------- forged results


async def test_a_forged_finished_for_a_task_running_elsewhere_is_refused(scene: Scene) -> None:
    # Given a task running on worker
    (task_id,) = await _running(scene, required_capabilities=["work"])
    before = scene.refused()

    # When a stranger says it completed, as an unknown agent and as worker itself
    for agent_id in ("evil", "worker"):
        await scene.attacker.both_ways(
            TaskFinished(
                task_id=task_id,
                attempt=1,
                agent_id=agent_id,
                outcome="completed",
                result={"forged": True},
            )
        )
        await scene.attacker.both_ways(
            TaskProgress(task_id=task_id, attempt=1, agent_id=agent_id, progress=1.0)
        )

    # Then those of worker's id are refused (those of an id nobody registered
    # reach no queue: the broker drops them), the task runs on, and ends with
    # worker's own result
    await scene.wait_refused(4, before)
    status = await scene.status(task_id)
    assert (status["status"], status["result"], status["progress"]) == ("running", None, 0.0)
    refused = scene.refused()
    assert refused.get("no_user", 0) >= 2
    assert refused.get("wrong_user", 0) >= 2
    await _ends_real(scene, task_id)
    await _agents_untouched(scene)


async def test_a_forged_finished_or_start_for_a_queued_task_is_refused(scene: Scene) -> None:
    # Given a task waiting in its queue (no agent has capability rare)
    task_id = await scene.submit(required_capabilities=["rare"])
    before = scene.refused()

    # When a stranger says an agent took it, started it and finished it
    for agent_id in ("evil", "worker"):
        await scene.attacker.both_ways(TaskAssigned(task_id=task_id, attempt=1, agent_id=agent_id))
        await scene.attacker.both_ways(TaskStarted(task_id=task_id, attempt=1, agent_id=agent_id))
        await scene.attacker.both_ways(
            TaskFinished(
                task_id=task_id, attempt=1, agent_id=agent_id, outcome="completed", result={}
            )
        )

    # Then those of worker's id are refused (evil's reach no queue) and it still
    # waits, unassigned, for an agent that can run it
    await scene.wait_refused(6, before)
    status = await scene.status(task_id)
    assert (status["status"], status["assigned_agent"], status["result"]) == (
        "pending",
        None,
        None,
    )
    assert await scene.orchestrator.bus.queue_depth(_key(scene, task_id)) == 1
    await _agents_untouched(scene)


def _key(scene: Scene, task_id: str) -> str:
    from orchestrator.dispatch import queue_key

    task = scene.orchestrator.records.get(task_id)
    assert task is not None
    return queue_key(task)


async def test_a_forged_failure_spends_no_retry(scene: Scene) -> None:
    # Given a task running on worker with retries left
    (task_id,) = await _running(scene, required_capabilities=["work"])
    before = scene.refused()

    # When a stranger reports it failed (and timed out), as worker and as another
    for agent_id in ("evil", "worker"):
        for outcome in ("failed", "timeout"):
            await scene.attacker.both_ways(
                TaskFinished(
                    task_id=task_id, attempt=1, agent_id=agent_id, outcome=outcome, error="forged"
                )
            )

    # Then no retry is spent: it runs on and completes with its real result
    await scene.wait_refused(4, before)
    status = await scene.status(task_id)
    assert (status["status"], status["retry_count"], status["error_message"]) == (
        "running",
        0,
        None,
    )
    await _ends_real(scene, task_id)


async def test_a_forged_dead_letter_fails_no_task(scene: Scene) -> None:
    # Given a task running on worker, and one waiting in its queue
    (running,) = await _running(scene, required_capabilities=["work"])
    queued = await scene.submit(required_capabilities=["rare"])
    before = scene.refused()

    # When a stranger puts dead letters naming their attempts on the dead-letter
    # exchange, plain and dressed as the broker's own (x-death)
    dead = scene.attacker.topology.dead_exchange
    for task_id in (running, queued):
        for headers in ({"x-reason": "forged"}, {"x-reason": "forged", "x-death": [{"count": 1}]}):
            for as_self in (False, True):
                await scene.attacker.publish(
                    dead,
                    "",
                    b"{}",
                    as_self=as_self,
                    message_id=f"{task_id}:1",
                    headers=headers,
                )

    # Then every one is refused; the running one completes, the queued one waits
    await scene.wait_refused(8, before)
    assert scene.refused().get("dead_letter_not_trusted", 0) >= 8
    assert (await scene.status(queued))["status"] == "pending"
    assert (await scene.status(running))["status"] == "running"
    await _ends_real(scene, running)


async def test_nobody_can_publish_as_the_orchestrators_user(scene: Scene) -> None:
    # When a stranger sets user_id to the orchestrator's user (guest)
    event = TaskFinished(task_id="x", attempt=1, agent_id="worker", outcome="completed")
    message = aio_pika.Message(event.encode(), user_id="guest")
    exchange = await scene.attacker.channel.get_exchange(
        scene.attacker.topology.events_exchange, ensure=False
    )

    # Then the broker refuses the publish (and closes the channel)
    with pytest.raises(aio_pika.exceptions.AMQPError, match="user_id"):
        await exchange.publish(message, routing_key=event.kind)


# --------------------------------------------------------------- forged commands


async def test_forged_commands_stop_cancel_or_redirect_no_agent(scene: Scene) -> None:
    # Given three tasks running on worker
    ids = await _running(scene, 3, required_capabilities=["work"])
    (agent,) = scene.harness.agents
    control = scene.attacker.topology.control_exchange

    # When a stranger tells every agent, and worker, to unregister, to cancel
    # the tasks, and to consume a queue it has no capability for
    for key in ("@all", "worker"):
        for as_self in (False, True):
            for command in (
                Unregister(agent_id="@all"),
                Unregister(agent_id="worker"),
                CancelTasks(task_ids=ids),
                CancelTask(task_id=ids[0]),
                ConsumeQueues(queue_keys=["job.secret"]),
            ):
                await scene.attacker.publish(control, key, command, as_self=as_self)

    # Then worker refuses each one, and runs on: its tasks complete with their results
    async def all_refused() -> bool:
        return agent.control_gate.refused["not_orchestrator"] >= 20

    await wait_until(all_refused, WAIT)
    assert agent.held_attempts == {(t, 1) for t in ids}
    assert "job.secret" not in agent.consuming
    scene.gate.set()
    for task_id in ids:
        await _ends_real(scene, task_id)
    await _agents_untouched(scene)


async def test_a_paused_leaders_commands_after_a_takeover_stop_nothing(scene: Scene) -> None:
    # Given three tasks running on worker, and worker has heard a newer leader
    # of the same store (the orchestrator's user, the next epoch)
    ids = await _running(scene, 3, required_capabilities=["work"])
    (agent,) = scene.harness.agents
    old = scene.orchestrator.bus
    assert old.leader is not None
    lineage, epoch = old.leader
    newer = await scene.harness.connected_bus()  # the orchestrator's user too
    newer.leader = (lineage, epoch + 1)
    await newer.publish_control(Reannounce(), agent_id="worker")

    async def heard_newer() -> bool:
        return agent.control_gate.leader == (lineage, epoch + 1)

    await wait_until(heard_newer, WAIT)

    # When the old leader, paused through the takeover, wakes and tells worker to
    # drop its tasks and to stop
    await old.publish_control(CancelTasks(task_ids=ids), agent_id="worker")
    await old.publish_control(Unregister(agent_id="worker"), agent_id="worker")

    # Then worker refuses both (the epoch is older) and runs on
    async def refused() -> bool:
        return agent.control_gate.refused["stale_leader"] >= 2

    await wait_until(refused, WAIT)
    assert agent.held_attempts == {(t, 1) for t in ids}
    for task_id in ids:
        await _ends_real(scene, task_id)
    await _agents_untouched(scene)


async def test_an_agent_consumes_only_queues_it_can_run_even_when_the_orchestrator_says(
    scene: Scene,
) -> None:
    # Given worker (capability work, handler for any type)
    (agent,) = scene.harness.agents

    # When the orchestrator's own user tells it to consume a queue needing "secret"
    await scene.orchestrator.bus.publish_control(
        ConsumeQueues(queue_keys=["job.secret", "job.work"]), agent_id="worker"
    )

    # Then it consumes the one it can run, and refuses the other
    async def consumed() -> bool:
        return "job.work" in agent.consuming

    await wait_until(consumed, WAIT)
    assert agent.control_gate.refused["cannot_run"] == 1
    assert "job.secret" not in agent.consuming


# --------------------------------------------------------------- announcements


async def test_bad_announcements_register_nobody(scene: Scene) -> None:
    before = scene.refused()
    # When a stranger announces agents register_agent would refuse
    for agent_id, capabilities in [
        ("a" * 300, ["work"]),
        ("evil#agent.*", ["work"]),
        ("evil", ["a.#"]),
        ("evil2", ["work", ""]),
    ]:
        await scene.attacker.event(
            AgentAnnounced(agent_id=agent_id, capabilities=capabilities, max_concurrent_tasks=1),
            as_self=True,
        )

    # Then none is registered; each is refused naming the field
    await scene.wait_refused(4, before)
    assert [a.agent_id for a in await scene.orchestrator.get_agents()] == ["worker"]
    refused = scene.refused()
    assert refused["invalid_agent_id"] == 2 and refused["invalid_announcement"] == 2


async def test_a_reannounce_with_an_extra_capability_widens_nothing(scene: Scene) -> None:
    # Given a task needing "secret", which worker lacks
    task_id = await scene.submit(required_capabilities=["secret"])
    before = scene.refused()

    # When a stranger re-announces worker with "secret", and says it left
    await scene.attacker.both_ways(
        AgentAnnounced(
            agent_id="worker",
            capabilities=["work", "secret"],
            max_concurrent_tasks=50,
            task_types=["*"],
        )
    )
    await scene.attacker.both_ways(AgentHeartbeat(agent_id="worker", running=0))
    await scene.attacker.both_ways(AgentLeft(agent_id="worker"))

    # Then worker is as it registered, consumes nothing new, and the task waits
    await scene.wait_refused(6, before)
    (agent,) = await scene.orchestrator.get_agents()
    assert (agent.capabilities, agent.max_concurrent_tasks) == (["work"], 5)
    (real,) = scene.harness.agents
    assert not any("secret" in key for key in real.consuming)
    assert (await scene.status(task_id))["status"] == "pending"


# --------------------------------------------------------------- floods


FLOOD = int(os.environ.get("HOSTILE_FLOOD", "10000"))
"""Heartbeats in the flood (HOSTILE_FLOOD=100000 for the figure the README quotes)."""
FLOOD_IDS = 100

FLOODER = """
import asyncio, json, sys, time
import aio_pika

async def main(url, user, exchange, count, ids, kind):
    # ids: how many ghost ids to take turns with, or the one agent id to flood
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        target = await channel.get_exchange(exchange, ensure=False)
        started = time.monotonic()
        for n in range(count):
            fields = {"running": 0} if kind == "agent.heartbeat" else {
                "task_id": "t", "attempt": 1, "progress": 0.5}
            agent_id = f"ghost-{n % int(ids)}" if ids.isdigit() else ids
            body = json.dumps({"v": 1, "kind": kind, "agent_id": agent_id, **fields}).encode()
            await target.publish(aio_pika.Message(body, user_id=user),
                                 routing_key=f"{kind}.{agent_id}")
        print(f"{time.monotonic() - started:.3f}")

asyncio.run(main(*sys.argv[1:4], int(sys.argv[4]), sys.argv[5], sys.argv[6]))
"""


async def test_a_heartbeat_flood_removes_no_agent_and_delays_no_result(scene: Scene) -> None:
    # Given a task running on worker (the orchestrator removes an agent silent
    # for 2 s), and a listener on the commands sent to the ids the flood uses,
    # to count the orchestrator's answers
    (task_id,) = await _running(scene, required_capabilities=["work"])
    answers = 0
    connection = await aio_pika.connect(scene.harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for n in range(FLOOD_IDS):
            await queue.bind(scene.attacker.topology.control_exchange, f"ghost-{n}")

        async def count(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal answers
            answers += 1
            await message.ack()

        await queue.consume(count)

        # When a stranger's process floods heartbeats of unknown ids, under its own
        # user, without confirms (as fast as it can)
        attacker = scene.attacker
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOODER,
            attacker.url,
            attacker.user,
            attacker.topology.events_exchange,
            str(FLOOD),
            str(FLOOD_IDS),
            "agent.heartbeat",
            stdout=asyncio.subprocess.PIPE,
        )
        started = time.monotonic()

        # and the real task's result is sent while the flood is on
        async def flooding() -> bool:
            return scene.refused().get("unknown_agent", 0) >= min(2000, FLOOD // 2)

        await wait_until(flooding, 120)
        behind = _waiting(scene, scene.attacker.topology.orchestrator_heartbeats_queue)
        scene.gate.set()
        released = time.monotonic()
        status = await scene.orchestrator.wait_for_task(task_id, 120)
        result_delay = time.monotonic() - released
        out, _ = await flooder.communicate()
        published = float(out.decode().strip())

        # (the broker drops what its bounded queue cannot keep: wait until no
        # refusal came for a second)
        last = -1
        while (now := scene.refused().get("unknown_agent", 0)) != last:
            last = now
            await asyncio.sleep(1.0)
        drained_after = time.monotonic() - started - 1.0
        assert answers <= FLOOD_IDS * (2 + int(drained_after // 5))

    print(
        f"\nheartbeat flood: {FLOOD} heartbeats of {FLOOD_IDS} unknown ids, published in"
        f" {published:.1f}s ({FLOOD / published:.0f}/s); {last} refused (the rest dropped"
        f" by the bounded queue) by {drained_after:.1f}s after it began; the real result, sent with"
        f" {behind} heartbeats waiting beside it, was recorded {result_delay:.2f}s later;"
        f" Reannounce answers: {answers}"
    )
    # Then the task completed with its real result, worker is still registered,
    # and the orchestrator answered at most once per id per 5 s
    assert (status["status"], status["result"]) == ("completed", {"real": task_id})
    assert [a.agent_id for a in await scene.orchestrator.get_agents()] == ["worker"]
    await _agents_untouched(scene)


async def test_a_backlog_of_bogus_task_events_delays_no_registration_or_result(
    prefix: str,
) -> None:
    """The worst case of a flood of unknown ids: bogus task events published
    while the orchestrator was down (or faster than it reads), a real agent's
    announcement after them. Task events go to the queue of the agent whose id
    they carry, which exists only for registered agents: the broker drops
    these, and the real agent is registered, and its task's result recorded,
    within about a second of the orchestrator's start."""
    url = require_broker()
    settings = BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)
    harness = Harness("rabbitmq", settings)
    try:
        # Given FLOOD bogus task events of unknown agents, then a real agent's
        # announcement, published while no orchestrator ran
        bus = await harness.connected_bus()
        user = bus.user or "guest"
        published_at = time.monotonic()
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, url, user, bus.topology.events_exchange,
            str(FLOOD), str(FLOOD_IDS), "task.progress",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await flooder.communicate()
        published = time.monotonic() - published_at
        agent = await harness.start_agent("late", ["work"], 1, wait_registered=False)
        assert agent is not None

        # When the orchestrator starts, and a task is submitted once the agent is registered
        # (liveness is not what this is about: a CI machine's stall of a few seconds
        # must not have the agent removed, and told to stop, under FAST's 2 s)
        started = time.monotonic()
        orchestrator = await harness.start_orchestrator(
            FAST.model_copy(update={"heartbeat_timeout": WAIT})
        )

        async def registered() -> bool:
            return "late" in {a.agent_id for a in await orchestrator.get_agents()}

        await wait_until(registered, WAIT)
        registered_after = time.monotonic() - started
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={"n": 1},
            required_capabilities=["work"],
        )  # fmt: skip
        try:
            status = await orchestrator.wait_for_task(task_id, WAIT)
        except TimeoutError:
            status = await orchestrator.get_task_status(task_id)
            raise AssertionError(
                f"no result within {WAIT}s: task {status}; agents"
                f" {await orchestrator.get_agents()}; the agent serving: {agent.serving},"
                f" consuming {sorted(agent.consuming)}; refused"
                f" {dict(orchestrator.registry.refusals.counts)}"
            ) from None
        done_after = time.monotonic() - started
        refused = dict(orchestrator.registry.refusals.counts)
        print(
            f"\nbacklog: {FLOOD} bogus task events of {FLOOD_IDS} unknown ids published"
            f" ({published:.1f}s) before the orchestrator started, a real announcement"
            f" after them; the agent was registered {registered_after:.2f}s after the"
            f" orchestrator's start and a task submitted then completed {done_after:.2f}s"
            f" after it; refused by then: {refused}"
        )
        # Then the result is recorded (well within the bound), and the bogus events
        # never reached the orchestrator (the broker dropped them: no queue of theirs)
        assert (status["status"], status["retry_count"]) == ("completed", 0)
        assert done_after < WAIT
        assert refused.get("unknown_agent", 0) < FLOOD // 10
    finally:
        await harness.close()


async def test_a_flood_of_a_registered_agents_id_delays_no_other_agents_result(
    prefix: str,
) -> None:
    """A flood of bogus task events under a registered agent's id, published
    while the orchestrator is down (the worst case: all of it waits), fills
    that agent's own bounded queue (reject-publish past ``AGENT_EVENTS_KEEP``).
    Another agent's result goes through its own queue as soon as the
    orchestrator is back; the flooded agent's own result, refused by the full
    queue, is published again until there is room, and recorded too."""
    url = require_broker()
    settings = BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)
    harness = Harness("rabbitmq", settings)
    store = MemoryStore()
    gate = asyncio.Event()

    async def held(ctx: TaskContext) -> dict[str, Any]:
        await gate.wait()
        return {"held": ctx.task_id}

    async def quick(ctx: TaskContext) -> dict[str, Any]:
        return {"quick": ctx.task_id}

    try:
        # Given agents worker (a task running on it, held) and other, registered
        orchestrator = await harness.start_orchestrator(FAST, store=store)
        await harness.start_agent("worker", ["work"], 2, held)
        await harness.start_agent("other", ["other"], 2, quick)
        held_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={}, required_capabilities=["work"]
        )
        await wait_until(lambda: running_on(orchestrator, held_id, "worker"), WAIT)

        # When the orchestrator is down, worker's id is flooded with FLOOD bogus
        # task events (as fast as a client can, no confirms), and worker's task
        # ends meanwhile (its result refused while worker's queue is full)
        await orchestrator.stop()
        bus = await harness.connected_bus()
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, url, bus.user or "guest",
            bus.topology.events_exchange, str(FLOOD), "worker", "task.progress",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await flooder.communicate()
        published = float(out.decode().strip())
        behind = await _depth(url, bus.topology.agent_events_queue("worker"))
        gate.set()

        # and the orchestrator starts again on its store, and another agent's task
        # is submitted at once
        started = time.monotonic()
        orchestrator = await harness.start_orchestrator(FAST, store=store)
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={}, required_capabilities=["other"]
        )
        status = await orchestrator.wait_for_task(task_id, WAIT)
        result_after = time.monotonic() - started
        waiting_then = await _depth(url, bus.topology.agent_events_queue("worker"))
        held_status = await orchestrator.wait_for_task(held_id, WAIT)
        held_after = time.monotonic() - started
        agents = {a.agent_id for a in await orchestrator.get_agents()}
        print(
            f"\nflood of a registered id: {FLOOD} bogus task events of agent worker published"
            f" in {published:.1f}s while the orchestrator was down, {behind} kept by its"
            f" bounded queue; after the orchestrator's start another agent's task was"
            f" recorded in {result_after:.2f}s, with {waiting_then} of the bogus events still"
            f" waiting then; worker's own result (refused by its full queue, published again)"
            f" was recorded {held_after:.2f}s after the start"
        )
        # Then the other agent's result came ahead of the backlog still waiting
        assert 0 < behind <= AGENT_EVENTS_KEEP
        assert (status["status"], status["result"]) == ("completed", {"quick": task_id})
        assert result_after < WAIT
        assert waiting_then > 0
        # and worker's own result was recorded, no retry spent, and nobody was removed
        assert (held_status["status"], held_status["result"]) == ("completed", {"held": held_id})
        assert held_status["retry_count"] == 0
        assert agents == {"worker", "other"}
        assert all(agent.serving for agent in harness.agents)
    finally:
        await harness.close()


async def test_a_heartbeat_backlog_delays_no_result(prefix: str) -> None:
    """Heartbeats have a bounded queue of their own (drop-head): a backlog of
    them, published while the orchestrator was down or faster than it reads,
    waits beside the results, not ahead of them, and removes no agent."""
    url = require_broker()
    settings = BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)
    harness = Harness("rabbitmq", settings)
    backlog = 2 * FLOOD
    try:
        # Given 2 x FLOOD bogus heartbeats of unknown ids published while no
        # orchestrator ran (the queue keeps the newest it may), and a real agent
        bus = await harness.connected_bus()
        user = bus.user or "guest"
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, url, user, bus.topology.events_exchange,
            str(backlog), str(FLOOD_IDS), "agent.heartbeat",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await flooder.communicate()
        kept = await _depth(url, bus.topology.orchestrator_heartbeats_queue)
        assert 0 < kept <= HEARTBEATS_KEEP
        await harness.start_agent("late", ["work"], 1, wait_registered=False)

        # When the orchestrator starts and a task is submitted at once
        started = time.monotonic()
        orchestrator = await harness.start_orchestrator(FAST)
        refused = orchestrator.registry.refusals.counts

        async def registered() -> bool:
            return "late" in {a.agent_id for a in await orchestrator.get_agents()}

        await wait_until(registered, 60)
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={"n": 1},
            required_capabilities=["work"],
        )  # fmt: skip
        status = await orchestrator.wait_for_task(task_id, 60)
        done_after = time.monotonic() - started
        refused_by_then = refused["unknown_agent"]

        async def drained() -> bool:
            return refused["unknown_agent"] >= kept

        await wait_until(drained, 300)
        drained_after = time.monotonic() - started
        print(
            f"\nheartbeat backlog: {backlog} bogus heartbeats published, {kept} kept by the"
            f" bounded queue; a task submitted after the orchestrator started completed"
            f" {done_after:.2f}s after its start, with {refused_by_then} of them refused by"
            f" then; the backlog drained {drained_after:.1f}s after the start"
            f" ({kept / drained_after:.0f} refused/s)"
        )
        # Then the result was recorded while most of the backlog still waited,
        # no retry was spent, and the real agent is still registered
        assert (status["status"], status["retry_count"]) == ("completed", 0)
        assert refused_by_then < kept
        assert "late" in {a.agent_id for a in await orchestrator.get_agents()}
    finally:
        await harness.close()


async def _depth(url: str, queue: str) -> int:
    """Messages waiting in ``queue`` (a passive declare)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


def _waiting(scene: Scene, name: str) -> int | str:
    """How many messages wait in queue ``name`` (management API), or '?'."""
    try:
        api = management_api(scene.harness.settings.broker_url)
        status, body = api.call("GET", f"/api/queues/%2F/{name}")
        return int(body["messages"]) if status == 200 else "?"
    except Exception:
        return "?"


# --------------------------------------------------------------- the same rules in memory


async def test_the_in_process_bus_applies_the_same_rules_to_another_user(prefix: str) -> None:
    """(No broker needed: MemoryBus.as_user logs a second party in as another user.)"""
    harness = Harness("memory", BusSettings(prefix=prefix))
    try:
        orchestrator = await harness.start_orchestrator(FAST)
        await harness.start_agent("worker", ["work"], 2)
        bus = harness.new_bus()
        stranger = bus.as_user("stranger")  # type: ignore[attr-defined]
        await stranger.connect()
        task_id = await orchestrator.submit_task(
            name="t", description="", task_type="job", payload={}, required_capabilities=["rare"]
        )
        for agent_id in ("worker", "evil"):
            await stranger.publish_event(
                TaskFinished(task_id=task_id, attempt=1, agent_id=agent_id, outcome="completed")
            )
        await stranger.publish_control(Unregister(agent_id="worker"), agent_id="worker")
        await bus.join()  # type: ignore[attr-defined]
        counts = orchestrator.registry.refusals.counts
        # (evil's reaches no queue: nobody registered it)
        assert (counts["wrong_user"], counts.get("unknown_agent", 0)) == (1, 0)
        assert (await orchestrator.get_task_status(task_id))["status"] == "pending"
        (agent,) = harness.agents
        assert agent.control_gate.refused["not_orchestrator"] == 1
        assert agent.serving
        await stranger.close()
    finally:
        await harness.close()


def test_refusals_log_once_per_interval_and_count_every_one(caplog) -> None:
    from orchestrator.refusals import Refusals

    now = [0.0]
    refusals = Refusals(clock=lambda: now[0], interval=10)
    with caplog.at_level("WARNING", logger="orchestrator.refusals"):
        for _ in range(1000):
            refusals.refuse("unknown_agent", "heartbeat of agent x")
        now[0] = 11
        refusals.refuse("unknown_agent", "heartbeat of agent y")
    assert refusals.counts["unknown_agent"] == 1001
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "999 more" in lines[1]
    assert json.dumps(refusals.snapshot())


async def test_a_user_binds_a_bounded_number_of_agent_ids(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an orchestrator that lets one user bind 3 agent ids
    monkeypatch.setattr("orchestrator.registry.MAX_AGENTS_PER_USER", 3)
    harness = Harness("memory", BusSettings(prefix=prefix))
    try:
        orchestrator = await harness.start_orchestrator(FAST)
        stranger = harness.new_bus().as_user("stranger")  # type: ignore[attr-defined]
        await stranger.connect()

        # When that user announces 5 valid agents
        for n in range(5):
            await stranger.publish_event(
                AgentAnnounced(agent_id=f"a{n}", capabilities=[], max_concurrent_tasks=1)
            )
        await harness.new_bus().join()  # type: ignore[attr-defined]

        # Then 3 are registered, and the others refused
        assert sorted(a.agent_id for a in await orchestrator.get_agents()) == ["a0", "a1", "a2"]
        assert orchestrator.registry.refusals.counts["too_many_agents"] == 2
        await stranger.close()
    finally:
        await harness.close()


async def test_an_agent_ids_user_is_kept_across_a_restart(prefix: str, tmp_path) -> None:
    from orchestrator import SQLiteStore

    # Given an agent announced by its user to an orchestrator with a durable store
    bus = MemoryBus(settings=BusSettings(prefix=prefix), user="orch")
    await bus.connect()
    agent_bus = bus.as_user("agent-user")
    stranger = bus.as_user("stranger")
    await agent_bus.connect()
    await stranger.connect()
    path = tmp_path / "state.db"
    first = TaskOrchestrator(bus, settings=FAST, store=SQLiteStore(path))
    await first.start()
    await agent_bus.publish_event(
        AgentAnnounced(agent_id="worker", capabilities=[], max_concurrent_tasks=1)
    )
    await bus.join()
    await first.stop()

    # When the orchestrator restarts on that store and a stranger speaks for the agent
    second = TaskOrchestrator(bus, settings=FAST, store=SQLiteStore(path))
    await second.start()
    try:
        await stranger.publish_event(
            AgentAnnounced(agent_id="worker", capabilities=["extra"], max_concurrent_tasks=9)
        )
        await bus.join()

        # Then it is refused: the id is still its first user's
        assert second.registry.refusals.counts["wrong_user"] == 1
        (agent,) = await second.get_agents()
        assert (agent.capabilities, agent.max_concurrent_tasks) == ([], 1)
    finally:
        await second.stop()
        await bus.close()


def test_silence_proves_nothing_during_a_flood_of_refusals() -> None:
    from orchestrator.refusals import FLOOD_THRESHOLD, FLOOD_WINDOW, Refusals

    now = [1000.0]
    refusals = Refusals(clock=lambda: now[0])
    for _ in range(FLOOD_THRESHOLD - 1):
        refusals.refuse("unknown_agent", "x")
    assert not refusals.flooded()
    refusals.refuse("unknown_agent", "x")
    assert refusals.flooded()
    now[0] += FLOOD_WINDOW + 1.5
    assert not refusals.flooded()
