"""The watch on an injected clock: what silence means, without waiting for it.

The orchestrator takes its clock as an argument, and a round of its watch
can be run on demand, so these tests move time by hand and never sleep.
"""

from __future__ import annotations

import uuid

import pytest

from broker import (
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    BusSettings,
    MemoryBus,
    TaskAssigned,
    TaskFinished,
    TaskStarted,
)
from orchestrator import OrchestratorSettings, TaskOrchestrator
from tests.harness import wait_until


async def _listen(orchestrator: TaskOrchestrator, agent_id: str):
    """The commands sent to ``agent_id`` from now on, and their subscription."""
    heard: list = []

    async def control(command) -> None:
        heard.append(command)

    return heard, await orchestrator.bus.subscribe_control(agent_id, control)


def _heard_about_a_task(heard: list):
    async def condition() -> bool:
        return any(hasattr(c, "task_id") for c in heard)

    return condition


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup():
    clock = Clock()
    bus = MemoryBus(settings=BusSettings(prefix=f"test-{uuid.uuid4().hex[:8]}"))
    settings = OrchestratorSettings(
        heartbeat_timeout=15, timeout_grace=5, monitor_interval=3600, retry_base_delay=0.01
    )
    orchestrator = TaskOrchestrator(bus, settings=settings, clock=clock)
    await orchestrator.start()
    await orchestrator.events.on_event(
        AgentAnnounced(agent_id="worker", capabilities=[], max_concurrent_tasks=2, task_types=["*"])
    )
    task_id = await orchestrator.submit_task(
        name="t", description="", task_type="j", payload={}, timeout=60, max_retries=1
    )
    await orchestrator.events.on_event(TaskStarted(task_id=task_id, attempt=1, agent_id="worker"))
    try:
        yield orchestrator, clock, task_id
    finally:
        await orchestrator.stop()


async def test_a_running_task_silent_past_its_timeout_and_grace_is_retried(setup) -> None:
    orchestrator, clock, task_id = setup
    heartbeat = AgentHeartbeat(agent_id="worker", running=1)

    # Just before its deadline (timeout 60 + grace 5), nothing happens
    clock.now += 64.9
    await orchestrator.events.on_event(heartbeat)  # the agent itself is alive
    await orchestrator.watch.round()
    assert (await orchestrator.get_task_status(task_id))["status"] == "running"

    # Past it, the attempt timed out here and a retry is queued
    clock.now += 0.2
    await orchestrator.watch.round()
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["retry_count"], status["assigned_agent"]) == (
        "pending",
        1,
        None,
    )
    assert "within the timeout of 60s" in status["error_message"]
    (agent,) = await orchestrator.get_agents()
    assert agent.current_load == 0


async def test_an_agent_silent_past_the_heartbeat_timeout_is_removed_and_its_task_requeued(
    setup,
) -> None:
    # (its connection lives: the broker holds its control queue, a hung process's)
    orchestrator, clock, task_id = setup
    _, subscription = await _listen(orchestrator, "worker")
    clock.now += 14.9
    await orchestrator.watch.round()
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["worker"]

    clock.now += 0.2
    await orchestrator.watch.round()
    await subscription.close()
    assert await orchestrator.get_agents() == []
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"], status["retry_count"]) == (
        "pending",
        None,
        0,
    )
    stats = await orchestrator.get_stats()
    assert (stats["running_tasks"], stats["pending_tasks"]) == (0, 1)


async def test_an_agent_whose_connection_is_gone_is_removed_once_it_missed_two_heartbeats(
    setup,
) -> None:
    # Given an agent heard every 2 s, whose connection then dies (the broker
    # deletes its exclusive control queue)
    orchestrator, clock, task_id = setup
    _, subscription = await _listen(orchestrator, "worker")
    for _ in range(3):
        clock.now += 2
        await orchestrator.events.on_event(AgentHeartbeat(agent_id="worker", running=1))
    await subscription.close()

    # When it missed one heartbeat, it stays
    clock.now += 3.9
    await orchestrator.watch.round()
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["worker"]

    # Once it missed two, the broker is asked, and it is removed once its control
    # queue stayed gone for the grace a reconnect has (long before the heartbeat
    # timeout of 15 s), its task pending again
    clock.now += 0.2
    await orchestrator.watch.round()
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["worker"]
    clock.now += 3.0
    await orchestrator.watch.round()
    assert await orchestrator.get_agents() == []
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("pending", None)


