"""Placement: priority order, capacity limits, spread and capability matching."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter

from agents import TaskContext
from broker import ConsumeQueues
from orchestrator import TaskOrchestrator, TaskPriority, TaskStatus
from tests.harness import Harness, wait_all, wait_until


async def _submit(orch: TaskOrchestrator, n: int, **kwargs) -> list[str]:
    kwargs.setdefault("name", "job")
    kwargs.setdefault("description", "")
    kwargs.setdefault("task_type", "job")
    payload = kwargs.pop("payload", {})
    return [await orch.submit_task(payload={**payload, "i": i}, **kwargs) for i in range(n)]


async def test_critical_task_overtakes_waiting_low_ones(harness: Harness) -> None:
    # Given one agent whose two slots are both taken by blocked tasks
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()
    started: list[str] = []

    async def handler(ctx: TaskContext) -> dict:
        started.append(ctx.name)
        if ctx.payload.get("block"):
            await gate.wait()
        return {}

    await harness.start_agent("worker", [], 2, handler)
    blockers = await _submit(orchestrator, 2, name="blocker", payload={"block": True})
    await wait_until(lambda: _all_status(orchestrator, blockers, TaskStatus.RUNNING))

    # When 50 LOW tasks and then one CRITICAL task are submitted, and the slots free up
    low = await _submit(orchestrator, 50, name="low", priority=TaskPriority.LOW)
    critical = await orchestrator.submit_task(
        name="critical", description="", task_type="job", payload={}, priority="critical"
    )
    gate.set()
    await wait_all(orchestrator, [*blockers, *low, critical])

    # Then the CRITICAL task started before every LOW task that was still waiting
    assert started[:2] == ["blocker", "blocker"]
    assert started[2] == "critical", started[:5]
    assert started.count("low") == 50


async def _all_status(orch: TaskOrchestrator, ids: list[str], status: TaskStatus) -> bool:
    statuses = [await orch.get_task_status(t) for t in ids]
    return all(s is not None and s["status"] == status.value for s in statuses)


async def test_no_agent_ever_exceeds_its_limit(harness: Harness) -> None:
    # Given three agents with limits 2, 3 and 4, counting their concurrency inside;
    # their first tasks hold on until every agent has been full at once, so that
    # each is seen to be filled to its limit (and no further), whatever the load
    orchestrator = await harness.start_orchestrator()
    limits = {"small": 2, "medium": 3, "large": 4}
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    all_full = asyncio.Event()

    def make_handler(agent_id: str):
        async def handler(ctx: TaskContext) -> dict:
            running[agent_id] += 1
            peak[agent_id] = max(peak[agent_id], running[agent_id])
            if all(peak[a] >= limit for a, limit in limits.items()):
                all_full.set()
            try:
                if not all_full.is_set():
                    # Bounded: were an agent never filled, the peaks below say so.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_full.wait(), 60)
                await asyncio.sleep(random.uniform(0, 0.004))
            finally:
                running[agent_id] -= 1
            return {}

        return handler

    agents = {
        agent_id: await harness.start_agent(agent_id, ["work"], limit, make_handler(agent_id))
        for agent_id, limit in limits.items()
    }

    # When 500 tasks are submitted at once
    ids = await asyncio.gather(
        *(
            orchestrator.submit_task(
                name=f"t{i}",
                description="",
                task_type="job",
                payload={},
                required_capabilities=["work"],
            )
            for i in range(500)
        )
    )
    statuses = await wait_all(orchestrator, list(ids), timeout=120)

    # Then all complete, and each agent ran exactly its limit at its peak, never more
    assert Counter(s["status"] for s in statuses) == {"completed": 500}
    assert dict(peak) == limits
    for agent_id, limit in limits.items():
        assert agents[agent_id].counters.max_running == limit
    assert sum(a.counters.completed for a in agents.values()) == 500


async def test_equal_agents_share_equal_tasks(harness: Harness) -> None:
    # Given three equal agents
    orchestrator = await harness.start_orchestrator()

    async def handler(ctx: TaskContext) -> dict:
        await asyncio.sleep(0.003)
        return {}

    agents = [await harness.start_agent(f"equal_{i}", ["work"], 4, handler) for i in range(3)]
    # (one task first, so that the burst below does not race the agents joining its queue:
    # on a loaded machine the first to join could take most of it before the others arrived)
    warm_up = await orchestrator.submit_task(
        name="warm", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    await wait_all(orchestrator, [warm_up], timeout=60)

    async def all_consume() -> bool:
        return all(agent.consuming for agent in agents)

    await wait_until(all_consume, timeout=30)

    # When 300 equal tasks run
    ids = await asyncio.gather(
        *(
            orchestrator.submit_task(
                name=f"t{i}",
                description="",
                task_type="job",
                payload={},
                required_capabilities=["work"],
            )
            for i in range(300)
        )
    )
    statuses = await wait_all(orchestrator, list(ids), timeout=120)

    # Then each ran between 20% and 47% of them
    by_agent = Counter(s["assigned_agent"] for s in statuses)
    assert sum(by_agent.values()) == 300
    for agent in agents:
        assert 60 <= by_agent[agent.agent_id] <= 141, by_agent


async def test_task_needing_two_capabilities_runs_only_where_both_are(harness: Harness) -> None:
    # Given agents with one, the other, and both capabilities
    orchestrator = await harness.start_orchestrator()
    only_x = await harness.start_agent("only_x", ["x"], 3)
    only_y = await harness.start_agent("only_y", ["y"], 3)
    both = await harness.start_agent("both", ["x", "y", "z"], 3)

    # When tasks need x and y, and others need just x
    need_both = await _submit(orchestrator, 20, required_capabilities=["y", "x"])
    need_x = await _submit(orchestrator, 20, required_capabilities=["x"])
    anything = await _submit(orchestrator, 9)

    # Then the x+y tasks ran only on the agent that has both
    statuses = await wait_all(orchestrator, [*need_both, *need_x, *anything])
    assert all(s["status"] == "completed" for s in statuses)
    assert {s["assigned_agent"] for s in statuses[:20]} == {"both"}
    assert {s["assigned_agent"] for s in statuses[20:40]} <= {"only_x", "both"}
    assert only_y.counters.received <= 9  # only tasks that need nothing
    assert only_x.counters.received + both.counters.received >= 40


async def test_a_burst_of_a_new_task_type_tells_each_agent_of_its_queue_once(
    harness: Harness,
) -> None:
    # Given an orchestrator and two agents whose handlers hold on (no outcome moves
    # their priorities meanwhile), and a count of the queue commands it sends them
    orchestrator = await harness.start_orchestrator()
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> dict:
        await release.wait()
        return {}

    for agent_id in ("a", "b"):
        await harness.start_agent(agent_id, ["work"], 5, held)
    bus = orchestrator.bus
    told: Counter[str] = Counter()
    publish_control = bus.publish_control

    async def counting_control(command, *, agent_id: str) -> None:
        if isinstance(command, ConsumeQueues):
            told[agent_id] += 1
        await publish_control(command, agent_id=agent_id)

    bus.publish_control = counting_control  # type: ignore[method-assign]

    # When 500 tasks of a type nobody submitted before are submitted at once
    ids = await asyncio.gather(
        *(
            orchestrator.submit_task(
                name=f"t{i}",
                description="",
                task_type="burst",
                payload={},
                required_capabilities=["work"],
            )
            for i in range(500)
        )
    )

    # Then every submit was accepted, each agent was told of the new queue once
    # for all of them (it was 500 times each), and every task completes
    assert len(set(ids)) == 500
    assert told == {"a": 1, "b": 1}, told
    release.set()
    await wait_all(orchestrator, ids)
