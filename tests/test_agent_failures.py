"""Failures are visible and final: a result too large to send fails its attempt
(naming the size and the limit) instead of running it again and again; every
failed or timed-out attempt is logged with where its handler broke, and its
final event carries the traceback, cut to a size that still goes out."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

import pytest

from agents import Agent, TaskContext
from broker import BusSettings
from tests.agent_desk import Desk
from tests.harness import Harness

LIMIT = 64 * 1024
"""max_message_bytes of these tests' buses."""
WAIT = 60


@pytest.fixture
def bus_settings(bus_settings: BusSettings) -> BusSettings:
    return bus_settings.model_copy(update={"max_message_bytes": LIMIT})


async def _agent(harness: Harness, handler: Any, agent_id: str = "worker") -> Agent:
    agent = Agent(agent_id, ["work"], 1, heartbeat_interval=0.3)
    agent.add_handler("*", handler)
    await agent.start(harness.new_bus())
    harness.agents.append(agent)
    return agent


# ---------------------------------------------------------------- too large to send


async def test_a_result_over_the_size_limit_fails_its_attempt_and_counts_as_a_retry(
    harness: Harness,
) -> None:
    # Given an agent whose handler returns a result larger than the bus sends
    orchestrator = await harness.start_orchestrator()
    runs: list[int] = []

    async def handler(ctx: TaskContext) -> dict:
        runs.append(ctx.attempt)
        return {"blob": "x" * (LIMIT + 10_000)}

    agent = await harness.start_agent("worker", ["work"], 1, handler)

    # When a task with one retry runs on it
    task_id = await orchestrator.submit_task(
        name="big",
        description="",
        task_type="job",
        payload={},
        required_capabilities=["work"],
        timeout=20,
        max_retries=1,
    )
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)

    # Then each attempt failed once, with an error naming the size and the limit,
    # and the task failed after its one retry (not a timeout after endless runs)
    assert status["status"] == "failed"
    assert status["retry_count"] == 1
    assert runs == [1, 2]
    error = status["error_message"]
    assert "too large" in error and f"max_message_bytes={LIMIT}" in error
    size = int(re.search(r"(\d+) bytes", error).group(1))  # type: ignore[union-attr]
    assert size > LIMIT
    assert status["result"] is None
    assert agent.counters.failed == 2 and agent.counters.completed == 0


# ---------------------------------------------------------------- failures logged and reported


