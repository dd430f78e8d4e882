"""A task reaches only an agent that can run it: a handler for its type, and its capabilities.

The seed's complex workflow, tried as a new user would with the three
example agents and no ``required_capabilities``, used to hand trading tasks
to the analyst, which failed them ("no handler for task_type") and lost
score for work it could never do. The task type is part of the queue's key
now (see ``broker.route_key``), so the broker hands a task only to the
agents that handle its type.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from agents import TaskContext
from tests.harness import Harness, wait_all, wait_until


async def _by(role: str, ctx: TaskContext) -> dict:
    await asyncio.sleep(0.01)
    return {"by": role, "type": ctx.task_type}


async def test_each_task_type_runs_only_on_the_agent_with_its_handler(harness: Harness) -> None:
    # Given the three example agents, each with a handler for one type only
    orchestrator = await harness.start_orchestrator()
    for role, task_type in (
        ("analyst", "analysis"),
        ("risk", "risk_analysis"),
        ("trader", "trading"),
    ):

        async def handler(ctx: TaskContext, role: str = role) -> dict:
            return await _by(role, ctx)

        await harness.start_agent(role, ["some_skill"], 3, handler, task_type=task_type)

    # When 20 tasks of each type are submitted at once, needing no capability,
    # and none may be retried
    types = {"analysis": "analyst", "risk_analysis": "risk", "trading": "trader"}
    ids = {
        t: [
            await orchestrator.submit_task(
                name=f"{t}-{i}", description="", task_type=t, payload={}, max_retries=0
            )
            for i in range(20)
        ]
        for t in types
    }

    # Then every one completed on the agent that handles its type, first time
    for task_type, role in types.items():
        statuses = await wait_all(orchestrator, ids[task_type], timeout=60)
        assert {s["status"] for s in statuses} == {"completed"}
        assert {s["assigned_agent"] for s in statuses} == {role}
        assert {s["retry_count"] for s in statuses} == {0}
    # and no agent lost score for work it could not do
    assert {a.performance_score for a in await orchestrator.get_agents()} == {1.0}


async def test_a_task_nobody_can_run_waits_pending_until_a_capable_agent_comes(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an agent with a handler for "report" only, and another with the
    # right capability but no such handler
    caplog.set_level(logging.WARNING, logger="orchestrator")
    orchestrator = await harness.start_orchestrator()
    await harness.start_agent("reporter", [], 2, task_type="report")
    await harness.start_agent("gpu-box", ["gpu"], 2, task_type="report")

    # When tasks are submitted that nobody can run: a type nobody handles, and
    # a capability no agent with the handler has
    render = [
        await orchestrator.submit_task(name=f"r{i}", description="", task_type="render", payload={})
        for i in range(2)
    ]
    pdf = await orchestrator.submit_task(
        name="pdf", description="", task_type="report", payload={}, required_capabilities=["pdf"]
    )

    # Then they wait pending, held by no agent, each queue warned of once,
    # naming the handler or the capability missing
    for task_id in (*render, pdf):
        status = await orchestrator.get_task_status(task_id)
        assert (status["status"], status["assigned_agent"]) == ("pending", None)
    warnings = [
        r.getMessage() for r in caplog.records if "wait for a capable agent" in r.getMessage()
    ]
    assert len(warnings) == 2, warnings
    assert any("handler for task_type 'render'" in w for w in warnings)
    assert any("capabilities pdf" in w for w in warnings)

    # When an agent that can run them starts, they run there
    await harness.start_agent("renderer", [], 2, task_type="render")
    await harness.start_agent("pdf-maker", ["pdf"], 1, task_type="*")
    statuses = await wait_all(orchestrator, [*render, pdf], timeout=30)
    assert [s["assigned_agent"] for s in statuses] == ["renderer", "renderer", "pdf-maker"]


async def test_an_agent_with_a_catch_all_handler_takes_every_type(harness: Harness) -> None:
    orchestrator = await harness.start_orchestrator()
    await harness.start_agent("generalist", [], 4)  # the harness's default handler is '*'
    ids = [
        await orchestrator.submit_task(name=t, description="", task_type=t, payload={})
        for t in ("a", "b.c", "with spaces", "x" * 150)
    ]
    statuses = await wait_all(orchestrator, ids, timeout=30)
    assert {s["status"] for s in statuses} == {"completed"}

    async def four_queues() -> bool:
        return len(await orchestrator.get_queues()) == 4

    await wait_until(four_queues, timeout=5)


async def test_the_longest_names_allowed_route_and_run(harness: Harness) -> None:
    # Given an agent whose id, task type and capabilities are as long as allowed
    # (its consumer tag names its id and the queue key: past AMQP's 255 bytes
    # the broker would refuse the consume)
    orchestrator = await harness.start_orchestrator()
    agent_id, task_type = "a" * 128, "t" * 64
    capabilities = [c * 56 for c in "xyz"]  # a capability key of 170 characters
    await harness.start_agent(agent_id, capabilities, 1, task_type=task_type)

    # When a task needing all of them is submitted, it runs there
    task_id = await orchestrator.submit_task(
        name="long", description="", task_type=task_type, payload={},
        required_capabilities=capabilities,
    )  # fmt: skip
    status = await orchestrator.wait_for_task(task_id, 60)
    assert (status["status"], status["assigned_agent"]) == ("completed", agent_id)


async def test_a_task_needing_part_of_a_long_capability_set_runs(harness: Harness) -> None:
    # Given an agent with twenty capabilities (any large part of them is a
    # digest key, which the agent cannot read back by itself)
    orchestrator = await harness.start_orchestrator()
    capabilities = [f"capability-{n:03d}" for n in range(20)]
    await harness.start_agent("worker", capabilities, 1)

    # When a task needs all but one of them, it runs there
    task_id = await orchestrator.submit_task(
        name="part", description="", task_type="job", payload={},
        required_capabilities=capabilities[:-1],
    )  # fmt: skip
    status = await orchestrator.wait_for_task(task_id, 60)
    assert (status["status"], status["assigned_agent"]) == ("completed", "worker")
