"""The task's state machine: the table, the one transition, and random event storms.

The property test feeds an orchestrator (on the in-process bus, no agent)
what the bus can deliver: started, progress and finished events of current,
stale and future attempts from known and unknown agents, duplicated and in
any order, dead letters, cancels, agents leaving and the watch's rounds. Every
status move it makes is recorded through the lifecycle's observer seam and
checked against the table, and the records' invariants are checked after
every step.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import (
    AgentLeft,
    BusSettings,
    DeadLetter,
    MemoryBus,
    TaskAssigned,
    TaskFinished,
    TaskProgress,
    TaskStarted,
)
from orchestrator import OrchestratorSettings, Task, TaskOrchestrator, TaskPriority, TaskStatus
from orchestrator.lifecycle import TRANSITIONS, IllegalTransition, Lifecycle, Move, legal

FINAL = [s for s in TaskStatus if s.is_final]


def _task(status: TaskStatus = TaskStatus.PENDING) -> Task:
    return Task("t", "n", "", "j", TaskPriority.MEDIUM, {}, status=status)


# ------------------------------------------------------------------ the table
def test_final_is_final_and_every_status_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(TaskStatus)
    for status in FINAL:
        assert TRANSITIONS[status] == frozenset()
    # every live status can reach every other and every final one
    for status in (TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.RUNNING):
        assert TRANSITIONS[status] == frozenset(TaskStatus)


@pytest.mark.parametrize("final", FINAL)
def test_a_move_out_of_a_final_status_is_refused_and_changes_nothing(final: TaskStatus) -> None:
    task = _task(final)
    moves: list[Move] = []
    lifecycle = Lifecycle(clock=lambda: 5.0)
    lifecycle.observe(type("Rec", (), {"moved": lambda self, t, m: moves.append(m)})())
    with pytest.raises(IllegalTransition, match=f"{final.value} -> running"):
        lifecycle.transition(task, TaskStatus.RUNNING, agent="a")
    assert (task.status, task.assigned_agent, moves) == (final, None, [])


def test_each_move_stamps_its_fields_and_observers_hear_it_in_order() -> None:
    now = [10.0]
    lifecycle = Lifecycle(clock=lambda: now[0])
    heard: list[tuple[str, TaskStatus]] = []
    for name in ("first", "second"):
        lifecycle.observe(
            type("Rec", (), {"moved": lambda self, t, m, n=name: heard.append((n, m.new))})()
        )
    task = _task()

    move = lifecycle.transition(task, TaskStatus.PENDING, new_attempt=True)
    assert (task.attempt, task.assigned_agent, move.old, legal(move)) == (
        1,
        None,
        TaskStatus.PENDING,
        True,
    )
    now[0] = 11.0
    lifecycle.transition(task, TaskStatus.RUNNING, agent="agent-1")
    assert (task.status, task.assigned_agent, task.started_at) == (
        TaskStatus.RUNNING,
        "agent-1",
        11.0,
    )
    with pytest.raises(IllegalTransition, match="needs an agent"):
        lifecycle.transition(task, TaskStatus.RUNNING)
    now[0] = 12.0
    lifecycle.transition(task, TaskStatus.COMPLETED, result={"ok": 1}, error=None)
    assert (task.completed_at, task.result, task.progress) == (12.0, {"ok": 1}, 1.0)
    assert heard == [
        ("first", TaskStatus.PENDING),
        ("second", TaskStatus.PENDING),
        ("first", TaskStatus.RUNNING),
        ("second", TaskStatus.RUNNING),
        ("first", TaskStatus.COMPLETED),
        ("second", TaskStatus.COMPLETED),
    ]


def test_legal_rejects_moves_without_their_stamps() -> None:
    ok = Move("t", TaskStatus.PENDING, TaskStatus.RUNNING, 1, 1, None, "a", 0.0)
    assert legal(ok)
    assert legal(Move("t", TaskStatus.PENDING, TaskStatus.ASSIGNED, 1, 1, None, "a", 0.0))
    assert not legal(Move("t", TaskStatus.PENDING, TaskStatus.RUNNING, 1, 1, None, None, 0.0))
    assert not legal(Move("t", TaskStatus.RUNNING, TaskStatus.PENDING, 1, 3, "a", None, 0.0))
    assert not legal(Move("t", TaskStatus.PENDING, TaskStatus.PENDING, 1, 1, None, None, 0.0))
    assert not legal(Move("t", TaskStatus.COMPLETED, TaskStatus.RUNNING, 1, 1, None, "a", 0.0))


# --------------------------------------------------------- random event storms
AGENTS = ["agent-a", "agent-b", "stranger"]
OUTCOMES = ["completed", "failed", "timeout", "cancelled"]

step = st.one_of(
    st.tuples(st.just("started"), st.integers(0, 3), st.integers(-1, 2), st.sampled_from(AGENTS)),
    st.tuples(
        st.just("finished"),
        st.integers(0, 3),
        st.integers(-1, 2),
        st.sampled_from(AGENTS),
        st.sampled_from(OUTCOMES),
    ),
    st.tuples(
        st.just("assigned"),
        st.integers(0, 3),
        st.integers(-1, 2),
        st.sampled_from(AGENTS),
        st.booleans(),
    ),
    st.tuples(st.just("progress"), st.integers(0, 3), st.integers(-1, 1), st.sampled_from(AGENTS)),
    st.tuples(st.just("dead"), st.integers(0, 3), st.integers(-1, 1)),
    st.tuples(st.just("cancel"), st.integers(0, 3)),
    st.tuples(st.just("left"), st.sampled_from(AGENTS)),
    st.tuples(st.just("repeat")),
    st.tuples(st.just("watch")),
)


class _Recorder:
    def __init__(self) -> None:
        self.moves: list[Move] = []

    def moved(self, task: Task, move: Move) -> None:
        self.moves.append(move)


async def _storm(steps: list[tuple], retries: int) -> None:
    bus = MemoryBus(settings=BusSettings(prefix=f"test-{uuid.uuid4().hex[:8]}"))
    quick = OrchestratorSettings(retry_base_delay=0.001, retry_max_delay=0.002, monitor_interval=60)
    orchestrator = TaskOrchestrator(bus, settings=quick)
    recorder = _Recorder()
    orchestrator.lifecycle.observe(recorder)
    await orchestrator.start()
    try:
        ids = []
        for i in range(3):
            ids.append(
                await orchestrator.submit_task(
                    name=f"t{i}", description="", task_type="j", payload={}, max_retries=retries
                )
            )
        # the fourth waits for the first
        ids.append(
            await orchestrator.submit_task(
                name="dependent", description="", task_type="j", payload={}, dependencies=[ids[0]]
            )
        )
        await orchestrator.register_agent("agent-a", [], 2)
        await orchestrator.register_agent("agent-b", [], 2)
        attempts_seen: dict[str, int] = {}
        last = None
        for item in steps:
            if item[0] == "repeat":
                item = last or item
                if item[0] == "repeat":
                    continue
            last = item
            kind = item[0]
            if kind in ("started", "assigned", "finished", "progress", "dead"):
                task = orchestrator.records.get(ids[item[1]])
                assert task is not None
                attempt = max(1, task.attempt + item[2])
                if kind == "started":
                    event = TaskStarted(task_id=task.task_id, attempt=attempt, agent_id=item[3])
                    await orchestrator.events.on_event(event)
                elif kind == "assigned":
                    event = TaskAssigned(
                        task_id=task.task_id, attempt=attempt, agent_id=item[3], confirm=item[4]
                    )
                    await orchestrator.events.on_event(event)
                elif kind == "finished":
                    event = TaskFinished(
                        task_id=task.task_id,
                        attempt=attempt,
                        agent_id=item[3],
                        outcome=item[4],
                        result={"r": 1} if item[4] == "completed" else None,
                        error=None if item[4] == "completed" else "boom",
                    )
                    await orchestrator.events.on_event(event)
                elif kind == "progress":
                    event = TaskProgress(
                        task_id=task.task_id, attempt=attempt, agent_id=item[3], progress=0.5
                    )
                    await orchestrator.events.on_event(event)
                else:
                    letter = DeadLetter(
                        body=b"{}", reason="poison", message_id=f"{task.task_id}:{attempt}"
                    )
                    await orchestrator.events.on_dead_letter(letter)
            elif kind == "cancel":
                await orchestrator.cancel_task(ids[item[1]])
            elif kind == "left":
                await orchestrator.events.on_event(AgentLeft(agent_id=item[1]))
            elif kind == "watch":
                await orchestrator.watch.round()
            # Invariants of the records after every step
            for task_id in ids:
                task = orchestrator.records.get(task_id)
                assert task is not None
                assert task.attempt >= attempts_seen.get(task_id, 0), "attempt went down"
                attempts_seen[task_id] = task.attempt
                assert task.retry_count <= task.max_retries
                if not task.status.is_final:
                    held = task.status in (TaskStatus.ASSIGNED, TaskStatus.RUNNING)
                    assert held == (task.assigned_agent is not None), task
                    if task.status is TaskStatus.PENDING and task.attempt == 0:
                        assert task_id == ids[3], "only the dependent waits unpublished"
            for agent in await orchestrator.get_agents():
                assert agent.current_load == len(agent.running)
                for task_id in agent.running:
                    task = orchestrator.records.get(task_id)
                    assert task.status in (TaskStatus.ASSIGNED, TaskStatus.RUNNING)
                    assert task.assigned_agent == agent.agent_id
            dependent = orchestrator.records.get(ids[3])
            first = orchestrator.records.get(ids[0])
            if dependent.attempt > 0:
                assert first.status is TaskStatus.COMPLETED, "a dependent ran before its dependency"
    finally:
        await orchestrator.stop()

    for move in recorder.moves:
        assert legal(move), f"illegal move recorded: {move}"
    ended: dict[str, int] = {}
    for move in recorder.moves:
        if move.new.is_final:
            ended[move.task_id] = ended.get(move.task_id, 0) + 1
    assert all(count == 1 for count in ended.values()), ended


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(step, min_size=1, max_size=30), retries=st.integers(0, 2))
def test_any_sequence_of_events_moves_tasks_only_as_the_table_allows(
    steps: list[tuple], retries: int
) -> None:
    asyncio.run(_storm(steps, retries))
