"""Output hygiene: control characters from the bus are escaped in logs and tables.

Task names and types, errors, results and agent ids come from other services
and agents. A newline in one must not forge a line of ``orchestrator serve``'s
log, and an escape sequence must not reach the terminal through ``status``,
``agents``, ``stats``, ``tasks`` or ``watch``; ``--json`` stays exact JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
from typing import Any

import pytest

from broker import (
    AgentAnnounced,
    AgentsRequest,
    BusSettings,
    RabbitMQBus,
    Reply,
    StatsRequest,
    SubmitTaskRequest,
    TaskFinished,
    TaskStatusRequest,
)
from broker.rpc import TasksRequest
from orchestrator.cli.escaping import escape_line, escape_lines
from orchestrator.cli.logs import EscapingFormatter
from tests.conftest import require_broker
from tests.deployment import Deployment, base_env, run
from tests.harness import wait_until

CLEAR = "\x1b[2J"
FORGED = "2026-01-01 00:00:00,000 ERROR orchestrator: FORGED"
HOSTILE = f"evil{CLEAR}\n{FORGED}\r\x07\x9b31m\u2028\u202e"
"""A screen clear, a forged log line, a carriage return, a bell, a C1 CSI, a line
separator and a right-to-left override."""
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")


def assert_controls_escaped(text: str) -> None:
    """No control character but newlines."""
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202e]", text), repr(text)


def assert_clean(text: str) -> None:
    """No control character but newlines, and no line that starts with the forgery."""
    assert_controls_escaped(text)
    assert not any(line.startswith(FORGED[:10]) and "FORGED" in line for line in text.split("\n"))


# --- escaping itself ------------------------------------------------------------------------


def test_one_line_text_has_every_control_escaped_and_the_rest_as_it_is() -> None:
    assert escape_line(HOSTILE) == ("evil\\x1b[2J\\n" + FORGED + "\\r\\x07\\x9b31m\\u2028\\u202e")
    assert escape_line("[bold]täsk[/bold] C:\\path\ttab") == "[bold]täsk[/bold] C:\\path\\ttab"


def test_a_block_keeps_its_lines_and_tabs_and_escapes_the_rest() -> None:
    assert escape_lines("Traceback:\n\tline 1\x1b[31m\r") == "Traceback:\n\tline 1\\x1b[31m\\r"


# --- log lines -------------------------------------------------------------------------------


def test_a_record_with_hostile_text_is_one_line_and_its_traceback_indented() -> None:
    # Given the command line's formatter on a logger of ours
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(f"orchestrator.test_hygiene.{secrets.token_hex(4)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)

    # When hostile text is in a message's arguments, and in an exception's text
    logger.warning("task %s of type %r", "task_1", HOSTILE)
    logger.info(HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logger.exception("handler of %s failed", HOSTILE)

    # Then every line at the margin is a record of ours, the tracebacks' lines are
    # indented beneath theirs, and no control character is left
    text = stream.getvalue()
    assert_clean(text)
    lines = text.rstrip("\n").split("\n")
    assert [bool(RECORD_START.match(line)) for line in lines[:3]] == [True, True, True]
    assert all(RECORD_START.match(line) or line.startswith("  ") for line in lines), text
    assert "  Traceback (most recent call last):" in lines
    assert f"evil\\x1b[2J\\n{FORGED}" in lines[1]


@pytest.mark.hostile
@pytest.mark.rabbitmq
async def test_serve_logs_a_hostile_submit_without_a_forged_line(prefix: str) -> None:
    # Given `orchestrator serve`, logging at info
    deployment = Deployment(prefix, require_broker())
    try:
        await deployment.start("serve", "serve", "--log-level", "info")
        await wait_answers(deployment)

        # When a service submits a task whose name and type hold a newline, a forged
        # record and escape sequences
        request = SubmitTaskRequest(name=HOSTILE, task_type=HOSTILE, payload={"x": HOSTILE})
        task_id = await deployment.rpc(request)
        status = await deployment.rpc(TaskStatusRequest(task_id=task_id["task_id"]))
        assert status["name"] == HOSTILE  # the task itself is as submitted
        assert await deployment.stop("serve") == 0
        log = deployment.log("serve")
    finally:
        await deployment.close()

    # Then its log names the task with the text escaped, and forged nothing
    assert f"evil\\x1b[2J\\n{FORGED}" in log, log
    assert_clean(log)
    lines = log.rstrip("\n").split("\n")
    assert all(RECORD_START.match(line) or line.startswith(" ") for line in lines), log


async def wait_answers(deployment: Deployment) -> None:
    await wait_until(deployment.answers, timeout=20, interval=0.1)


# --- the command line's tables -----------------------------------------------------------------

STATUS: dict[str, Any] = {
    "task_id": "task_1",
    "name": HOSTILE,
    "status": "failed",
    "assigned_agent": HOSTILE,
    "created_at": 1_700_000_000.0,
    "started_at": 1_700_000_001.0,
    "completed_at": 1_700_000_002.0,
    "priority": "high",
    "progress": 0.5,
    "result": {"text": HOSTILE},
    "error_message": HOSTILE,
    "retry_count": 1,
    "traceback": f'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: {HOSTILE}\n',
}
AGENT: dict[str, Any] = {
    "agent_id": HOSTILE,
    "capabilities": [HOSTILE],
    "max_concurrent_tasks": 2,
    "current_load": 1,
    "utilization": 0.5,
    "performance_score": 1.0,
    "specialization_score": {},
    "task_types": ["*"],
    "running": ["task_1"],
    "last_seen": 1_700_000_000.0,
}
STATS: dict[str, Any] = {
    "tasks_created": 1, "tasks_completed": 0, "tasks_failed": 1, "avg_completion_time": 0.0,
    "pending_tasks": 0, "running_tasks": 0, "completed_tasks": 0, "registered_agents": 1,
    "agent_utilization": {HOSTILE: 0.5}, "overall_utilization": 0.5,
}  # fmt: skip
SUMMARY: dict[str, Any] = {
    key: STATUS[key]
    for key in (
        "task_id", "name", "status", "assigned_agent", "created_at", "started_at",
        "completed_at", "priority", "retry_count", "error_message",
    )
} | {"task_type": HOSTILE}  # fmt: skip


async def hostile_answer(request: Any) -> Reply:
    """A service on the prefix whose every answer carries hostile text."""
    if isinstance(request, TaskStatusRequest):
        return Reply.success(STATUS)
    if isinstance(request, AgentsRequest):
        return Reply.success([AGENT])
    if isinstance(request, StatsRequest):
        return Reply.success(STATS)
    if isinstance(request, TasksRequest):
        return Reply.success([SUMMARY])
    return Reply.success([])  # queues


@pytest.mark.hostile
@pytest.mark.rabbitmq
async def test_tables_escape_hostile_fields_and_json_keeps_them_exact(prefix: str) -> None:
    # Given a service on the prefix whose answers hold hostile names, errors, results
    # and agent ids
    broker = require_broker()
    server = RabbitMQBus(settings=BusSettings(broker_url=broker, prefix=prefix))
    await server.connect()
    env = base_env(ORCHESTRATOR_BROKER_URL=broker, ORCHESTRATOR_PREFIX=prefix)
    try:
        await server.serve_requests(hostile_answer)

        # When a user looks at the task, the agents, the statistics and the task list
        tables = {
            command: await run(command, *args, env=env)
            for command, *args in (["status", "task_1"], ["agents"], ["stats"], ["tasks"])
        }
        as_json = {
            command: await run(command, *args, "--json", env=env)
            for command, *args in (["status", "task_1"], ["agents"], ["stats"], ["tasks"])
        }
    finally:
        await server.delete_topology([])
        await server.close()

    # Then every table shows the text escaped, and nothing that moves the terminal
    for command, result in tables.items():
        assert result.code == 0, result
        # (a traceback is shown below the table with its lines as the agent sent them)
        assert_clean(result.out.split("\ntraceback:\n")[0] + result.err)
        assert_controls_escaped(result.out)
        assert "\\x1b[2J" in result.out, (command, result.out)
    assert f"ValueError: evil\\x1b[2J\n{FORGED}\\r\\x07" in tables["status"].out
    assert "traceback:\nTraceback (most recent call last):\n  File" in tables["status"].out
    # And --json gives every value exactly
    assert json.loads(as_json["status"].out) == STATUS
    assert json.loads(as_json["agents"].out) == [AGENT]
    assert json.loads(as_json["stats"].out) == STATS
    assert json.loads(as_json["tasks"].out) == [SUMMARY]


@pytest.mark.hostile
@pytest.mark.rabbitmq
async def test_watch_escapes_hostile_events_and_agents(prefix: str) -> None:
    # Given a service on the prefix with a hostile agent, and events of it
    broker = require_broker()
    server = RabbitMQBus(settings=BusSettings(broker_url=broker, prefix=prefix))
    await server.connect()
    env = base_env(ORCHESTRATOR_BROKER_URL=broker, ORCHESTRATOR_PREFIX=prefix)
    try:
        await server.declare(server.topology.orchestrator_events())
        await server.serve_requests(hostile_answer)

        # When `watch` runs while hostile events are published
        watching = asyncio.ensure_future(
            run("watch", "--seconds", "3", "--refresh", "0.5", env=env)
        )
        while not watching.done():
            await server.publish_event(
                TaskFinished(
                    task_id=HOSTILE, attempt=1, agent_id=HOSTILE, outcome="failed", error=HOSTILE
                )
            )
            await server.publish_event(
                AgentAnnounced(agent_id=HOSTILE, capabilities=[HOSTILE], max_concurrent_tasks=1)
            )
            await asyncio.wait([watching], timeout=0.2)
        result = watching.result()
    finally:
        await server.delete_topology([])
        await server.close()

    # Then its view shows them escaped, and nothing that moves the terminal
    assert result.code == 0, result
    assert "\\x1b[2J" in result.out, result.out
    assert "failed: evil" in result.out, result.out
    assert_clean(result.out)
