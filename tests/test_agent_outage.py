"""Fault tests: a broker outage does not kill work, and brings nothing back to run twice.

Agents run in their own processes (tests/agent_app.py), against a private
RabbitMQ node of the tests' own (the ``fault`` marker), never the shared one.
Each handler notes in a run log when it starts, ends, or is cancelled, so a
test can tell how often each task ran.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from broker import Event, TaskAssigned
from orchestrator import TaskOrchestrator
from tests.brokers import RabbitMQNode
from tests.harness import FAST, Harness, running_on, wait_all, wait_until

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True),
]

WAIT = 90
STEADY = FAST.model_copy(update={"heartbeat_timeout": 60.0})
"""Liveness is not what these tests are about: an agent silent through the
outage is not dropped (which would re-publish its tasks)."""


def _runs(log: Path) -> list[tuple[str, str, int]]:
    """(what, task id, attempt) for each line of a run log, in order."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(what, task_id, int(attempt)) for what, task_id, attempt, _pid in lines]


async def _submit(orchestrator: TaskOrchestrator, payload: dict, **kwargs: object) -> str:
    return await orchestrator.submit_task(
        name="t",
        description="",
        task_type="job",
        payload=payload,
        required_capabilities=["work"],
        **kwargs,  # type: ignore[arg-type]
    )


def _log_text(harness: Harness, index: int) -> str:
    with open(harness.logs[index].name, errors="replace") as file:
        return file.read()


async def test_handlers_run_on_through_a_broker_restart_and_each_task_runs_once(
    harness: Harness, private_rabbitmq: RabbitMQNode, tmp_path: Path
) -> None:
    # Given an agent process running eight tasks: short ones (acknowledged when
    # they end) and long ones (acknowledged when they start), half of each
    # ending while the broker is down, half after it is back
    orchestrator = await harness.start_orchestrator(STEADY)
    run_log = tmp_path / "runs"
    agent = harness.spawn_agent(
        "steady", ["work"], AGENT_MAX=8, AGENT_LONG_AFTER=50, AGENT_RUN_LOG=run_log
    )
    await harness.wait_agents("steady", timeout=WAIT)
    during, after = tmp_path / "during", tmp_path / "after"
    ids: dict[str, list[str]] = {"during": [], "after": []}
    for gate, group in ((during, "during"), (after, "after")):
        for timeout in (40.0, 300.0, 40.0, 300.0):
            ids[group].append(
                await _submit(orchestrator, {"until_file": str(gate)}, timeout=timeout)
            )
    every = ids["during"] + ids["after"]
    for task_id in every:
        await wait_until(lambda t=task_id: running_on(orchestrator, t, "steady"), WAIT)

    # When the broker's app stops (every connection drops), half the handlers
    # end meanwhile, and the app starts again
    async def ended_while_down() -> bool:
        return sum(what == "end" for what, *_ in _runs(run_log)) == len(ids["during"])

    await asyncio.to_thread(private_rabbitmq.ctl, "stop_app")
    try:
        during.touch()
        await wait_until(ended_while_down, WAIT)
    finally:
        await asyncio.to_thread(private_rabbitmq.ctl, "start_app")
    after.touch()

    # Then every task completes, without a retry, in that same process
    statuses = await wait_all(orchestrator, every, timeout=WAIT)
    assert [s["status"] for s in statuses] == ["completed"] * len(every)
    assert [s["retry_count"] for s in statuses] == [0] * len(every)
    assert {s["result"]["pid"] for s in statuses} == {agent.pid}

    # And each handler ran once, to its end: none was cancelled or started again
    runs = _runs(run_log)
    assert [what for what, *_ in runs if what != "start" and what != "end"] == []
    assert Counter((what, task_id) for what, task_id, _ in runs) == Counter(
        {(what, task_id): 1 for task_id in every for what in ("start", "end")}
    )
    assert agent.poll() is None
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == len(every) and stats["tasks_failed"] == 0

    # And it hears its commands again (its control queue came back with the
    # link): a task cancelled while it runs there is stopped
    cancelled = await _submit(orchestrator, {"until_file": str(tmp_path / "never")})
    await wait_until(lambda: running_on(orchestrator, cancelled, "steady"), WAIT)

    async def handler_started() -> bool:
        # A long task reports its start before its handler begins (it is then
        # acknowledged): a cancel in between is obeyed before the handler runs.
        return ("start", cancelled, 1) in _runs(run_log)

    await wait_until(handler_started, WAIT)
    assert await orchestrator.cancel_task(cancelled) is True

    async def stopped() -> bool:
        return ("cancelled", cancelled, 1) in _runs(run_log)

    await wait_until(stopped, WAIT)