async def test_an_agent_whose_control_queue_comes_back_within_the_grace_stays(setup) -> None:
    # Given an agent heard every 2 s, found gone by the broker after two missed
    # heartbeats (its connection is being re-established)
    orchestrator, clock, task_id = setup
    for _ in range(3):
        clock.now += 2
        await orchestrator.events.on_event(AgentHeartbeat(agent_id="worker", running=1))
    clock.now += 4.1
    await orchestrator.watch.round()

    # When its control queue is back within the grace
    _, subscription = await _listen(orchestrator, "worker")
    clock.now += 3.0
    await orchestrator.watch.round()
    await subscription.close()

    # Then it is still registered and its task still runs on it
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["worker"]
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("running", "worker")


async def test_queued_held_started_read_pending_assigned_running(setup) -> None:
    # Given a second task, queued: no agent holds it
    orchestrator, _, first = setup
    bus = orchestrator.bus
    heard, subscription = await _listen(orchestrator, "worker")
    task_id = await orchestrator.submit_task(name="t2", description="", task_type="j", payload={})
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("pending", None)

    # When an agent says it holds it, unstarted, then starts it
    await orchestrator.events.on_event(TaskAssigned(task_id=task_id, attempt=1, agent_id="worker"))
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("assigned", "worker")
    (agent,) = await orchestrator.get_agents()
    assert agent.current_load == 2  # it holds both: its prefetch is taken
    stats = await orchestrator.get_stats()  # pending_tasks counts pending and assigned
    assert (stats["pending_tasks"], stats["running_tasks"]) == (1, 1)
    await orchestrator.events.on_event(TaskStarted(task_id=task_id, attempt=1, agent_id="worker"))
    assert (await orchestrator.get_task_status(task_id))["status"] == "running"
    stats = await orchestrator.get_stats()
    assert (stats["pending_tasks"], stats["running_tasks"]) == (0, 2)

    # And a redelivery of an attempt that ended is refused, a live one confirmed
    assert await orchestrator.cancel_task(first)
    await orchestrator.events.on_event(
        TaskAssigned(task_id=first, attempt=1, agent_id="worker", confirm=True)
    )
    await orchestrator.events.on_event(
        TaskAssigned(task_id=task_id, attempt=1, agent_id="worker", confirm=True)
    )
    await bus.join()
    await subscription.close()
    kinds = [(c.kind, c.task_id) for c in heard if hasattr(c, "task_id")]
    assert ("control.cancel", first) in kinds
    assert ("control.proceed", task_id) in kinds
    assert ("control.proceed", first) not in kinds


async def test_an_agent_registered_but_never_heard_from_goes_offline(setup) -> None:
    # Given a live agent running one task, and one registered by API that no process runs
    orchestrator, clock, _ = setup
    await orchestrator.register_agent("ghost", ["gpu"], 4)
    assert (await orchestrator.get_stats())["overall_utilization"] == pytest.approx(1 / 6)

    # When a heartbeat timeout passes in which only the live one is heard
    clock.now += 15.1
    await orchestrator.events.on_event(AgentHeartbeat(agent_id="worker", running=1))
    await orchestrator.watch.round()

    # Then the ghost is gone, and the utilisation is the live agent's alone
    assert [a.agent_id for a in await orchestrator.get_agents()] == ["worker"]
    assert (await orchestrator.get_stats())["overall_utilization"] == 0.5


