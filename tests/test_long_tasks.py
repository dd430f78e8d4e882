"""Tasks longer than RabbitMQ's consumer_timeout: acknowledged once started.

The agent keeps their place in its prefetch, so its limit holds; the
orchestrator, not the broker, brings them back when their agent goes away.
"""

from __future__ import annotations

import asyncio

import pytest

from agents import Agent, TaskContext
from tests.brokers import RabbitMQNode
from tests.harness import Harness, wait_until

LONG = 0.2
"""long_task_after of these tests' agents: every task with a timeout over it is long."""


async def start_long_agent(
    harness: Harness, agent_id: str, max_tasks: int, handler, long_after: float | None = LONG
) -> Agent:
    agent = Agent(agent_id, [], max_tasks, heartbeat_interval=0.3, long_task_after=long_after)
    agent.add_handler("*", handler)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    await harness.wait_agents(agent_id)
    return agent


async def test_long_tasks_keep_the_agent_within_its_limit(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()

    async def work(ctx: TaskContext) -> dict:
        await asyncio.sleep(0.3)
        return {"i": ctx.payload["i"]}

    agent = await start_long_agent(harness, "long", 2, work)
    ids = [await orchestrator.submit_task("t", "", "j", {"i": i}, timeout=60) for i in range(6)]
    statuses = [await orchestrator.wait_for_task(t, timeout=30) for t in ids]
    assert [s["result"] for s in statuses] == [{"i": i} for i in range(6)]
    assert agent.counters.max_running == 2  # acked early, yet never a third at once
    assert agent.counters.received == 6


async def test_a_long_task_of_a_vanished_agent_runs_again_elsewhere(harness: Harness) -> None:
    # Given a long task running on one agent, acknowledged to the broker
    orchestrator = await harness.start_orchestrator()
    started = asyncio.Event()
    runs: list[tuple[str, int]] = []

    async def work(ctx: TaskContext) -> dict:
        runs.append((ctx.agent_id, ctx.attempt))
        if ctx.agent_id == "doomed":
            started.set()
            await asyncio.sleep(3600)
        return {"by": ctx.agent_id}

    doomed = await start_long_agent(harness, "doomed", 1, work)
    task_id = await orchestrator.submit_task("t", "", "j", {}, timeout=60)
    await asyncio.wait_for(started.wait(), 15)

    # When that agent vanishes without a word and another comes
    await doomed.kill()
    await start_long_agent(harness, "survivor", 1, work)

    # Then the orchestrator, having missed its heartbeats, publishes the task again
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert status["status"] == "completed" and status["result"] == {"by": "survivor"}
    assert runs == [("doomed", 1), ("survivor", 2)]


async def test_a_long_task_stopped_by_a_graceful_stop_runs_again_elsewhere(
    harness: Harness,
) -> None:
    orchestrator = await harness.start_orchestrator()
    started = asyncio.Event()

    async def work(ctx: TaskContext) -> dict:
        if ctx.agent_id == "leaving":
            started.set()
            await asyncio.sleep(3600)
        return {"by": ctx.agent_id}

    leaving = await start_long_agent(harness, "leaving", 1, work)
    task_id = await orchestrator.submit_task("t", "", "j", {}, timeout=60)
    await asyncio.wait_for(started.wait(), 15)

    # When the agent stops before the task ends (it cannot give it back to a queue)
    await leaving.stop(drain_timeout=0.1)
    await start_long_agent(harness, "staying", 1, work)

    # Then its goodbye names the task and the orchestrator publishes it again at once
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert status["status"] == "completed" and status["result"] == {"by": "staying"}


# ------------------------------------------------------- the broker's own timeout


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.fault
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_a_task_longer_than_consumer_timeout_runs_once(
    harness: Harness, private_rabbitmq: RabbitMQNode
) -> None:
    # Given a broker (a private node: the setting is node-wide) that closes a
    # channel holding a delivery unacked for 1.5 s; the fixture puts it back
    assert harness.settings.broker_url == private_rabbitmq.url
    private_rabbitmq.set_env("consumer_timeout", "1500")
    private_rabbitmq.set_env("channel_tick_interval", "250")
    orchestrator = await harness.start_orchestrator()
    runs: list[int] = []

    async def work(ctx: TaskContext) -> dict:
        runs.append(ctx.attempt)
        await asyncio.sleep(4)
        return {"done": True}

    await start_long_agent(harness, "patient", 2, work, long_after=1.0)

    # When a task runs for longer than that
    task_id = await orchestrator.submit_task("t", "", "j", {}, timeout=30)
    status = await orchestrator.wait_for_task(task_id, timeout=30)

    # Then it completes once, never taken back and handed out again by the broker
    assert status["status"] == "completed" and status["result"] == {"done": True}
    assert runs == [1]

    async def still_registered() -> bool:
        return [a.agent_id for a in await orchestrator.get_agents()] == ["patient"]

    await wait_until(still_registered, timeout=5)
