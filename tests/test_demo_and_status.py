"""What ``demo`` prints and who can follow it, and what ``status`` shows (issue 10, item 7).

``demo`` prints each task's result as JSON; on a broker, ``--prefix`` names
its prefix and keeps its queues, so that ``orchestrator watch`` of that
prefix follows the next run. ``status`` shows when a task completed and the
traceback of its last failure as the agent sent it, escaped like every field.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from typing import Any

import aio_pika
import pytest

from broker import BusSettings, RabbitMQBus, Reply, TaskStatusRequest
from tests.conftest import require_broker
from tests.deployment import ROOT, Deployment, base_env, management_api, run
from tests.harness import wait_until

TASK_LINE = re.compile(r"^  (?P<name>.{16}) (?P<status>\S+) +on (?P<agent>\S+) +(?P<outcome>.+)$")


async def test_demo_prints_each_result_as_json() -> None:
    # When the README's demo runs in-process
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "demo", "--workflows", "1",
        cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()

    # Then each task's line ends with its result as JSON, not a Python repr
    lines = [m for m in map(TASK_LINE.match, out.decode().splitlines()) if m]
    assert [m["name"].strip() for m in lines] == [
        "Market Analysis",
        "Risk Assessment",
        "Execute Trade",
    ]
    results = [json.loads(m["outcome"]) for m in lines]
    assert results[0]["symbol"] == "BTC" and results[0]["trend"] == "up"
    assert results[1]["approved"] is True
    assert set(results[2]) == {"order_id", "filled"}


async def test_demo_takes_a_prefix_only_with_a_broker() -> None:
    result = await run("demo", "--prefix", "mine")
    assert result.code == 1, result
    assert result.error == (
        "error: --prefix: only with --broker (in-process there is nothing to follow)"
    )


async def _exchange_exists(url: str, name: str) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


@pytest.mark.rabbitmq
async def test_demo_on_a_broker_with_a_prefix_can_be_followed_by_watch(prefix: str) -> None:
    broker = require_broker()
    api = management_api(broker)
    deployment = Deployment(prefix, broker)  # stops the watch, deletes the prefix's queues
    try:
        # Given a demo run on the broker under a prefix of the user's choice
        first = await run("demo", "--workflows", "1", "--broker", broker, "--prefix", prefix)
        assert first.code == 0, first
        assert f"(prefix {prefix})" in first.out
        assert f"orchestrator watch --prefix {prefix}" in first.out
        # Then its queues are kept for the next run
        assert await _exchange_exists(broker, f"{prefix}.events")

        # When a user watches that prefix, and the demo runs again
        watch = await deployment.start("watch", "watch", "--refresh", "0.2")

        async def watch_is_bound() -> bool:
            assert watch.returncode is None, deployment.log("watch")
            status, bindings = api.call(
                "GET", f"/api/exchanges/%2F/{prefix}.events/bindings/source"
            )
            return status == 200 and bool(bindings)

        await wait_until(watch_is_bound, timeout=30, interval=0.1)
        again = await run("demo", "--workflows", "1", "--broker", broker, "--prefix", prefix)
        assert again.code == 0, again
        assert await deployment.stop("watch") == 0, deployment.log("watch")

        # Then the watch saw the demo's tasks run on its agents
        seen = deployment.log("watch")
        for agent in ("analysis_agent_1", "risk_agent_1", "trading_agent_1"):
            assert f"completed on {agent}" in seen, seen
    finally:
        deployment.queue_keys.update(_task_queue_keys(api, prefix))
        await deployment.close()


def _task_queue_keys(api: Any, prefix: str) -> set[str]:
    """The keys of the prefix's task queues on the broker, to delete them."""
    status, queues = api.call("GET", "/api/queues/%2F?columns=name")
    assert status == 200, queues
    start = f"{prefix}.tasks."
    return {q["name"][len(start) :] for q in queues if q["name"].startswith(start)}


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "agents/work.py", line 12, in analyse\n'
    '    raise ValueError("[bold]no data[/bold] for BTC")\n'
    "ValueError: [bold]no data[/bold] for BTC\n"
)


@pytest.mark.rabbitmq
async def test_status_shows_completed_at_and_the_traceback_as_it_is(prefix: str) -> None:
    # Given a service on the prefix whose status of a task has a traceback
    broker = require_broker()
    status: dict[str, Any] = {
        "task_id": "task_1", "name": "BTC Analysis", "status": "failed",
        "assigned_agent": "analysis_agent_1", "created_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.0, "completed_at": 1_700_000_002.0, "priority": "high",
        "progress": 0.5, "result": None, "error_message": "ValueError: [bold]no data[/bold]",
        "retry_count": 3, "traceback": TRACEBACK,
    }  # fmt: skip

    async def answer(request: Any) -> Reply:
        if isinstance(request, TaskStatusRequest) and request.task_id == "task_1":
            return Reply.success(status)
        return Reply.failure("not_found", "task_id: unknown task")

    server = RabbitMQBus(settings=BusSettings(broker_url=broker, prefix=prefix))
    await server.connect()
    try:
        await server.serve_requests(answer)

        # When a user asks for the task's status
        env = base_env(ORCHESTRATOR_BROKER_URL=broker, ORCHESTRATOR_PREFIX=prefix)
        result = await run("status", "task_1", env=env)
        as_json = await run("status", "task_1", "--json", env=env)
    finally:
        await server.delete_topology([])
        await server.close()

    # Then the table shows when it completed, and below it the traceback, every line
    # and indent as it was, the markup-like text as text
    assert result.code == 0, result
    assert re.search(r"completed_at +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result.out), result.out
    assert "ValueError: [bold]no data[/bold]" in result.out
    assert f"traceback:\n{TRACEBACK}" in result.out, result.out
    # And --json gives it as it is
    assert json.loads(as_json.out)["traceback"] == TRACEBACK
