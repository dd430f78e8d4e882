"""Task messages that come again: nothing runs twice, nothing loops.

A message the broker marks redelivered may be of an attempt that ended
already (its acknowledgement lost with a link, or brought back by a broker
that crashed). An agent that reported it acknowledges it at once; any other
agent asks the orchestrator first (``TaskAssigned`` with ``confirm``) and
runs it only on a ``ProceedTask``. A first delivery asks nothing. And an
attempt that keeps coming back without a final event is dead-lettered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agents import Agent, TaskContext
from broker import BusConnectionError, CommunicationBus, TaskDelivery, TaskFinished, TaskMessage
from tests.agent_desk import Desk
from tests.harness import Harness, wait_until

WAIT = 60


async def _agent(harness: Harness, agent_id: str, handler: Any, bus: Any = None) -> Agent:
    agent = Agent(agent_id, ["work"], 1, heartbeat_interval=0.3)
    agent.add_handler("*", handler)
    await agent.start(bus or harness.new_bus())
    harness.agents.append(agent)
    return agent


async def _bring_back(harness: Harness, desk: Desk, *messages: TaskMessage) -> None:
    """Put ``messages`` in the queue again, marked redelivered: a consumer that
    outranks the agents takes them, and goes away without settling them (the
    broker gives them back as it does a lost channel's)."""
    bus = await harness.connected_bus()
    taken: list[TaskDelivery] = []
    all_taken = asyncio.Event()

    async def take(delivery: TaskDelivery) -> None:
        taken.append(delivery)  # held, never settled
        if len(taken) == len(messages):
            all_taken.set()

    thief = await bus.open_task_consumer("thief", prefetch=len(messages), handler=take)
    await thief.consume([desk.key], consumer_priority=100)
    for message in messages:
        await desk.publish(message)
    await asyncio.wait_for(all_taken.wait(), WAIT)
    await thief.close()


async def _settled(agent: Agent) -> bool:
    return agent.unsettled == 0 and not agent.held_attempts


def _recording(runs: list[str]) -> Any:
    async def handler(ctx: TaskContext) -> dict:
        runs.append(ctx.task_id)
        return {"agent": ctx.agent_id}

    return handler


async def test_a_redelivery_of_an_attempt_reported_here_is_acknowledged_without_running(
    harness: Harness,
) -> None:
    # Given an agent with one slot that has run and reported a task
    desk = await Desk(harness).open()
    runs: list[str] = []
    agent = await _agent(harness, "worker", _recording(runs))
    await desk.consume("worker")
    done = await desk.publish(desk.message())
    await desk.wait_for(lambda: desk.finished(done.task_id))

    # When its message comes again, redelivered (its ack lost, or a broker
    # crash brought it back), with one more task behind it
    await _bring_back(harness, desk, done)
    probe = await desk.publish(desk.message())
    await desk.wait_for(lambda: desk.finished(probe.task_id))

    # Then it was acknowledged without running, and without asking anyone;
    # nor did the first deliveries ask (no round trip for those)
    assert runs == [done.task_id, probe.task_id]
    assert len(desk.started(done.task_id)) == 1
    assert desk.assigned() == []
    assert agent.counters.received == 2
    await wait_until(lambda: _settled(agent), WAIT)


@pytest.mark.parametrize("word", ["proceed", "cancel"])
async def test_a_redelivery_new_to_its_agent_runs_only_on_the_orchestrators_word(
    harness: Harness, word: str
) -> None:
    # Given a task that an agent "first" ran and reported, and that agent gone;
    # and a second task that nobody ran
    desk = await Desk(harness).open()
    first = await _agent(harness, "first", _recording([]))
    await desk.consume("first")
    done = await desk.publish(desk.message())
    await desk.wait_for(lambda: desk.finished(done.task_id))
    await first.stop(drain_timeout=1)
    fresh = desk.message()
    # (the orchestrator says: the first has ended, the second is live)
    desk.answer = lambda event: event.task_id == fresh.task_id and word == "proceed"

    # When both come again, redelivered, to an agent that knows neither
    runs: list[str] = []
    second = await _agent(harness, "second", _recording(runs))
    await _bring_back(harness, desk, done, fresh)
    await desk.consume("second")
    probe = await desk.publish(desk.message())
    await desk.wait_for(lambda: desk.finished(probe.task_id))

    # Then it asked about each before running it, and ran only what it was told to
    asked = [(e.task_id, e.agent_id, e.confirm) for e in desk.assigned()]
    assert asked == [(done.task_id, "second", True), (fresh.task_id, "second", True)]
    expected = [fresh.task_id, probe.task_id] if word == "proceed" else [probe.task_id]
    assert runs == expected
    assert desk.started(done.task_id)[0].agent_id == "first"
    assert len(desk.started(done.task_id)) == 1
    if word == "proceed":
        order = [(type(e).__name__, e.task_id) for e in desk.events if hasattr(e, "task_id")]
        assert order.index(("TaskAssigned", fresh.task_id)) < order.index(
            ("TaskStarted", fresh.task_id)
        )
    await wait_until(lambda: _settled(second), WAIT)


async def test_a_redelivery_waiting_for_the_word_is_held_and_given_back_if_its_agent_stops(
    harness: Harness,
) -> None:
    # Given an orchestrator that does not answer (it is down), and a redelivered
    # message new to the agent that gets it
    desk = await Desk(harness).open()
    desk.answer = lambda event: None
    first_runs: list[str] = []
    first = await _agent(harness, "first", _recording(first_runs))
    message = desk.message()
    await _bring_back(harness, desk, message)
    await desk.consume("first")

    # When it asked, it holds the message without running it
    await desk.wait_for(lambda: desk.assigned(message.task_id))
    assert first.unsettled == 1 and first_runs == []

    # And when it stops meanwhile, the message goes back to its queue, for the
    # next agent (which asks too, and runs it on the word)
    await first.stop(drain_timeout=1)
    desk.answer = lambda event: True
    runs: list[str] = []
    await _agent(harness, "second", _recording(runs))
    await desk.consume("second")
    await desk.wait_for(lambda: desk.finished(message.task_id))
    assert runs == [message.task_id] and first_runs == []
    assert [e.agent_id for e in desk.assigned(message.task_id)] == ["first", "second"]


class _FinalEventsLost:
    """An agent's bus on which no ``TaskFinished`` ever goes out."""

    def __init__(self, bus: CommunicationBus) -> None:
        self._bus = bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def publish_event(self, event: Any) -> None:
        if isinstance(event, TaskFinished):
            raise BusConnectionError("injected: the final event was not confirmed")
        await self._bus.publish_event(event)


async def test_an_attempt_coming_back_again_and_again_without_a_final_event_is_dead_lettered(
    harness: Harness,
) -> None:
    # Given an agent whose final events never go out (each run is given back)
    desk = await Desk(harness).open()
    runs: list[int] = []

    async def handler(ctx: TaskContext) -> dict:
        runs.append(ctx.attempt)
        return {}

    bus = await harness.connected_bus()
    agent = await _agent(harness, "worker", handler, _FinalEventsLost(bus))
    await desk.consume("worker")

    # When a task is delivered to it
    message = await desk.publish(desk.message())

    # Then it runs once, and again for each of 5 redeliveries (the orchestrator
    # letting each go ahead), and the next one is dead-lettered with a reason
    [letter] = await desk.wait_for(lambda: desk.dead, timeout=30)
    assert runs == [1] * 6
    assert letter.task_id == message.task_id and letter.attempt == 1
    assert "delivered again 6 times without a final event (at most 5)" in letter.reason
    assert letter.reason.startswith("agent worker:")
    assert len(desk.assigned(message.task_id)) == 5
    await wait_until(lambda: _settled(agent), WAIT)
