"""Placement: a consumer priority per queue, from what the agent is to that queue's type.

The invariants of ``PlacementPolicy.consumer_priorities`` as properties, and
what a user sees on both buses: of two agents that can run a type's tasks,
the one specialised in the type gets them while it has a free slot, and the
other still gets them when it has none.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agents import TaskContext
from broker import MAX_CONSUMER_PRIORITY, ConsumeQueues, route_key
from orchestrator import TaskOrchestrator, TaskPriority
from orchestrator.models import AgentCapability, Task
from orchestrator.placement import PlacementPolicy, QueueSpec, wire_priorities
from tests.harness import Harness, running_on, wait_all, wait_until

TYPES = ("x", "y", "z")
CAPABILITIES = ("gpu", "pdf", "sql")

scores = st.floats(min_value=0.0, max_value=1.0)
capability_sets = st.sets(st.sampled_from(CAPABILITIES)).map(sorted)


@st.composite
def agents(draw: st.DrawFn) -> AgentCapability:
    agent = AgentCapability(
        draw(st.sampled_from(["a", "b"])),
        draw(capability_sets),
        performance_score=draw(scores),
        specialization_score=draw(st.dictionaries(st.sampled_from(TYPES), scores)),
    )
    agent.task_types = sorted(draw(st.sets(st.sampled_from((*TYPES, "*")))))
    return agent


@st.composite
def queue_sets(draw: st.DrawFn) -> dict[str, QueueSpec]:
    specs = draw(st.lists(st.builds(QueueSpec, st.sampled_from(TYPES), capability_sets.map(tuple))))
    return {route_key(s.task_type, s.capabilities): s for s in specs}


POLICY = PlacementPolicy()


@given(agents(), queue_sets())
def test_priorities_are_bounded_and_only_for_queues_the_agent_can_run(
    agent: AgentCapability, queues: dict[str, QueueSpec]
) -> None:
    priorities = POLICY.consumer_priorities(agent, queues)
    assert set(priorities) == set(POLICY.queues_for(agent, queues))
    assert all(0 <= p <= MAX_CONSUMER_PRIORITY for p in priorities.values())


@given(agents(), queue_sets())
def test_a_named_types_queue_ranks_above_every_catch_all_queue_of_the_agent(
    agent: AgentCapability, queues: dict[str, QueueSpec]
) -> None:
    priorities = POLICY.consumer_priorities(agent, queues)
    types = agent.task_types or []
    named = [p for k, p in priorities.items() if queues[k].task_type in types]
    caught = [p for k, p in priorities.items() if queues[k].task_type not in types]
    if named and caught:
        assert min(named) > max(caught)


@given(agents(), st.sampled_from(TYPES), capability_sets, scores, scores)
def test_priority_never_falls_as_specialization_in_the_type_rises(
    agent: AgentCapability, task_type: str, caps: list[str], low: float, high: float
) -> None:
    # Given a queue of one type, and the agent's record in that type at two levels
    low, high = sorted((low, high))
    queue = {route_key(task_type, caps): QueueSpec(task_type, tuple(caps))}

    def priority_at(score: float) -> int | None:
        agent.specialization_score[task_type] = score
        return POLICY.consumer_priorities(agent, queue).get(next(iter(queue)))

    # Then the better record never ranks the agent lower on it
    at_low, at_high = priority_at(low), priority_at(high)
    if at_low is not None:
        assert at_high is not None and at_high >= at_low


@given(agents(), agents(), st.sampled_from(TYPES))
def test_an_agent_naming_the_type_outranks_one_that_only_catches_all(
    one: AgentCapability, other: AgentCapability, task_type: str
) -> None:
    # Given a queue of the type that one agent names and the other only catches with '*'
    one.capabilities = other.capabilities = []
    one.task_types = [task_type]
    other.task_types = ["*"]
    queue = {route_key(task_type, []): QueueSpec(task_type, ())}

    # Then the one that names it ranks higher, whatever their scores
    (named,) = POLICY.consumer_priorities(one, queue).values()
    (caught,) = POLICY.consumer_priorities(other, queue).values()
    assert named > caught


@given(agents(), queue_sets(), st.sampled_from(TYPES), st.booleans())
def test_an_outcome_reports_exactly_the_priorities_it_changed(
    agent: AgentCapability, queues: dict[str, QueueSpec], task_type: str, success: bool
) -> None:
    before = POLICY.consumer_priorities(agent, queues)
    task = Task("t", "t", "", task_type, TaskPriority.MEDIUM, {})
    changed = POLICY.record_outcome(agent, task, success, queues)
    after = POLICY.consumer_priorities(agent, queues)
    assert changed == {k: p for k, p in after.items() if before[k] != p}


@given(
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(-5, 2 * MAX_CONSUMER_PRIORITY)),
    st.integers(0, 10),
)
def test_priorities_travel_compactly_and_read_back_bounded(
    priorities: dict[str, int], base: int
) -> None:
    # Given a policy's priorities, cut to what a command carries
    keys = list(priorities)
    default, exceptions = wire_priorities(keys, priorities, base)
    command = ConsumeQueues(queue_keys=keys, consumer_priority=default, priorities=exceptions)

    # Then the agent reads back each queue's number, within bounds
    for key, priority in priorities.items():
        assert command.priority_of(key) == max(0, min(MAX_CONSUMER_PRIORITY, priority))


# --- on both buses -------------------------------------------------------------------


class Gate:
    """Tasks that hold their agent's slot until released."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def handler(self, ctx: TaskContext) -> dict[str, Any]:
        if ctx.payload.get("hold"):
            await self.open.wait()
        return {"agent": ctx.agent_id}


