"""A redelivered copy of an attempt nobody is known to hold waits before it runs.

A quick attempt tells no start (its final event carries ``started_at``), so
the orchestrator may not know that an agent holds it. If that agent's link
breaks just as it ends the attempt, the broker hands the message to another
agent, whose copy asks to proceed; the first agent reports the end on its
new link moments later. The copy must not run beside it: the orchestrator asks every agent to tell
what it ran (``SyncReports``; each answers ``TasksReported`` once its starts
and final events are out), and the copy runs once all have answered, or
after ``unseen_holder_grace`` if one stays silent; it is cancelled if the end
arrives meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import TaskContext
from broker import (
    AgentAnnounced,
    BusSettings,
    CancelTask,
    Control,
    Event,
    MemoryBus,
    ProceedTask,
    SyncReports,
    TaskAssigned,
    TaskFinished,
    TasksReported,
    TaskStarted,
)
from orchestrator import TaskOrchestrator
from tests.harness import FAST, Harness, wait_until

GRACE = FAST.model_copy(update={"unseen_holder_grace": 1.0})


async def _setup(prefix: str, settings: Any = GRACE):
    bus = MemoryBus(settings=BusSettings(prefix=prefix), user="orch")
    await bus.connect()
    agents = {name: bus.as_user(name) for name in ("a", "b")}
    heard: dict[str, list[Control]] = {"a": [], "b": []}
    for name, agent_bus in agents.items():
        await agent_bus.connect()

        async def on_command(command: Control, name: str = name) -> None:
            heard[name].append(command)

        await agent_bus.subscribe_control(name, on_command)
    orch = TaskOrchestrator(bus, settings=settings)
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


PATIENT = FAST.model_copy(update={"unseen_holder_grace": 600.0})
"""A grace no test waits out: what happens first is the agents' answers' doing."""


def rounds(heard: list[Control]) -> list[int]:
    return [c.round for c in heard if isinstance(c, SyncReports)]


async def _answer(agents: dict[str, Any], heard: dict[str, list[Control]], *names: str) -> None:
    for name in names:
        for round_ in rounds(heard[name]):
            await agents[name].publish_event(TasksReported(agent_id=name, round=round_))


async def test_a_copy_runs_as_soon_as_every_agent_has_told_what_it_ran(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix, PATIENT)
    try:
        # When b's copy asks to proceed, every agent is asked to tell what it ran
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        assert rounds(heard["a"]) == rounds(heard["b"]) == [1]
        assert answers(heard["b"], task_id) == []

        # and only a has answered: b's copy still waits
        await _answer(agents, heard, "a")
        await bus.join()
        assert answers(heard["b"], task_id) == []

        # Then once b answers too, the copy proceeds (long before the grace)
        await _answer(agents, heard, "b")

        async def answered() -> bool:
            await bus.join()
            return bool(answers(heard["b"], task_id))

        await wait_until(answered, timeout=10)
        assert [type(c) for c in answers(heard["b"], task_id)] == [ProceedTask]
    finally:
        await orch.stop()
        await bus.close()


async def test_an_end_told_before_the_answer_cancels_the_copy(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix, PATIENT)
    try:
        # When b's copy asks, and a (which ran the attempt quickly) sends its
        # final event and then its answer, as an agent does
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        await agents["a"].publish_event(
            TaskFinished(
                task_id=task_id, attempt=1, agent_id="a", outcome="completed",
                result={"by": "a"}, started_at=None,
            )
        )  # fmt: skip
        await _answer(agents, heard, "a", "b")
        await bus.join()

        # Then the copy is cancelled, and the task has a's result
        assert [type(c) for c in answers(heard["b"], task_id)] == [CancelTask]
        status = await orch.get_task_status(task_id)
        assert status["status"] == "completed" and status["result"] == {"by": "a"}
    finally:
        await orch.stop()
        await bus.close()


async def test_answers_of_strangers_and_of_old_rounds_count_for_nothing(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix, PATIENT)
    stranger = bus.as_user("mallory")
    await stranger.connect()
    try:
        # When b's copy asks, and the answers come for round 1 from a stranger
        # (as a, under another user; and as an unknown agent), and from a for
        # a round that is not the current one
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        await stranger.publish_event(TasksReported(agent_id="a", round=1))
        await stranger.publish_event(TasksReported(agent_id="nobody", round=1))
        await agents["a"].publish_event(TasksReported(agent_id="a", round=7))
        await _answer(agents, heard, "b")
        await bus.join()

        # Then the copy still waits, and the stranger's answer as a was refused (the
        # unknown agent's reached no queue: nobody registered it)
        assert answers(heard["b"], task_id) == []
        refused = orch.registry.refusals.counts
        assert refused["wrong_user"] >= 1
    finally:
        await orch.stop()
        await stranger.close()
        await bus.close()


async def test_nothing_proceeds_after_the_orchestrator_stops(prefix: str) -> None:
    bus, agents, heard, orch, task_id = await _setup(prefix)
    try:
        # When b's copy waits for the round (a stays silent) and the orchestrator stops
        await agents["b"].publish_event(
            TaskAssigned(task_id=task_id, attempt=1, agent_id="b", confirm=True)
        )
        await bus.join()
        await _answer(agents, heard, "b")
        await bus.join()
        await orch.stop()

        # Then past the grace, nothing was answered
        await asyncio.sleep(GRACE.unseen_holder_grace + 0.5)
        await bus.join()
        assert answers(heard["b"], task_id) == []
    finally:
        await orch.stop()
        await bus.close()


async def test_an_agent_tells_a_deferred_start_before_it_answers(harness: Harness) -> None:
    # Given a real agent running a task whose start it defers (it has not
    # outlasted report_started_after), and a listener on every task event
    orch = await harness.start_orchestrator()
    gate = asyncio.Event()

    async def handler(ctx: TaskContext) -> dict:
        await gate.wait()
        return {}

    agent = await harness.start_agent("worker", [], 1, handler)
    agent.report_started_after = 600.0
    seen: list[Event] = []

    async def record(event: Event) -> None:
        seen.append(event)

    watcher = await harness.connected_bus()
    await watcher.subscribe_events(record, patterns=["task.*"])
    try:
        task_id = await orch.submit_task(name="t", description="", task_type="j", payload={})

        async def holds_it() -> bool:
            return agent.counters.running == 1

        await wait_until(holds_it)
        assert not any(isinstance(e, TaskStarted) for e in seen)

        # When it is asked to tell what it ran
        await orch.bus.publish_control(SyncReports(round=99))

        async def answered() -> bool:
            return any(isinstance(e, TasksReported) and e.round == 99 for e in seen)

        await wait_until(answered)

        # Then its start went out first, then its answer
        kinds = [(type(e), getattr(e, "task_id", None)) for e in seen]
        started = kinds.index((TaskStarted, task_id))
        assert started < kinds.index((TasksReported, None))
    finally:
        gate.set()
