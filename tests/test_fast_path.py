"""The fast path of a quick task: one event, not two.

An agent tells an attempt's start only once it outlasts
``report_started_after``; an attempt that ends before that sends its final
event alone, carrying ``started_at``, and the orchestrator reads it as having
run from then. A slower task still reads running before it ends, and an old
agent's final event without ``started_at`` (after its ``TaskStarted``, or
alone) still ends its task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, TaskContext
from broker import TaskFinished, TaskStarted
from orchestrator import TaskOrchestrator
from tests.harness import Harness, echo, running_on, wait_until

WAIT = 60


async def _submit(orch: TaskOrchestrator, **kwargs: Any) -> str:
    kwargs.setdefault("name", "job")
    kwargs.setdefault("description", "")
    kwargs.setdefault("task_type", "job")
    kwargs.setdefault("payload", {})
    kwargs.setdefault("required_capabilities", ["work"])
    return await orch.submit_task(**kwargs)


async def _monitor(harness: Harness) -> list[Any]:
    """Every task event on the bus, in the order heard."""
    heard: list[Any] = []

    async def on_event(event: Any) -> None:
        heard.append(event)

    bus = await harness.connected_bus()
    await bus.subscribe_events(on_event, patterns=["task.#"])
    return heard


def _of(heard: list[Any], task_id: str) -> list[str]:
    return [e.kind for e in heard if getattr(e, "task_id", None) == task_id]


def _heard(heard: list[Any], task_id: str, *kinds: str) -> Any:
    """A condition for ``wait_until``: the task's events are ``kinds``."""

    async def condition() -> bool:
        return _of(heard, task_id) == list(kinds)

    return condition


async def test_a_quick_task_is_one_event_and_reads_completed_with_its_start(
    harness: Harness,
) -> None:
    # Given an orchestrator, a monitor of task events, and an agent
    orchestrator = await harness.start_orchestrator()
    heard = await _monitor(harness)
    # (a delay no run of a quick task outlasts, however slow the machine is)
    agent = Agent("worker", ["work"], 2, heartbeat_interval=0.3, report_started_after=WAIT)
    agent.add_handler("*", echo)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    await harness.wait_agents("worker")

    # When a task whose handler ends at once runs, and then another
    quick = await _submit(orchestrator, payload={"n": 1})
    status = await orchestrator.wait_for_task(quick, timeout=WAIT)
    fence = await _submit(orchestrator, payload={"n": 2})
    await orchestrator.wait_for_task(fence, timeout=WAIT)
    await wait_until(_heard(heard, fence, "task.finished"), WAIT)

    # Then the bus carried one event of it, its final one, which says when it started
    assert _of(heard, quick) == ["task.finished"]
    (final,) = [e for e in heard if isinstance(e, TaskFinished) and e.task_id == quick]
    assert final.started_at is not None
    # And it reads completed, started when the agent says, by that agent
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "worker"
    assert status["started_at"] == final.started_at
    assert status["created_at"] <= status["started_at"] <= status["completed_at"]
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == 2
    assert stats["running_tasks"] == stats["pending_tasks"] == 0


async def test_a_slower_task_reads_running_before_it_ends(harness: Harness) -> None:
    # Given an agent whose handler waits on a gate
    orchestrator = await harness.start_orchestrator()
    heard = await _monitor(harness)
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        await gate.wait()
        return {"done": True}

    await harness.start_agent("worker", ["work"], 1, handler)
    task_id = await _submit(orchestrator)

    # When it runs past the agent's delay, it reads running there, told by a TaskStarted
    await wait_until(lambda: running_on(orchestrator, task_id, "worker"), WAIT)
    await wait_until(_heard(heard, task_id, "task.started"), WAIT)
    gate.set()

    # Then it completes, its start kept from the TaskStarted
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "completed"
    await wait_until(_heard(heard, task_id, "task.started", "task.finished"), WAIT)
    (started,) = [e for e in heard if isinstance(e, TaskStarted) and e.task_id == task_id]
    assert status["started_at"] == started.at


async def test_a_progress_report_tells_the_start_first(harness: Harness) -> None:
    # Given a handler that reports progress at once and then waits
    orchestrator = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        ctx.progress(0.5)
        await gate.wait()
        return {}

    await harness.start_agent("worker", ["work"], 1, handler)
    task_id = await _submit(orchestrator)

    # Then the orchestrator shows it running with that progress (kept only for a running task)
    async def half_done() -> bool:
        status = await orchestrator.get_task_status(task_id)
        return status["status"] == "running" and status["progress"] == 0.5

    await wait_until(half_done, WAIT)
    gate.set()
    assert (await orchestrator.wait_for_task(task_id, timeout=WAIT))["status"] == "completed"


async def test_an_old_agents_final_event_without_started_at_still_ends_its_task(
    harness: Harness,
) -> None:
    # Given a queued task, and no agent to take it but an old one's events, told
    # in-process (an agent before started_at always tells its start)
    orchestrator = await harness.start_orchestrator()
    task_id = await _submit(orchestrator)
    events = orchestrator.events

    # When its TaskStarted comes, then a final event without started_at
    await events.on_event(TaskStarted(task_id=task_id, attempt=1, agent_id="old", at=1000.0))
    await events.on_event(
        TaskFinished(task_id=task_id, attempt=1, agent_id="old", outcome="completed", result={})
    )

    # Then it completed, started when the TaskStarted said
    status = await orchestrator.get_task_status(task_id)
    assert status["status"] == "completed"
    assert status["started_at"] == 1000.0

    # And a final event alone, without started_at, ends a task too (no start known)
    second = await _submit(orchestrator)
    await events.on_event(
        TaskFinished(task_id=second, attempt=1, agent_id="old", outcome="completed", result={})
    )
    status = await orchestrator.get_task_status(second)
    assert status["status"] == "completed"
    assert status["started_at"] is None
