"""What an operator sees of running processes: JSON logs that name their task, and an
agent's /metrics, /healthz and /readyz, from ``agent run`` as a process on the real broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile

import pytest

from broker import AgentsRequest, StatsRequest
from tests.brokers import free_port
from tests.deployment import ROOT, Deployment
from tests.harness import wait_until
from tests.test_metrics import http_get, samples

pytestmark = pytest.mark.rabbitmq


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


LOG_KEYS = {"time", "level", "logger", "task_id", "agent_id", "message"}


def json_records(text: str) -> list[dict]:
    """Every line of a process's output, each one JSON object with the issue's keys."""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        assert LOG_KEYS <= set(record), record
    return records


async def test_serve_and_python_m_agents_log_json_naming_their_tasks(
    deployment: Deployment,
) -> None:
    # Given serve with JSON logs, and an agent run by `python -m agents` with JSON logs
    await deployment.start("serve", "serve", "--log-format", "json")
    await wait_until(deployment.answers, timeout=20, interval=0.1)
    log = tempfile.NamedTemporaryFile("w+b", prefix="python-m-agents-", suffix=".log")
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents", "tests.agent_app:make_agent", "--log-format", "json",
        cwd=ROOT, env={**deployment.env, "AGENT_ID": "jsonlogs", "AGENT_CAPABILITIES": "jsonl"},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deployment.processes["jsonlogs"] = (agent, log)  # stopped and closed with the deployment
    deployment.queue_keys.add("jsonl")

    async def registered() -> bool:
        return "jsonlogs" in {a["agent_id"] for a in await deployment.rpc(AgentsRequest())}

    await wait_until(registered, timeout=20, interval=0.1)

    # When one task completes and one fails on it
    task_ids = []
    for payload in ('{"n": 1}', '{"fail": "boom"}'):
        done = await deployment.run(
            "submit", "work", "-r", "jsonl", "-p", payload, "--max-retries", "0",
            "--wait", "--json",
        )  # fmt: skip
        task_ids.append(json.loads(done.out)["task_id"])

    # Then every line serve wrote is a JSON record, and each that names a task says so
    assert await deployment.stop("jsonlogs") == 0
    assert await deployment.stop("serve") == 0
    served = json_records(deployment.log("serve"))
    for task_id in task_ids:
        about = [r for r in served if task_id in r["message"]]
        assert about, (task_id, served)
        assert all(r["task_id"] == task_id for r in about), about
    registered_lines = [r for r in served if "agent jsonlogs registered" in r["message"]]
    assert registered_lines and registered_lines[0]["agent_id"] == "jsonlogs", served

    # And so is every line the agent wrote; its lines about the failure name task and agent
    records = json_records(deployment.log("jsonlogs"))
    failure = [r for r in records if r["level"] == "WARNING" and r["task_id"] == task_ids[1]]
    assert failure and failure[0]["agent_id"] == "jsonlogs", records
