"""get_stats agrees with what happened: counts, averages and utilisation."""

from __future__ import annotations

import asyncio
import time

import pytest

from agents import TaskContext
from orchestrator import StatsTracker, Task, TaskOrchestrator, TaskPriority, TaskStatus
from tests.harness import Harness, wait_all, wait_until

SEED_KEYS = {
    "tasks_created",
    "tasks_completed",
    "tasks_failed",
    "avg_completion_time",
    "pending_tasks",
    "running_tasks",
    "completed_tasks",
    "registered_agents",
    "agent_utilization",
    "overall_utilization",
}


async def test_stats_follow_the_tasks(harness: Harness) -> None:
    # Given two agents with two slots each, and a handler that blocks, fails or sleeps
    began = time.time()
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload.get("fail"):
            raise RuntimeError("boom")
        if ctx.payload.get("block"):
            await gate.wait()
        await asyncio.sleep(0.05)
        return {}

    agents = [await harness.start_agent(f"agent_{i}", ["work"], 2, handler) for i in range(2)]
    stats = await orchestrator.get_stats()
    beyond = {"refused_messages", "dead_letters", "role", "orchestrator_id", "leader"}
    assert set(stats) == SEED_KEYS | beyond
    assert stats["registered_agents"] == 2
    assert stats["overall_utilization"] == 0.0

    async def submit(n: int, **payload) -> list[str]:
        return [
            await orchestrator.submit_task(
                name="t",
                description="",
                task_type="job",
                payload=payload,
                required_capabilities=["work"],
                max_retries=0,
            )
            for _ in range(n)
        ]

    # When 4 tasks complete and 2 fail
    done = await submit(4)
    failed = await submit(2, fail=True)
    statuses = await wait_all(orchestrator, done + failed)
    assert [s["status"] for s in statuses] == ["completed"] * 4 + ["failed"] * 2
    assert statuses[-1]["error_message"] == "RuntimeError: boom"

    # And 5 blocking tasks fill the 4 slots, one waiting
    blocked = await submit(5, block=True)

    async def four_running() -> bool:
        s = await orchestrator.get_stats()
        return s["running_tasks"] == 4 and s["pending_tasks"] == 1

    await wait_until(four_running)

    # Then the stats say so, and utilisation is the real load
    stats = await orchestrator.get_stats()
    assert stats["tasks_created"] == 11
    assert stats["tasks_completed"] == stats["completed_tasks"] == 4
    assert stats["tasks_failed"] == 2
    assert stats["agent_utilization"] == {"agent_0": 1.0, "agent_1": 1.0}
    assert stats["overall_utilization"] == 1.0
    assert sum(a.counters.running for a in agents) == 4
    assert stats["avg_completion_time"] == await _mean_run_time(orchestrator, done + failed)
    assert 0.05 <= stats["avg_completion_time"] < 5

    # When they are released, Then everything is completed and the agents idle
    gate.set()
    await wait_all(orchestrator, blocked)
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == 9
    assert stats["pending_tasks"] == stats["running_tasks"] == 0
    assert stats["overall_utilization"] == 0.0
    all_ids = done + failed + blocked
    assert stats["avg_completion_time"] == await _mean_run_time(orchestrator, all_ids)
    assert 0.05 <= stats["avg_completion_time"] <= time.time() - began


async def _mean_run_time(orchestrator: TaskOrchestrator, task_ids: list[str]) -> object:
    """The mean of (completed_at - started_at) over the completed ones among
    ``task_ids``, from the orchestrator's own records (approximately)."""
    tasks = [await orchestrator.store.get_task(t) for t in task_ids]
    completed = [t for t in tasks if t is not None and t.status is TaskStatus.COMPLETED]
    assert completed and all(t.started_at is not None for t in completed)
    runs = [t.completed_at - t.started_at for t in completed]
    return pytest.approx(sum(runs) / len(runs), abs=1e-6)


async def test_partial_utilisation(harness: Harness) -> None:
    # Given an agent with four slots, three of them taken by blocked tasks
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        await gate.wait()
        return {}

    await harness.start_agent("four_slots", [], 4, handler)
    ids = [
        await orchestrator.submit_task(name="t", description="", task_type="j", payload={})
        for _ in range(3)
    ]

    # When the orchestrator has seen all three start
    async def running() -> bool:
        statuses = [await orchestrator.get_task_status(t) for t in ids]
        return all(s["status"] == TaskStatus.RUNNING.value for s in statuses)

    try:
        await wait_until(running, 60)

        # Then the agent, and all agents, are three quarters used
        stats = await orchestrator.get_stats()
        assert stats["agent_utilization"] == {"four_slots": 0.75}
        assert stats["overall_utilization"] == 0.75
        assert stats["running_tasks"] == 3 and stats["pending_tasks"] == 0
    finally:
        gate.set()
    await wait_all(orchestrator, ids)
    stats = await orchestrator.get_stats()
    assert stats["agent_utilization"] == {"four_slots": 0.0}
    assert stats["overall_utilization"] == 0.0


def test_counters_follow_transitions_retirement_and_a_rebuild() -> None:
    stats = StatsTracker()
    tasks = [Task(f"t{i}", "n", "", "j", TaskPriority.LOW, {}) for i in range(3)]
    for task in tasks:
        stats.created_task(task)
    done = tasks[0]
    done.status, done.started_at, done.completed_at = TaskStatus.COMPLETED, 10.0, 14.0
    stats.transition(done, TaskStatus.PENDING)
    failed = tasks[1]
    failed.status = TaskStatus.TIMEOUT
    stats.transition(failed, TaskStatus.PENDING)
    snap = stats.snapshot([])
    assert (snap["tasks_created"], snap["tasks_completed"], snap["tasks_failed"]) == (3, 1, 1)
    assert (snap["pending_tasks"], snap["avg_completion_time"]) == (1, 4.0)

    stats.retire(done)  # forgotten: it goes on counting once rebuilt from the rest
    rebuilt = StatsTracker()
    rebuilt.rebuild(tasks[1:], stats.retired)
    assert rebuilt.snapshot([]) == snap
