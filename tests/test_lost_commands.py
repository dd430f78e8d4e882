"""A command that never reaches its agent is repaired by the agent's heartbeat.

Commands are fire-and-forget: one published while an agent's control queue
has no binding (declared again after a reconnect, its bindings not back yet)
is dropped by the broker. The agent's heartbeats list the attempts it runs;
the orchestrator cancels again those that ended or were superseded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from agents import TaskContext
from broker import HELD_IN_HEARTBEAT, AgentHeartbeat, CancelTask
from orchestrator import TaskOrchestrator
from orchestrator.events import RECANCELS
from tests.harness import Harness, running_on, wait_until

WAIT = 60


async def _submit(orchestrator: TaskOrchestrator, name: str, **kwargs: Any) -> str:
    return await orchestrator.submit_task(
        name=name, description="", task_type="job", payload={},
        required_capabilities=["work"], **kwargs,
    )  # fmt: skip


@contextlib.contextmanager
def _cancels_lost(harness: Harness) -> Iterator[None]:
    """While inside, the orchestrator's cancels vanish on their way, as one
    published while the agent's control queue has no binding yet does (an
    exclusive queue's bindings cannot be removed from another connection, so
    the test drops them at the orchestrator's end, on either bus)."""
    orchestrator = harness.orchestrator
    assert orchestrator is not None
    bus: Any = orchestrator.bus
    real = bus.publish_control

    async def lost(command: Any, *, agent_id: str | None = None) -> None:
        if not isinstance(command, CancelTask):
            await real(command, agent_id=agent_id)

    bus.publish_control = lost
    try:
        yield
    finally:
        del bus.publish_control


async def test_a_cancel_lost_on_its_way_stops_the_handler_at_the_next_heartbeat(
    harness: Harness,
) -> None:
    # Given a task whose handler runs until it is cancelled (its timeout far off)
    orchestrator = await harness.start_orchestrator()
    stopped = asyncio.Event()

    async def until_cancelled(ctx: TaskContext) -> dict[str, Any]:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        return {}

    agent = await harness.start_agent("worker", ["work"], 1, until_cancelled)
    task_id = await _submit(orchestrator, "long", timeout=600, max_retries=0)
    await wait_until(lambda: running_on(orchestrator, task_id, "worker"), WAIT)

    # When it is cancelled while the agent's commands are lost
    with _cancels_lost(harness):
        assert await orchestrator.cancel_task(task_id) is True

    # Then a heartbeat later the handler is stopped, and the task stays cancelled
    await asyncio.wait_for(stopped.wait(), WAIT)
    assert (await orchestrator.get_task_status(task_id))["status"] == "cancelled"

    async def settled() -> bool:
        return agent.counters.running == 0

    await wait_until(settled, WAIT)


async def test_a_heartbeat_listing_what_it_likes_is_not_amplified(harness: Harness) -> None:
    # Given a registered agent and two finished tasks
    orchestrator = await harness.start_orchestrator()
    await harness.start_agent("worker", ["work"], 1)
    done, marker = [await _submit(orchestrator, name) for name in ("done", "marker")]
    for task_id in (done, marker):
        assert (await orchestrator.wait_for_task(task_id, WAIT))["status"] == "completed"
    bus: Any = orchestrator.bus
    real, sent = bus.publish_control, []

    async def counted(command: Any, *, agent_id: str | None = None) -> None:
        sent.append(command)
        await real(command, agent_id=agent_id)

    bus.publish_control = counted

    # When heartbeats in its name (its broker user's) list the first one and
    # as many unknown ids as a heartbeat may carry, again and again, and then
    # one lists the other (heartbeats are read in order: once that one is
    # answered, all were read)
    holding = [(done, 1)] + [(f"task_{n}", 1) for n in range(HELD_IN_HEARTBEAT - 1)]
    publisher = await harness.connected_bus()
    for _ in range(10):
        await publisher.publish_event(AgentHeartbeat(agent_id="worker", running=1, holding=holding))
    await publisher.publish_event(
        AgentHeartbeat(agent_id="worker", running=1, holding=[(marker, 1)])
    )

    async def all_read() -> bool:
        return any(isinstance(c, CancelTask) and c.task_id == marker for c in sent)

    await wait_until(all_read, WAIT)

    # Then the first was cancelled again a few times in all, the unknown ones never
    cancels = [c.task_id for c in sent if isinstance(c, CancelTask) and c.task_id != marker]
    assert cancels == [done] * RECANCELS
    del bus.publish_control
