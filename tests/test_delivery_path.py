"""What the cheaper delivery path must still do (issue 14).

The in-process bus keeps where each routing key goes until a binding
changes: a monitor bound after a key was routed hears it from then on, and
one closed hears it no more. Starts that outlast ``report_started_after``
share one timer: each of several attempts held at once is still told, in
time, and one that ends first is not. A stop of an attempt (a cancel) ends
its run at once though the run is no task of its own, and the agent runs
the next task on the slot.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, TaskContext
from broker import BusSettings, MemoryBus, TaskFinished, TaskStarted
from orchestrator import TaskOrchestrator
from tests.harness import Harness, wait_until

WAIT = 30


async def test_a_monitor_bound_after_a_key_was_routed_hears_it_until_it_closes(
    prefix: str,
) -> None:
    # Given an in-process bus that has routed a task event once, to nobody listening
    bus = MemoryBus(settings=BusSettings(prefix=prefix))
    await bus.connect()
    try:
        event = TaskStarted(task_id="t", attempt=1, agent_id="a")
        await bus.publish_event(event)
        heard: list[Any] = []
        other: list[Any] = []

        async def on_event(e: Any) -> None:
            heard.append(e)

        async def on_other(e: Any) -> None:
            other.append(e)

        # When a monitor of task events is bound and the same event goes again
        monitor = await bus.subscribe_events(on_event, patterns=["task.#"])
        await bus.publish_event(event)
        await asyncio.wait_for(bus.join(), WAIT)

        # Then the monitor hears it
        assert [e.task_id for e in heard] == ["t"]

        # And once it is closed (and another monitor bound), it hears no more
        await monitor.close()
        await bus.subscribe_events(on_other, patterns=["task.started.*"])
        await bus.publish_event(event)
        await asyncio.wait_for(bus.join(), WAIT)
        assert [e.task_id for e in heard] == ["t"]
        assert [e.task_id for e in other] == ["t"]
    finally:
        await bus.close()


async def _submit(orch: TaskOrchestrator, n: int, **kwargs: Any) -> str:
    return await orch.submit_task(
        name=f"job-{n}",
        description="",
        task_type="job",
        payload={"n": n},
        required_capabilities=["work"],
        **kwargs,
    )


async def test_every_start_held_at_once_is_told_and_a_quick_one_is_not(
    harness: Harness,
) -> None:
    # Given an agent that tells starts after 50 ms, a monitor of task events,
    # and handlers held on a gate but for the quick one
    orchestrator = await harness.start_orchestrator()
    heard: list[Any] = []

    async def on_event(event: Any) -> None:
        heard.append(event)

    monitor_bus = await harness.connected_bus()
    await monitor_bus.subscribe_events(on_event, patterns=["task.#"])
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload["n"] != 0:
            await gate.wait()
        return {"n": ctx.payload["n"]}

    agent = Agent("worker", ["work"], 4, heartbeat_interval=0.3, report_started_after=0.05)
    agent.add_handler("*", handler)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    await harness.wait_agents("worker")

    # When a quick task ends, and three held tasks run past the delay
    quick = await _submit(orchestrator, 0)
    assert (await orchestrator.wait_for_task(quick, timeout=WAIT))["status"] == "completed"
    held = [await _submit(orchestrator, n) for n in (1, 2, 3)]

    # Then each held one is told started while it runs
    def started(task_id: str) -> bool:
        return any(isinstance(e, TaskStarted) and e.task_id == task_id for e in heard)

    async def all_started() -> bool:
        return all(started(t) for t in held)

    await wait_until(all_started, WAIT)
    gate.set()
    for task_id in held:
        status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
        assert status["status"] == "completed"
        (told,) = [e for e in heard if isinstance(e, TaskStarted) and e.task_id == task_id]
        assert status["started_at"] == told.at

    # And the quick one was told by its final event alone
    async def quick_heard() -> bool:
        return any(isinstance(e, TaskFinished) and e.task_id == quick for e in heard)

    await wait_until(quick_heard, WAIT)
    assert not started(quick)


async def test_a_cancelled_task_ends_at_once_and_its_slot_runs_the_next(
    harness: Harness,
) -> None:
    # Given an agent with one slot whose handler for the first task never ends
    orchestrator = await harness.start_orchestrator()
    cancelled = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        if ctx.payload["n"] == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return {"n": ctx.payload["n"]}

    agent = await harness.start_agent("worker", ["work"], 1, handler)
    first = await _submit(orchestrator, 1)

    async def running() -> bool:
        return (await orchestrator.get_task_status(first))["status"] == "running"

    await wait_until(running, WAIT)
    second = await _submit(orchestrator, 2)

    # When the first is cancelled
    await orchestrator.cancel_task(first)

    # Then its handler is cancelled, it reads cancelled, and the second completes on the slot
    await asyncio.wait_for(cancelled.wait(), WAIT)
    assert (await orchestrator.wait_for_task(first, timeout=WAIT))["status"] == "cancelled"
    assert (await orchestrator.wait_for_task(second, timeout=WAIT))["status"] == "completed"
    assert agent.counters.cancelled == 1
    assert agent.counters.completed == 1