async def test_a_task_waiting_for_a_slot_held_after_a_restart_shows_assigned(
    harness: Harness, private_rabbitmq: RabbitMQNode, tmp_path: Path
) -> None:
    # Given an agent process with one slot, held by a handler that ignores its
    # cancel and outlives its task's timeout; and a second task waiting behind it
    orchestrator = await harness.start_orchestrator(STEADY)
    run_log, gate = tmp_path / "runs", tmp_path / "gate"
    harness.spawn_agent("single", ["work"], AGENT_MAX=1, AGENT_RUN_LOG=run_log)
    await harness.wait_agents("single", timeout=WAIT)
    deaf = await _submit(
        orchestrator, {"until_file": str(gate), "deaf": True}, timeout=1, max_retries=0
    )
    status = await orchestrator.wait_for_task(deaf, timeout=WAIT)
    assert status["status"] == "timeout"
    second = await _submit(orchestrator, {})

    # When the broker restarts (the held delivery goes back to the queue with
    # the link, and the agent is handed a fresh prefetch)
    await asyncio.to_thread(private_rabbitmq.restart_app)

    # Then the second task is delivered, but does not start beside the handler
    # that holds the slot: it shows assigned to that agent
    async def assigned_there() -> bool:
        status = await orchestrator.get_task_status(second)
        return status["status"] == "assigned" and status["assigned_agent"] == "single"

    await wait_until(assigned_there, WAIT)
    assert [task_id for what, task_id, _ in _runs(run_log) if what == "start"] == [deaf]

    # And once that handler ends, it runs there, alone
    gate.touch()
    status = await orchestrator.wait_for_task(second, timeout=WAIT)
    assert status["status"] == "completed"
    assert status["result"]["max_running"] == 1
    runs = [(what, task_id) for what, task_id, _ in _runs(run_log)]
    assert runs == [("start", deaf), ("end", deaf), ("start", second), ("end", second)]


async def test_a_broker_crash_brings_back_no_task_to_run_again_on_its_agent(
    harness: Harness, private_rabbitmq: RabbitMQNode, tmp_path: Path
) -> None:
    # Given tasks that ran and were acknowledged by an agent process
    orchestrator = await harness.start_orchestrator(STEADY)
    run_log = tmp_path / "runs"
    harness.spawn_agent("keeper", ["work"], AGENT_MAX=1, AGENT_RUN_LOG=run_log)
    await harness.wait_agents("keeper", timeout=WAIT)
    ids = [await _submit(orchestrator, {"n": n}) for n in range(40)]
    await wait_all(orchestrator, ids, timeout=WAIT)

    # When the broker is killed at once (SIGKILL: the acknowledgements of the
    # last ones are not on its disk yet) and started again, and one more task
    # is queued behind what came back
    await asyncio.to_thread(private_rabbitmq.kill)
    await asyncio.to_thread(private_rabbitmq.start_again)
    probe = await _submit(orchestrator, {"probe": True})
    status = await orchestrator.wait_for_task(probe, timeout=WAIT)
    assert status["status"] == "completed"

    # Then what came back was acknowledged by the agent that had run it, without
    # running again: every task started once
    starts = Counter(task_id for what, task_id, _ in _runs(run_log) if what == "start")
    assert starts == Counter({task_id: 1 for task_id in [*ids, probe]})
    came_back = _log_text(harness, 0).count("came again after it ended here")
    assert came_back > 0, "the crash brought nothing back: the test saw nothing"


async def test_a_broker_crash_brings_back_no_finished_task_to_run_on_another_agent(
    harness: Harness, private_rabbitmq: RabbitMQNode, tmp_path: Path
) -> None:
    # Given tasks that ran and were acknowledged by an agent process
    orchestrator = await harness.start_orchestrator(STEADY)
    first_log, second_log = tmp_path / "first", tmp_path / "second"
    first = harness.spawn_agent("first", ["work"], AGENT_MAX=1, AGENT_RUN_LOG=first_log)
    await harness.wait_agents("first", timeout=WAIT)
    ids = [await _submit(orchestrator, {"n": n}) for n in range(40)]
    before = await wait_all(orchestrator, ids, timeout=WAIT)

    # When the broker is killed at once, and that agent with it, and the
    # broker starts again with a new agent, and one more task is queued
    await asyncio.to_thread(private_rabbitmq.kill)
    os.kill(first.pid, signal.SIGKILL)
    await asyncio.to_thread(first.wait, WAIT)
    await asyncio.to_thread(private_rabbitmq.start_again)
    monitor = await harness.connected_bus()
    asked: list[TaskAssigned] = []

    async def on_event(event: Event) -> None:
        if isinstance(event, TaskAssigned):
            asked.append(event)

    subscription = await monitor.subscribe_events(on_event, patterns=["task.assigned"])
    try:
        harness.spawn_agent("second", ["work"], AGENT_MAX=1, AGENT_RUN_LOG=second_log)
        await harness.wait_agents("second", timeout=WAIT)
        probe = await _submit(orchestrator, {"probe": True})
        status = await orchestrator.wait_for_task(probe, timeout=WAIT)
        assert status["status"] == "completed"
    finally:
        await subscription.close()

    # Then the new agent ran none of the messages that came back, only the task
    # queued since; it asked about each of them
    assert [(what, task_id) for what, task_id, _ in _runs(second_log)] == [
        ("start", probe),
        ("end", probe),
    ]
    assert asked, "the crash brought nothing back: the test saw nothing"
    assert {(e.agent_id, e.confirm) for e in asked} == {("second", True)}
    assert {e.task_id for e in asked} <= set(ids)
    after = [await orchestrator.get_task_status(task_id) for task_id in ids]
    assert [s["status"] for s in after] == ["completed"] * len(ids)
    assert [s["result"] for s in after] == [s["result"] for s in before]