async def test_registering_a_live_agent_again_changes_its_queues_and_limit(setup) -> None:
    orchestrator, _, _ = setup
    await orchestrator.events.on_event(
        AgentAnnounced(
            agent_id="worker", capabilities=["gpu", "tpu"], max_concurrent_tasks=2, task_types=["*"]
        )
    )
    heard, subscription = await _listen(orchestrator, "worker")
    for capability in ("gpu", "tpu"):
        await orchestrator.submit_task(
            name="g", description="", task_type="j", payload={}, required_capabilities=[capability]
        )
    await orchestrator.register_agent("worker", ["gpu"], 7)
    await orchestrator.bus.join()
    await subscription.close()
    consume = [c for c in heard if c.kind == "control.consume"][-1]
    assert consume.max_concurrent_tasks == 7
    assert "j.gpu" in consume.queue_keys and "j.tpu" not in consume.queue_keys


async def test_an_attempt_started_again_and_again_without_a_final_event_fails(setup) -> None:
    # Given a running attempt whose message keeps coming back to agents that
    # die on it (each redelivery starts it on another agent)
    orchestrator, _, task_id = setup
    for i in range(orchestrator.settings.max_deliveries - 1):
        await orchestrator.events.on_event(
            TaskStarted(task_id=task_id, attempt=1, agent_id=f"doomed-{i}")
        )
    assert (await orchestrator.get_task_status(task_id))["status"] == "running"

    # When it starts once more than the bound allows
    await orchestrator.events.on_event(TaskStarted(task_id=task_id, attempt=1, agent_id="last"))

    # Then the task fails, saying why, instead of looping
    status = await orchestrator.get_task_status(task_id)
    assert status["status"] == "failed"
    assert "started 6 times without a final event" in status["error_message"]


async def test_a_copy_of_an_attempt_another_live_agent_runs_is_refused(setup) -> None:
    # Given an attempt running on a live agent, and a second live agent that
    # receives a copy of its message (a broker restart brought it back)
    orchestrator, _, task_id = setup
    await orchestrator.events.on_event(
        AgentAnnounced(agent_id="other", capabilities=[], max_concurrent_tasks=1, task_types=["*"])
    )
    heard, subscription = await _listen(orchestrator, "other")

    # When the second asks whether it may run it
    await orchestrator.events.on_event(
        TaskAssigned(task_id=task_id, attempt=1, agent_id="other", confirm=True)
    )
    await orchestrator.bus.join()

    # Then it hears nothing yet, and the task stays running on the first
    assert [c for c in heard if hasattr(c, "task_id")] == []
    status = await orchestrator.get_task_status(task_id)
    assert (status["status"], status["assigned_agent"]) == ("running", "worker")

    # When the first ends it, the copy is told to drop it
    await orchestrator.events.on_event(
        TaskFinished(task_id=task_id, attempt=1, agent_id="worker", outcome="completed")
    )
    await wait_until(_heard_about_a_task(heard), timeout=5)
    await subscription.close()
    assert [(c.kind, c.task_id) for c in heard if hasattr(c, "task_id")] == [
        ("control.cancel", task_id)
    ]


async def test_a_copy_waiting_for_its_holder_runs_once_the_holder_hands_it_back(setup) -> None:
    orchestrator, _, task_id = setup
    await orchestrator.events.on_event(
        AgentAnnounced(agent_id="other", capabilities=[], max_concurrent_tasks=1, task_types=["*"])
    )
    heard, subscription = await _listen(orchestrator, "other")
    await orchestrator.events.on_event(
        TaskAssigned(task_id=task_id, attempt=1, agent_id="other", confirm=True)
    )
    # the holder stops, handing its delivery back (its copy is the one waiting)
    await orchestrator.events.on_event(AgentLeft(agent_id="worker"))
    await wait_until(_heard_about_a_task(heard), timeout=5)
    await subscription.close()
    assert [(c.kind, c.task_id) for c in heard if hasattr(c, "task_id")] == [
        ("control.proceed", task_id)
    ]