def _read(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


def _warnings_about(caplog: pytest.LogCaptureFixture, task_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("agents")
        and task_id in r.getMessage()
    ]


async def test_get_task_status_gives_the_failed_handlers_traceback(harness: Harness) -> None:
    # Given a real orchestrator and an agent whose handler raises two calls deep
    orchestrator = await harness.start_orchestrator()

    def parse_input(payload: dict) -> None:
        raise ValueError(f"bad input {payload['n']}")

    async def handler(ctx: TaskContext) -> dict:
        parse_input(ctx.payload)
        return {}

    await harness.start_agent("worker", ["work"], 1, handler)

    # When its task fails for good
    task_id = await orchestrator.submit_task(
        name="parse", description="", task_type="parse", payload={"n": 42},
        required_capabilities=["work"], max_retries=0,
    )  # fmt: skip
    status = await orchestrator.wait_for_task(task_id, WAIT)

    # Then its status says why, with the handler's own traceback as it was
    assert (status["status"], status["error_message"]) == ("failed", "ValueError: bad input 42")
    assert status["traceback"].startswith("Traceback (most recent call last):")
    assert "in parse_input" in status["traceback"]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_failed_attempt_is_logged_and_reported_with_its_traceback(
    harness: Harness, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # Given an agent whose handler raises two calls deep
    caplog.set_level(logging.INFO)
    desk = await Desk(harness).open()

    def parse_input(payload: dict) -> None:
        raise ValueError(f"bad input {payload['n']}")

    async def async_handler(ctx: TaskContext) -> dict:
        parse_input(ctx.payload)
        return {}

    def sync_handler(ctx: TaskContext) -> dict:
        parse_input(ctx.payload)
        return {}

    await _agent(harness, async_handler if kind == "async" else sync_handler)
    await desk.consume("worker")

    # When its task runs
    message = await desk.publish(desk.message(payload={"n": 42}, task_type="parse"))
    [finished] = await desk.wait_for(lambda: desk.finished(message.task_id))

    # Then the final event says it failed, with the handler's own traceback
    assert finished.outcome == "failed"
    assert finished.error == "ValueError: bad input 42"
    assert finished.traceback is not None
    assert finished.traceback.startswith("Traceback (most recent call last):")
    assert "in parse_input" in finished.traceback
    assert finished.traceback.rstrip().endswith("ValueError: bad input 42")
    assert "agents/handlers.py" not in finished.traceback  # the runtime's frames are left out

    # And the agent logged it as a warning: task id, type, attempt, and traceback
    [logged] = _warnings_about(caplog, message.task_id)
    assert "(type parse)" in logged and "attempt 1 failed" in logged
    assert "ValueError: bad input 42" in logged and "in parse_input" in logged


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_timed_out_attempt_is_logged_with_where_its_handler_was(
    harness: Harness, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # Given an agent whose handler waits in a function of its own until released
    caplog.set_level(logging.INFO)
    desk = await Desk(harness).open()
    release = asyncio.Event()
    gate = threading.Event()

    async def waiting_for_the_market() -> None:
        await release.wait()

    async def async_handler(ctx: TaskContext) -> dict:
        await waiting_for_the_market()
        return {}

    def blocked_on_the_market(ctx: TaskContext) -> None:
        while not gate.wait(0.01):
            ctx.check()

    def sync_handler(ctx: TaskContext) -> dict:
        blocked_on_the_market(ctx)
        return {}

    await _agent(harness, async_handler if kind == "async" else sync_handler)
    await desk.consume("worker")
    try:
        # When its task's timeout passes
        message = await desk.publish(desk.message(timeout=0.3))
        [finished] = await desk.wait_for(lambda: desk.finished(message.task_id))
    finally:
        release.set()
        gate.set()

    # Then it is reported timeout, and logged with where the handler was
    assert finished.outcome == "timeout"
    assert finished.error == "exceeded timeout of 0.3s"
    [logged] = _warnings_about(caplog, message.task_id)
    assert "(type job) attempt 1 timed out: exceeded timeout of 0.3s" in logged
    where = "waiting_for_the_market" if kind == "async" else "blocked_on_the_market"
    assert where in logged


async def test_a_failure_too_large_to_send_whole_is_still_reported(harness: Harness) -> None:
    # Given an agent whose handler raises, deep in a recursion, an exception whose
    # message alone is larger than the bus sends
    desk = await Desk(harness).open()

    def recurse(depth: int) -> None:
        if depth == 0:
            raise ValueError("e" * (2 * LIMIT))
        recurse(depth - 1)

    async def handler(ctx: TaskContext) -> dict:
        recurse(300)
        return {}

    await _agent(harness, handler)
    await desk.consume("worker")

    # When its task runs
    message = await desk.publish(desk.message())
    [finished] = await desk.wait_for(lambda: desk.finished(message.task_id))

    # Then its failure goes out, once, its error and traceback cut to fit
    assert finished.outcome == "failed"
    assert finished.error is not None and finished.error.startswith("ValueError: eee")
    assert len(finished.error) < 5 * 1024
    assert finished.traceback is not None and len(finished.traceback) < 9 * 1024
    assert len(finished.encode()) < LIMIT
    assert len(desk.started(message.task_id)) == 1


@pytest.mark.rabbitmq
@pytest.mark.parametrize("bus_kind", ["rabbitmq"], indirect=True)
async def test_an_agent_process_logs_a_failed_attempt_with_its_traceback(
    harness: Harness,
) -> None:
    # Given an agent process (it logs at INFO, as `python -m agents` does)
    orchestrator = await harness.start_orchestrator()
    harness.spawn_agent("logging", ["work"])
    await harness.wait_agents("logging", timeout=WAIT)

    # When a task fails in its handler
    task_id = await orchestrator.submit_task(
        name="t",
        description="",
        task_type="job",
        payload={"fail": "the feed is down"},
        required_capabilities=["work"],
        max_retries=0,
    )
    status = await orchestrator.wait_for_task(task_id, timeout=WAIT)
    assert status["status"] == "failed"

    # Then its log has the warning, with the traceback
    [log] = harness.logs
    text = _read(log.name)
    lines = [line for line in text.splitlines() if task_id in line]
    assert any("WARNING" in line and "attempt 1 failed" in line for line in lines), text
    assert "RuntimeError: the feed is down" in text
    assert "in work" in text  # the handler's frame
