"""Fault test: the broker restarts under load; no submitted task is lost.

The broker is a private node of the tests' own (the ``fault`` marker), never
the shared one, so its restart disturbs no other test or process.
"""

from __future__ import annotations

import asyncio

import pytest

from agents import TaskContext
from tests.brokers import RabbitMQNode
from tests.harness import Harness, wait_all

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True),
]


async def test_broker_restart_loses_no_task(
    harness: Harness, private_rabbitmq: RabbitMQNode
) -> None:
    assert harness.settings.broker_url == private_rabbitmq.url

    # Given an orchestrator, an agent in-process and one in its own process
    orchestrator = await harness.start_orchestrator()

    async def work(ctx: TaskContext) -> dict:
        await asyncio.sleep(0.05)
        return {"echo": ctx.payload}  # as tests/agent_app.py answers

    await harness.start_agent("inproc", ["work"], 4, work)
    harness.spawn_agent("process", ["work"], AGENT_MAX=4, AGENT_SLEEP=0.05)
    await harness.wait_agents("process")

    refused = 0

    async def submit(start: int, n: int) -> list[str]:
        """Submit as a client would: a submit refused while the broker is away
        (ConnectionError, nothing accepted) is tried again."""
        nonlocal refused
        ids = []
        for i in range(start, start + n):
            while True:
                try:
                    ids.append(
                        await orchestrator.submit_task(
                            name=f"t{i}",
                            description="",
                            task_type="job",
                            payload={"i": i},
                            required_capabilities=["work"],
                        )
                    )
                    break
                except ConnectionError:
                    refused += 1
        return ids

    # When tasks are queued and running and the broker restarts
    before = await submit(0, 40)
    # (stop_app and start_app: every connection drops, durable queues and
    # persistent messages stay)
    restart = asyncio.ensure_future(asyncio.to_thread(private_rabbitmq.restart_app))
    # while more are submitted (those caught by the outage wait for the reconnect,
    # up to submit_timeout, or are refused and submitted again)
    after = await submit(40, 20)
    await restart

    # Then every task completes with its own result
    statuses = await wait_all(orchestrator, before + after, timeout=120)
    assert [s["status"] for s in statuses] == ["completed"] * 60
    assert sorted(s["result"]["echo"]["i"] for s in statuses) == list(range(60))
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == 60 and stats["running_tasks"] == 0
    assert stats["tasks_created"] == 60, f"a refused submit left a trace ({refused} refused)"
    assert stats["registered_agents"] == 2
