"""Fault test: the real broker restarts under load; no submitted task is lost."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from agents import TaskContext
from tests.harness import Harness, wait_all

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True),
]


def restart_broker_app() -> None:
    """Stop and start the RabbitMQ application: every connection drops, durable
    queues and persistent messages stay."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True, timeout=120)


async def test_broker_restart_loses_no_task(harness: Harness) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available to restart the broker")

    # Given an orchestrator, an agent in-process and one in its own process
    orchestrator = await harness.start_orchestrator()

    async def work(ctx: TaskContext) -> dict:
        await asyncio.sleep(0.05)
        return {"echo": ctx.payload}  # as tests/agent_app.py answers

    await harness.start_agent("inproc", ["work"], 4, work)
    harness.spawn_agent("process", ["work"], AGENT_MAX=4, AGENT_SLEEP=0.05)
    await harness.wait_agents("process")

    async def submit(start: int, n: int) -> list[str]:
        return [
            await orchestrator.submit_task(
                name=f"t{i}",
                description="",
                task_type="job",
                payload={"i": i},
                required_capabilities=["work"],
            )
            for i in range(start, start + n)
        ]

    # When tasks are queued and running and the broker restarts
    before = await submit(0, 40)
    restart = asyncio.ensure_future(asyncio.to_thread(restart_broker_app))
    # while more are submitted (those caught by the outage wait for the reconnect)
    after = await submit(40, 20)
    await restart

    # Then every task completes with its own result
    statuses = await wait_all(orchestrator, before + after, timeout=120)
    assert [s["status"] for s in statuses] == ["completed"] * 60
    assert sorted(s["result"]["echo"]["i"] for s in statuses) == list(range(60))
    stats = await orchestrator.get_stats()
    assert stats["tasks_completed"] == 60 and stats["running_tasks"] == 0
    assert stats["registered_agents"] == 2
