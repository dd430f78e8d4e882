"""An agent lost mid-task: its task completes elsewhere, and it leaves the stats."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents import TaskContext
from orchestrator import TaskOrchestrator, TaskStatus
from tests.harness import FAST, Harness, gone, registered, running_on, wait_until


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_agent_process_killed_mid_task(harness: Harness) -> None:
    # Given a task running in an agent process, and a second agent process
    orchestrator = await harness.start_orchestrator()
    victim = harness.spawn_agent("victim", ["work"])
    await harness.wait_agents("victim")
    task_id = await orchestrator.submit_task(
        name="long",
        description="",
        task_type="job",
        payload={"hang_on": "victim"},
        required_capabilities=["work"],
    )
    await wait_until(lambda: running_on(orchestrator, task_id, "victim"), timeout=15)
    harness.spawn_agent("survivor", ["work"])
    await harness.wait_agents("survivor")

    # When the victim is killed with SIGKILL
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)

    # Then the task completes on the survivor
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "survivor"
    assert status["result"]["agent"] == "survivor"

    # And after the heartbeat timeout the dead agent is no longer counted
    await wait_until(lambda: gone(orchestrator, "victim"), timeout=15)
    stats = await orchestrator.get_stats()
    assert stats["registered_agents"] == 1
    assert set(stats["agent_utilization"]) == {"survivor"}
    assert stats["completed_tasks"] == 1 and stats["running_tasks"] == 0


async def test_agent_lost_in_process(harness: Harness) -> None:
    # Given a task running on an agent that will vanish without a goodbye
    orchestrator = await harness.start_orchestrator()

    async def hang_on_victim(ctx: TaskContext) -> dict:
        if ctx.agent_id == "victim":
            import asyncio

            await asyncio.sleep(3600)
        return {"agent": ctx.agent_id}

    victim = await harness.start_agent("victim", ["work"], 1, hang_on_victim)
    task_id = await orchestrator.submit_task(
        name="long", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    await wait_until(lambda: running_on(orchestrator, task_id, "victim"), timeout=15)
    await harness.start_agent("survivor", ["work"], 1, hang_on_victim)

    # When the victim crashes (its deliveries go back, its heartbeats stop)
    await victim.kill()

    # Then the task completes on the survivor and the victim leaves the stats
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert status["status"] == "completed"
    assert status["assigned_agent"] == "survivor"
    await wait_until(lambda: gone(orchestrator, "victim"), timeout=15)
    assert (await orchestrator.get_stats())["registered_agents"] == 1


async def test_unregister_agent_moves_its_task_to_another(harness: Harness) -> None:
    # Given a task held by an agent that hangs on it
    orchestrator = await harness.start_orchestrator()

    async def hang_on_first(ctx: TaskContext) -> dict:
        if ctx.agent_id == "first":
            import asyncio

            await asyncio.sleep(3600)
        return {"agent": ctx.agent_id}

    first = await harness.start_agent("first", ["work"], 1, hang_on_first)
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    await wait_until(lambda: running_on(orchestrator, task_id, "first"), timeout=15)
    await harness.start_agent("second", ["work"], 1, hang_on_first)

    # When the first agent is unregistered
    await orchestrator.unregister_agent("first")

    # Then the task runs again and completes on the second; the first stops
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert status["status"] == TaskStatus.COMPLETED.value
    assert status["assigned_agent"] == "second"
    await first.wait_stopped()
    assert await registered(orchestrator) == {"second"}
    with pytest.raises(ValueError, match="agent_id"):
        await orchestrator.unregister_agent("first")


@dataclass
class _KillScene:
    """A task running in agent process "victim", agent process "survivor"
    beside it, both heartbeating and logging the handler's runs."""

    orchestrator: TaskOrchestrator
    victim: subprocess.Popen[bytes]
    task_id: str
    runs: Path
    timeout: float
    """The orchestrator's heartbeat timeout: far longer than detection should take."""

    def kill_victim(self) -> float:
        """SIGKILL the victim (no goodbye); when, on the monotonic clock."""
        os.kill(self.victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.victim.wait(timeout=10)
        return killed

    def assert_ran_to_the_end_once(self) -> None:
        ends = [line for line in self.runs.read_text().splitlines() if line.startswith("end ")]
        assert len(ends) == 1, self.runs.read_text()


async def _task_on_a_victim(
    harness: Harness, tmp_path: Path, *, heartbeat: float, payload: dict
) -> _KillScene:
    """An orchestrator that waits a minute of silence before it gives up on an
    agent; a task (``payload`` beside ``hang_on``) running on the victim, the
    survivor registered, the victim's heartbeat interval learnt."""
    timeout = 60.0
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"heartbeat_timeout": timeout})
    )
    runs = tmp_path / "runs"
    env = {"AGENT_HEARTBEAT": heartbeat, "AGENT_RUN_LOG": runs}
    victim = harness.spawn_agent("victim", ["work"], **env)
    await harness.wait_agents("victim")
    task_id = await orchestrator.submit_task(
        name="long",
        description="",
        task_type="job",
        payload={"hang_on": "victim", **payload},
        required_capabilities=["work"],
    )
    await wait_until(lambda: running_on(orchestrator, task_id, "victim"), timeout=15)
    harness.spawn_agent("survivor", ["work"], **env)
    await harness.wait_agents("survivor")

    async def interval_known() -> bool:  # steady state: its heartbeats' pace is known
        return orchestrator.registry.heartbeat_interval("victim") is not None

    await wait_until(interval_known, 20)
    return _KillScene(orchestrator, victim, task_id, runs, timeout)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_a_killed_agents_task_reads_pending_long_before_the_heartbeat_timeout(
    harness: Harness, tmp_path
) -> None:
    # Given an orchestrator that waits a minute of silence before it gives up on an
    # agent, and a task running in an agent process that heartbeats every second
    scene = await _task_on_a_victim(harness, tmp_path, heartbeat=1.0, payload={})
    orchestrator, task_id, timeout = scene.orchestrator, scene.task_id, scene.timeout

    # When the victim is killed with SIGKILL (no goodbye; the broker sees its
    # connection die and deletes its exclusive control queue)
    killed = scene.kill_victim()

    # Then, well within the heartbeat timeout, the victim is removed and its task
    # no longer reads running on it: pending, or held by the survivor
    async def moved_off() -> bool:
        status = await orchestrator.get_task_status(task_id)
        assert status is not None
        return status["assigned_agent"] != "victim"

    await wait_until(moved_off, timeout / 3)
    detected = time.monotonic() - killed
    await wait_until(lambda: gone(orchestrator, "victim"), timeout / 3)
    print(
        f"\nSIGKILLed agent (heartbeat every 1 s, heartbeat_timeout {timeout:g} s):"
        f" its task left it {detected:.2f}s after the kill"
    )

    # And the task completes once, on the survivor
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert (status["status"], status["assigned_agent"]) == ("completed", "survivor")
    assert status["result"]["agent"] == "survivor"
    stats = await orchestrator.get_stats()
    assert (stats["completed_tasks"], stats["registered_agents"]) == (1, 1)
    scene.assert_ran_to_the_end_once()


