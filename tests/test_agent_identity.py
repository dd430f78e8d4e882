"""One agent id is one live agent; what the orchestrator registers is what it does.

A second agent with an id already live is refused with an error naming the
id (its control queue is exclusive to the first); a ``ConsumeQueues`` with a
``max_concurrent_tasks`` sets the agent's limit and prefetch; an
``Unregister`` for another id is ignored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from agents import Agent, AgentIdInUse, TaskContext
from broker import AgentAnnounced, Reannounce, Unregister
from tests.agent_desk import Desk
from tests.harness import Harness, wait_until

WAIT = 60


async def _agent(
    harness: Harness, handler: Any, agent_id: str = "worker", max_concurrent_tasks: int = 1
) -> Agent:
    agent = Agent(agent_id, ["work"], max_concurrent_tasks, heartbeat_interval=0.3)
    agent.add_handler("*", handler)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    return agent


def _read(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


async def _echo(ctx: TaskContext) -> dict:
    return {"agent": ctx.agent_id}


# ---------------------------------------------------------------- one id, one agent


async def test_a_second_agent_with_a_live_id_is_refused(harness: Harness) -> None:
    # Given a live agent "worker"
    desk = await Desk(harness).open()
    first = await _agent(harness, _echo)
    await desk.consume("worker")

    # When a second agent with that id starts
    second = Agent("worker", ["work"], 1)
    second.add_handler("*", _echo)
    with pytest.raises(AgentIdInUse) as refused:
        await second.start(harness.new_bus())

    # Then it is refused with an error naming the id
    assert "'worker'" in str(refused.value) and "already live" in str(refused.value)
    assert isinstance(refused.value, ValueError)

    # And the first goes on working, and hears its commands alone
    message = await desk.publish(desk.message())
    [finished] = await desk.wait_for(lambda: desk.finished(message.task_id))
    assert finished.outcome == "completed" and finished.agent_id == "worker"
    assert first.counters.completed == 1 and second.counters.received == 0

    # And once the first has stopped, the id can be used again
    await first.stop(drain_timeout=1)
    third = await _agent(harness, _echo)
    await desk.consume("worker")
    message = await desk.publish(desk.message())
    await desk.wait_for(lambda: desk.finished(message.task_id))
    assert third.counters.completed == 1


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_a_second_agent_process_with_a_live_id_exits_with_a_clear_error(
    harness: Harness,
) -> None:
    # Given an agent process "twin"
    orchestrator = await harness.start_orchestrator()
    first = harness.spawn_agent("twin", ["work"])
    await harness.wait_agents("twin", timeout=WAIT)

    # When a second process starts with the same id
    second = harness.spawn_agent("twin", ["work"])

    # Then it exits at once with an error naming the id, and the first runs on
    assert await asyncio.to_thread(second.wait, WAIT) == 1  # bad input, as agent run says
    log = _read(harness.logs[1].name)
    assert "agent id 'twin' is already live" in log, log
    assert first.poll() is None
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"]["pid"] == first.pid
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["twin"]
    assert first.poll() is None


# ---------------------------------------------------------------- the registered limit


async def test_the_registered_limit_is_the_agents_limit(harness: Harness) -> None:
    # Given an agent started with a limit of 1, whose tasks run until released,
    # and four tasks in its queue
    desk = await Desk(harness).open()
    gates: dict[str, asyncio.Event] = {}

    async def handler(ctx: TaskContext) -> dict:
        await gates.setdefault(ctx.task_id, asyncio.Event()).wait()
        return {}

    def release(task_id: str) -> None:
        gates.setdefault(task_id, asyncio.Event()).set()

    agent = await _agent(harness, handler, max_concurrent_tasks=1)
    messages = [await desk.publish(desk.message()) for _ in range(4)]

    # When the orchestrator's ConsumeQueues says its limit is 3
    await desk.consume("worker", max_concurrent_tasks=3)

    # Then three run at once (the broker hands it no fourth)
    await desk.wait_for(lambda: len(desk.started()) == 3)
    assert agent.max_concurrent_tasks == 3
    assert agent.unsettled == 3
    first_three = [e.task_id for e in desk.started()]
    (fourth,) = {m.task_id for m in messages} - set(first_three)

    # When the limit is lowered to 1 while they run, and they end one by one
    await desk.consume("worker", max_concurrent_tasks=1)
    await _fence(desk, "worker")
    for n, task_id in enumerate(first_three, 1):
        release(task_id)
        await desk.wait_for(lambda n=n: len(desk.finished()) == n)

    # Then the fourth started only once none of them ran any more
    await desk.wait_for(lambda: desk.started(fourth))
    release(fourth)
    await desk.wait_for(lambda: len(desk.finished()) == 4)
    order = [(type(e).__name__, e.task_id) for e in desk.events if hasattr(e, "task_id")]
    assert order.index(("TaskStarted", fourth)) > max(
        order.index(("TaskFinished", t)) for t in first_three
    )
    assert agent.counters.max_running == 3


async def _fence(desk: Desk, agent_id: str) -> None:
    """Until the agent has handled every command sent to it so far: it answers
    a ``Reannounce`` (sent after them, and handled in order) by announcing."""
    assert desk.bus is not None
    heard = len(desk.of(AgentAnnounced))
    await desk.bus.publish_control(Reannounce(), agent_id=agent_id)
    await desk.wait_for(lambda: len(desk.of(AgentAnnounced)) > heard)


# ---------------------------------------------------------------- unregistered, or not


async def test_an_unregister_for_another_agent_is_ignored(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an agent "worker"
    caplog.set_level(logging.INFO)
    desk = await Desk(harness).open()
    agent = await _agent(harness, _echo)
    await desk.consume("worker")

    # When an Unregister naming another agent reaches it
    assert desk.bus is not None
    await desk.bus.publish_control(Unregister(agent_id="someone-else"), agent_id="worker")
    await _fence(desk, "worker")

    # Then it goes on working: a task sent after it completes there
    message = await desk.publish(desk.message())
    [finished] = await desk.wait_for(lambda: desk.finished(message.task_id))
    assert finished.outcome == "completed" and finished.agent_id == "worker"
    assert agent.counters.completed == 1
    assert any(
        "ignored an Unregister for agent 'someone-else'" in r.getMessage() for r in caplog.records
    )

    # And an Unregister naming it stops it, as before
    await desk.bus.publish_control(Unregister(agent_id="worker"), agent_id="worker")
    await asyncio.wait_for(agent.wait_stopped(), WAIT)


# ---------------------------------------------------------------- register_agent on a live agent


async def test_register_agent_on_a_live_agent_changes_what_it_runs_and_no_more(
    harness: Harness,
) -> None:
    # Given a live agent with a limit of 1 whose tasks run until released, and
    # three tasks for it
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()
    running: set[str] = set()

    async def handler(ctx: TaskContext) -> dict:
        running.add(ctx.task_id)
        await release.wait()
        return {}

    await harness.start_agent("worker", ["work"], 1, handler)
    submit = {"description": "", "task_type": "job", "payload": {}}
    ids = [
        await orchestrator.submit_task(name=f"t{n}", required_capabilities=["work"], **submit)
        for n in range(3)
    ]

    # When the seed's register_agent gives it a limit of 3
    await orchestrator.register_agent("worker", ["work"], 3)

    # Then it runs all three at once, and the orchestrator says it is full
    async def all_three() -> bool:
        agents = await orchestrator.get_agents()
        return running == set(ids) and agents[0].current_load == 3

    await wait_until(all_three, WAIT)
    (agent,) = await orchestrator.get_agents()
    assert (agent.max_concurrent_tasks, agent.utilization) == (3, 1.0)

    # And a capability it never announced is refused with an error naming the
    # field: the agent would refuse that queue, its tasks would wait for ever
    with pytest.raises(ValueError, match=r"capabilities: .*gpu"):
        await orchestrator.register_agent("worker", ["gpu", "work"], 3)
    (agent,) = await orchestrator.get_agents()
    assert agent.capabilities == ["work"]
    release.set()
    for task_id in ids:
        assert (await orchestrator.wait_for_task(task_id, WAIT))["status"] == "completed"
