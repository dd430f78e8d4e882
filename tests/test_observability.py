"""What an operator sees of running processes: JSON logs that name their task, and an
agent's /metrics, /healthz and /readyz, from ``agent run`` as a process on the real broker."""

from __future__ import annotations

import json

import pytest

from broker import StatsRequest
from tests.brokers import free_port
from tests.conftest import require_broker
from tests.deployment import Deployment
from tests.harness import wait_until
from tests.test_metrics import http_get, samples

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def deployment(prefix: str):
    d = Deployment(prefix, require_broker())
    try:
        yield d
    finally:
        await d.close()


async def test_agent_run_logs_json_naming_tasks_and_serves_its_figures(
    deployment: Deployment,
) -> None:
    # Given serve, and an agent run with JSON logs and a metrics port
    await deployment.serve()
    port = free_port()
    await deployment.start(
        "observed", "agent", "run", "tests.agent_app:make_agent",
        "--log-format", "json", "--metrics-port", str(port),
        AGENT_ID="observed", AGENT_CAPABILITIES="observe",
    )  # fmt: skip
    deployment.queue_keys.add("observe")

    async def ready() -> bool:
        try:
            return (await http_get(port, "/readyz"))[0] == 200
        except OSError:
            return False

    await wait_until(ready, timeout=20, interval=0.1)

    # When two tasks complete and one fails (no retries) on it
    for payload in ('{"n": 1}', '{"n": 2}', '{"fail": "boom\\nforged line"}'):
        done = await deployment.run(
            "submit", "work", "-r", "observe", "-p", payload, "--max-retries", "0",
            "--wait", "--json",
        )  # fmt: skip
        assert done.out, done
    failed_id = json.loads(done.out)["task_id"]

    # Then its metrics count them as the orchestrator does, and it is live and ready
    status, text = await http_get(port, "/metrics")
    assert status == 200
    found = samples(text)
    me = ("agent_id", "observed")
    assert found[("agent_tasks_total", (me, ("outcome", "completed")))] == 2
    assert found[("agent_tasks_total", (me, ("outcome", "failed")))] == 1
    assert found[("agent_concurrency", (me,))] == 5
    assert await http_get(port, "/healthz") == (200, "ok\n")
    stats = await deployment.rpc(StatsRequest())
    assert stats["tasks_completed"] == 2 and stats["tasks_failed"] == 1

    # And every line it logged is one JSON object; the failure's names its task and agent
    assert await deployment.stop("observed") == 0
    lines = [line for line in deployment.log("observed").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"time", "level", "logger", "task_id", "agent_id", "message"} <= set(record)
    failure = [r for r in records if r["level"] == "WARNING" and r["task_id"] == failed_id]
    assert failure, records
    assert failure[0]["agent_id"] == "observed"
    assert "boom" in failure[0]["message"] or "boom" in failure[0].get("exc_info", "")


async def test_serve_metrics_agree_with_get_stats_and_a_standby_reads_ready(
    deployment: Deployment,
) -> None:
    # Given a leading serve and a standby, each with a metrics port, and an agent
    ports = {"serve": free_port(), "standby": free_port()}
    await deployment.start("serve", "serve", "--metrics-port", str(ports["serve"]))
    await wait_until(deployment.answers, timeout=30, interval=0.1)
    await deployment.start("standby", "serve", "--metrics-port", str(ports["standby"]))
    await deployment.agent("metered", "meter")

    # When tasks run, one of them failing
    for payload in ('{"n": 1}', '{"n": 2}', '{"n": 3}', '{"fail": "no"}'):
        done = await deployment.run(
            "submit", "work", "-r", "meter", "-p", payload, "--max-retries", "0", "--wait"
        )
        assert done.code in (0, 4), done  # 4: the task failed, as asked

    # Then the leader's scrape counts what get_stats counts
    status, text = await http_get(ports["serve"], "/metrics")
    assert status == 200
    found = samples(text)
    stats = await deployment.rpc(StatsRequest())
    assert found[("orchestrator_tasks_submitted_total", ())] == stats["tasks_created"] == 4
    assert found[("orchestrator_tasks", (("status", "completed"),))] == stats["tasks_completed"]
    assert found[("orchestrator_tasks", (("status", "failed"),))] == stats["tasks_failed"] == 1
    finished = found[
        ("orchestrator_tasks_finished_total", (("status", "completed"), ("task_type", "work")))
    ]
    assert finished == 3
    assert found[("orchestrator_leader", ())] == 1
    assert found[("orchestrator_agents", ())] == stats["registered_agents"]

    # And both read ready: the leader leading, the standby standing by
    assert await http_get(ports["serve"], "/readyz") == (
        200, f"leading on prefix {deployment.prefix!r}\n",
    )  # fmt: skip

    async def standby_ready() -> bool:
        try:
            return (await http_get(ports["standby"], "/readyz"))[0] == 200
        except OSError:
            return False

    await wait_until(standby_ready, timeout=20, interval=0.1)
    assert "standing by" in (await http_get(ports["standby"], "/readyz"))[1]
    standby = samples((await http_get(ports["standby"], "/metrics"))[1])
    assert standby.get(("orchestrator_leader", ()), 0) == 0