async def _moved_to(orchestrator, task_id: str, agent_id: str, since: float) -> float:
    """Seconds from ``since`` until the task reads running on ``agent_id``."""
    await wait_until(lambda: running_on(orchestrator, task_id, agent_id), timeout=60, interval=0.05)
    return time.monotonic() - since


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_a_killed_agents_task_runs_on_another_within_seconds_of_the_kill(
    harness: Harness, tmp_path
) -> None:
    # Given agent processes that heartbeat every 5 s (the default) and an
    # orchestrator that waits a minute of silence, with a task running on one
    scene = await _task_on_a_victim(harness, tmp_path, heartbeat=5.0, payload={"sleep": 0.5})
    orchestrator, task_id = scene.orchestrator, scene.task_id

    # When the victim is SIGKILLed: the broker hands its message to the survivor
    # at once, which asks the orchestrator before it runs the copy
    killed = scene.kill_victim()

    # Then the task reads running on the survivor within a few seconds, long
    # before two of the victim's heartbeats would have been missed (10 s)
    moved = await _moved_to(orchestrator, task_id, "survivor", killed)
    print(f"\nSIGKILL -> running on the survivor: {moved:.2f}s (heartbeat every 5 s)")
    assert moved < 8.0
    assert not await running_on(orchestrator, task_id, "victim")
    assert await gone(orchestrator, "victim")

    # And it completes once, on the survivor
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    assert (status["status"], status["result"]["agent"]) == ("completed", "survivor")
    scene.assert_ran_to_the_end_once()


async def test_a_crashed_agents_task_runs_on_another_within_seconds(harness: Harness) -> None:
    # Given agents that heartbeat every 5 s, an orchestrator that waits a minute
    # of silence, and a task running on the victim
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"heartbeat_timeout": 60.0})
    )

    async def hang_on_victim(ctx: TaskContext) -> dict:
        if ctx.agent_id == "victim":
            import asyncio

            await asyncio.sleep(3600)
        return {"agent": ctx.agent_id}

    victim = await harness.start_agent("victim", ["work"], 1, hang_on_victim, heartbeat_interval=5)
    task_id = await orchestrator.submit_task(
        name="long", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    await wait_until(lambda: running_on(orchestrator, task_id, "victim"), timeout=15)
    await harness.start_agent("survivor", ["work"], 1, hang_on_victim, heartbeat_interval=5)

    # When the victim crashes: its delivery goes back and the survivor asks to run it
    await victim.kill()
    killed = time.monotonic()

    # Then its task leaves the victim within seconds (well before 10 s of silence)
    status = await orchestrator.wait_for_task(task_id, timeout=30)
    moved = time.monotonic() - killed
    print(f"\ncrash -> completed on the survivor: {moved:.2f}s (heartbeat every 5 s)")
    assert (status["status"], status["assigned_agent"]) == ("completed", "survivor")
    assert moved < 8.0
    assert await gone(orchestrator, "victim")


async def test_an_agent_beating_less_often_than_the_orchestrator_waits_is_not_removed(
    harness: Harness,
) -> None:
    # Given an orchestrator that takes 1 s of silence for a lost agent, and an
    # agent configured to beat every 30 s (a user's mismatched settings)
    timeout = 1.0
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"heartbeat_timeout": timeout})
    )
    agent = await harness.start_agent("slow-beater", ["work"], heartbeat_interval=30.0)
    [registered_as] = await orchestrator.get_agents()
    first_seen = registered_as.last_seen
    assert first_seen is not None

    # When it has been heard from for three of the orchestrator's timeouts
    async def heard_for_three_timeouts() -> bool:
        agents = await orchestrator.get_agents()
        assert [a.agent_id for a in agents] == ["slow-beater"], "the agent was removed"
        last = agents[0].last_seen
        return last is not None and last - first_seen > 3 * timeout

    await wait_until(heard_for_three_timeouts, timeout=15)

    # Then it beats as often as the orchestrator expects, was never removed,
    # and still runs tasks
    assert agent.heartbeat_interval == pytest.approx(timeout / 3)
    assert agent.serving
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="job", payload={}, required_capabilities=["work"]
    )
    status = await orchestrator.wait_for_task(task_id, timeout=15)
    assert status["status"] == "completed"
