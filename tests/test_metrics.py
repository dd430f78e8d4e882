"""Prometheus figures and probes: a scrape agrees with ``get_stats``, and probes say what they should."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agents import TaskContext
from broker import AgentHeartbeat
from broker.probes import ProbeServer
from orchestrator import TaskOrchestrator
from orchestrator.metrics import OrchestratorMetrics

from .harness import echo, wait_all, wait_until


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def fails_once(ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"ok": True}


async def test_scrape_counts_agree_with_stats(harness) -> None:
    orch: TaskOrchestrator = await harness.start_orchestrator()
    metrics = OrchestratorMetrics()
    orch.lifecycle.observe(metrics)
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> dict[str, Any]:
        await release.wait()
        return {"held": True}

    await harness.start_agent(
        "metrics-agent", ["compute"], 4, handlers={"echo": echo, "flaky": fails_once, "held": held}
    )
    ids = [await orch.submit_task(f"e{n}", "", "echo", {"n": n}) for n in range(5)]
    ids.append(await orch.submit_task("f1", "", "flaky", {}, max_retries=2))
    ids.append(await orch.submit_task("f2", "", "flaky", {}, max_retries=0))
    await wait_all(orch, ids)
    # (and one event refused: an agent id outside the alphabet)
    await orch.events.on_event(AgentHeartbeat(agent_id="not an id", running=0))
    # (and two dead letters: an event that does not parse, and bytes that are no message)
    bad_event = {"v": 1, "kind": "task.finished", "task_id": ids[0], "attempt": 1,
                 "agent_id": "metrics-agent", "outcome": "exploded"}  # fmt: skip
    await harness.inject_event("task.finished.metrics-agent", json.dumps(bad_event).encode())
    await harness.inject_event("task.finished.metrics-agent", b"\xff not json")

    async def dead_lettered() -> bool:
        return (await orch.get_stats())["dead_letters"] == {"event": 1, "other": 1}

    await wait_until(dead_lettered, timeout=15)
    # and, while the scrape is taken, one task running
    running = await orch.submit_task("h", "", "held", {})

    async def is_running() -> bool:
        return (await orch.get_task_status(running))["status"] == "running"

    await wait_until(is_running, timeout=15)
    async with ProbeServer(metrics.registry, refresh=metrics.refresher(orch.get_stats)) as probe:
        status, text = await http_get(probe.port, "/metrics")
    assert status == 200
    found = samples(text)
    stats = await orch.get_stats()

    def finished(kind: str, status: str) -> float:
        key = (("status", status), ("task_type", kind))
        return found.get(("orchestrator_tasks_finished_total", key), 0.0)

    assert finished("echo", "completed") == 5
    assert finished("flaky", "completed") == 1
    assert finished("flaky", "failed") == 1
    assert found[("orchestrator_task_retries_total", (("task_type", "flaky"),))] == 1
    assert found[("orchestrator_tasks_submitted_total", ())] == stats["tasks_created"] == 8
    assert found[("orchestrator_tasks", (("status", "completed"),))] == stats["completed_tasks"]
    assert found[("orchestrator_tasks", (("status", "failed"),))] == stats["tasks_failed"] == 1
    assert found[("orchestrator_tasks", (("status", "running"),))] == stats["running_tasks"] == 1
    assert found[("orchestrator_agents", ())] == stats["registered_agents"] == 1
    utilization = (("agent_id", "metrics-agent"),)
    assert found[("orchestrator_agent_utilization", utilization)] == 0.25
    assert stats["agent_utilization"] == {"metrics-agent": 0.25}
    assert found[("orchestrator_task_run_seconds_count", (("task_type", "echo"),))] == 5
    assert found[("orchestrator_task_wait_seconds_count", (("task_type", "echo"),))] == 5
    refused = (("reason", "invalid_agent_id"),)
    assert found[("orchestrator_refused_messages_total", refused)] == 1
    assert stats["refused_messages"] == {"invalid_agent_id": 1}
    dead = {
        labels[0][1]: value
        for (name, labels), value in found.items()
        if name == "orchestrator_dead_letters_total"
    }
    assert dead == {"task": 0, "event": 1, "control": 0, "other": 1}
    release.set()
    assert (await orch.wait_for_task(running, 15))["status"] == "completed"


async def test_probes_answer_live_and_ready() -> None:
    ready = {"value": (False, "connecting to the broker")}
    metrics = OrchestratorMetrics()
    async with ProbeServer(metrics.registry, ready=lambda: ready["value"]) as probe:
        assert await http_get(probe.port, "/healthz") == (200, "ok\n")
        assert await http_get(probe.port, "/readyz") == (503, "connecting to the broker\n")
        ready["value"] = (True, "leading")
        assert await http_get(probe.port, "/readyz") == (200, "leading\n")
        assert (await http_get(probe.port, "/nope"))[0] == 404


async def test_probe_ignores_garbage_requests() -> None:
    """A port scanner's bytes neither crash the endpoint nor keep it busy."""
    metrics = OrchestratorMetrics()
    async with ProbeServer(metrics.registry) as probe:
        reader, writer = await asyncio.open_connection("127.0.0.1", probe.port)
        writer.write(b"\x16\x03\x01\x00\xff" + b"A" * 20000 + b"\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
        assert await http_get(probe.port, "/healthz") == (200, "ok\n")


def test_task_type_labels_are_bounded() -> None:
    from orchestrator.metrics import MAX_TASK_TYPES
    from orchestrator.models import Task

    metrics = OrchestratorMetrics()
    names = set()
    for n in range(MAX_TASK_TYPES + 50):
        task = Task(
            task_id=str(n), name="", description="", task_type=f"t{n}", priority=1, payload={}
        )
        names.add(metrics.task_type(task))
    assert len(names) == MAX_TASK_TYPES + 1 and "other" in names


async def test_agent_figures_match_what_it_ran(harness) -> None:
    from agents.metrics import AgentMetrics

    orch: TaskOrchestrator = await harness.start_orchestrator()
    agent = await harness.start_agent(
        "metrics-worker", ["compute"], max_concurrent_tasks=3, handlers={"echo": echo}
    )
    metrics = AgentMetrics(agent)
    ids = [await orch.submit_task(f"e{n}", "", "echo", {"n": n}) for n in range(4)]
    await wait_all(orch, ids)

    # A task reads completed once its final event is in; the agent stops
    # counting it running a moment later, before it settles the delivery.
    async def settled() -> bool:
        return agent.unsettled == 0

    await wait_until(settled)
    async with ProbeServer(metrics.registry) as probe:
        status, text = await http_get(probe.port, "/metrics")
    assert status == 200
    found = samples(text)
    worker = ("agent_id", "metrics-worker")
    assert found[("agent_tasks_total", (worker, ("outcome", "completed")))] == 4
    assert found[("agent_tasks_total", (worker, ("outcome", "failed")))] == 0
    assert found[("agent_concurrency", (worker,))] == 3
    assert found[("agent_tasks_running", (worker,))] == 0
