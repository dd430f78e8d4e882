"""A redelivered copy of an attempt nobody is known to hold waits before it runs.

A quick attempt tells no start (its final event carries ``started_at``), so
the orchestrator may not know that an agent holds it. If that agent's link
breaks just as it ends the attempt, the broker hands the message to another
agent, whose copy asks to proceed; the first agent reports the end on its
new link moments later. The copy must not run beside it: it waits
``unseen_holder_grace``, and is cancelled if the end arrives meanwhile.
"""

from __future__ import annotations

import pytest

from broker import (
    AgentAnnounced,
    BusSettings,
    CancelTask,
    Control,
    MemoryBus,
    ProceedTask,
    TaskAssigned,
    TaskFinished,
)
from orchestrator import TaskOrchestrator
from tests.harness import FAST, wait_until

GRACE = FAST.model_copy(update={"unseen_holder_grace": 1.0})


async def _setup(prefix: str):
    bus = MemoryBus(settings=BusSettings(prefix=prefix), user="orch")
    await bus.connect()
    agents = {name: bus.as_user(name) for name in ("a", "b")}
    heard: dict[str, list[Control]] = {"a": [], "b": []}
    for name, agent_bus in agents.items():
        await agent_bus.connect()

        async def on_command(command: Control, name: str = name) -> None:
            heard[name].append(command)

        await agent_bus.subscribe_control(name, on_command)
    orch = TaskOrchestrator(bus, settings=GRACE)
    await orch.start()
    for name, agent_bus in agents.items():
        await agent_bus.publish_event(
            AgentAnnounced(agent_id=name, capabilities=[], max_concurrent_tasks=1, task_types=["*"])
        )
    await bus.join()
    task_id = await orch.submit_task(name="t", description="", task_type="j", payload={})
    await bus.join()
    return bus, agents, heard, orch, task_id


def answers(heard: list[Control], task_id: str) -> list[Control]:
    return [c for c in heard if isinstance(c, ProceedTask | CancelTask) and c.task_id == task_id]


async def test_a_copy_is_cancelled_when_the_unseen_holder_reports_the_end(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix)
    try:
        # When b's redelivered copy asks to proceed, and a (which ended the attempt
        # before its link broke) reports the end within the grace
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        assert answers(heard["b"], task_id) == []  # b waits
        await agents["a"].publish_event(
            TaskFinished(
                task_id=task_id, attempt=1, agent_id="a", outcome="completed",
                result={"by": "a"}, started_at=None,
            )
        )  # fmt: skip

        # Then the task completed with a's result, and b's copy is cancelled, not run
        async def answered() -> bool:
            await bus.join()
            return bool(answers(heard["b"], task_id))

        await wait_until(answered, timeout=10)
        assert [type(c) for c in answers(heard["b"], task_id)] == [CancelTask]
        status = await orch.get_task_status(task_id)
        assert status["status"] == "completed" and status["result"] == {"by": "a"}
    finally:
        await orch.stop()
        await bus.close()


async def test_a_copy_runs_after_the_grace_when_no_holder_speaks(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix)
    try:
        # When b's copy asks to proceed (twice, as an agent asks again) and nobody else speaks
        for _ in range(2):
            await agents["b"].publish_event(
                TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
            )
        await bus.join()
        assert answers(heard["b"], task_id) == []  # it waits out the grace first

        # Then it proceeds once, after the grace, and the task is b's
        async def answered() -> bool:
            await bus.join()
            return bool(answers(heard["b"], task_id))

        await wait_until(answered, timeout=10)
        assert [type(c) for c in answers(heard["b"], task_id)] == [ProceedTask]
        status = await orch.get_task_status(task_id)
        assert (status["status"], status["assigned_agent"]) == ("assigned", "b")
    finally:
        await orch.stop()
        await bus.close()


async def test_a_copy_waiting_out_the_grace_is_not_answered_after_the_orchestrator_stops(
    prefix: str,
) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix)
    try:
        # Given b's copy waiting out the grace
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        assert answers(heard["b"], task_id) == []

        # When the orchestrator stops before the grace is over (the bus stays open)
        await orch.stop()

        # Then b is told nothing, by then nor after the grace has passed twice over
        async def answered() -> bool:
            await bus.join()
            return bool(answers(heard["b"], task_id))

        with pytest.raises(AssertionError, match="not met"):
            await wait_until(answered, timeout=2 * GRACE.unseen_holder_grace)
        assert answers(heard["b"], task_id) == []
    finally:
        await orch.stop()
        await bus.close()