async def submit(orchestrator: TaskOrchestrator, hold: bool = True) -> str:
    return await orchestrator.submit_task(
        name="x", description="", task_type="x", payload={"hold": hold}
    )


async def consumes(agent: Any, key: str) -> bool:
    return key in agent.consumer_priorities


async def first_preferred_then_other(
    orchestrator: TaskOrchestrator, preferred: str, other: str
) -> list[str]:
    """Three held tasks, one after another: the first two on ``preferred``
    (two free slots), the third on ``other`` (``preferred`` is full)."""
    held = []
    for agent_id in (preferred, preferred, other):
        held.append(await submit(orchestrator))
        await wait_until(lambda t=held[-1], a=agent_id: running_on(orchestrator, t, a), 20)
    return held


async def test_a_specialist_in_a_type_gets_its_tasks_first_a_generalist_when_it_is_busy(
    harness: Harness,
) -> None:
    # Given two agents with handlers for type x and two slots each, one of
    # them announcing itself a specialist in x
    orchestrator = await harness.start_orchestrator()
    gate = Gate()
    generalist = await harness.start_agent("generalist", [], 2, gate.handler, task_type="x")
    specialist = await harness.start_agent(
        "specialist", [], 2, gate.handler, task_type="x", specialization={"x": 0.9}
    )
    key = route_key("x", [])
    await wait_all(orchestrator, [await submit(orchestrator, hold=False)])
    await wait_until(lambda: consumes(specialist, key))
    await wait_until(lambda: consumes(generalist, key))
    assert specialist.consumer_priorities[key] > generalist.consumer_priorities[key]

    # When tasks of type x come one after another, each held running
    # Then the specialist runs the first two, the generalist the third
    held = await first_preferred_then_other(orchestrator, "specialist", "generalist")
    gate.open.set()
    await wait_all(orchestrator, held)


async def test_running_tasks_of_a_type_makes_a_specialist_in_it(harness: Harness) -> None:
    # Given an agent with a handler for type x that ran eight x tasks alone
    orchestrator = await harness.start_orchestrator()
    gate = Gate()
    veteran = await harness.start_agent("veteran", [], 2, gate.handler, task_type="x")
    key = route_key("x", [])
    await wait_all(orchestrator, [await submit(orchestrator, hold=False) for _ in range(8)])
    (record,) = [a for a in await orchestrator.get_agents() if a.agent_id == "veteran"]
    assert record.specialization_score["x"] > 0.75
    await wait_until(lambda: consumes(veteran, key))

    # And a newcomer with a handler for x, no record in it
    newcomer = await harness.start_agent("newcomer", [], 2, gate.handler, task_type="x")
    await wait_until(lambda: consumes(newcomer, key))

    async def ranked() -> bool:  # the veteran's new priority travels to it after its outcome
        return veteran.consumer_priorities[key] > newcomer.consumer_priorities[key]

    await wait_until(ranked)

    # When tasks of type x come one after another, each held running
    # Then the veteran runs the first two, the newcomer the third
    held = await first_preferred_then_other(orchestrator, "veteran", "newcomer")
    gate.open.set()
    await wait_all(orchestrator, held)


async def test_an_agent_naming_a_type_gets_its_tasks_before_a_catch_all_agent(
    harness: Harness,
) -> None:
    # Given an agent with a catch-all handler and one with a handler for type x
    orchestrator = await harness.start_orchestrator()
    gate = Gate()
    catch_all = await harness.start_agent("catch-all", [], 2, gate.handler, task_type="*")
    named = await harness.start_agent("named", [], 2, gate.handler, task_type="x")
    key = route_key("x", [])
    await wait_all(orchestrator, [await submit(orchestrator, hold=False)])
    await wait_until(lambda: consumes(catch_all, key))
    await wait_until(lambda: consumes(named, key))

    # When tasks of type x come one after another, each held running
    # Then the named handler's agent runs the first two, the catch-all the third
    held = await first_preferred_then_other(orchestrator, "named", "catch-all")
    gate.open.set()
    await wait_all(orchestrator, held)
