"""One trace from submit to result across processes: a client (the SDK's in-memory exporter),
``orchestrator serve`` and ``agent run`` (both under ``opentelemetry-instrument``, the
console exporter), on the real broker. The spans follow the messaging conventions."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from broker import Topology, route_key
from tests.deployment import ROOT, Deployment
from tests.harness import wait_until

pytestmark = pytest.mark.rabbitmq

CLIENT = """
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

from orchestrator import SyncClient

url, prefix = sys.argv[1], sys.argv[2]
with trace.get_tracer("test").start_as_current_span("checkout"):
    with SyncClient(url, prefix=prefix) as client:
        handle = client.submit("trace me", "", "work", {"n": 1}, required_capabilities=["traced"])
        result = handle.result(timeout=30)
print(json.dumps({"task_id": handle.task_id, "status": result["status"]}))
for span in exporter.get_finished_spans():
    print(span.to_json(indent=None))
"""


def spans_in(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (indented JSON objects, one after another)."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        if isinstance(value, dict) and "context" in value:
            spans.append(value)
        at = end
    return spans


async def traced(deployment: Deployment, name: str, *args: str) -> tuple[Any, Path]:
    """``opentelemetry-instrument orchestrator ARGS``: spans to its stdout, logs to stderr."""
    instrument = shutil.which("opentelemetry-instrument", path=os.path.dirname(sys.executable))
    assert instrument, "opentelemetry-distro is a test dependency"
    spans = tempfile.NamedTemporaryFile("w+b", prefix=f"{name}-spans-", delete=False)
    out = Path(spans.name)
    log = tempfile.NamedTemporaryFile("w+b", prefix=f"{name}-", suffix=".log")
    env = {
        **deployment.env,
        "OTEL_SERVICE_NAME": name,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "AGENT_ID": "traced-agent",
        "AGENT_CAPABILITIES": "traced",
    }
    process = await asyncio.create_subprocess_exec(
        instrument, os.path.join(os.path.dirname(sys.executable), "orchestrator"), *args,
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=spans, stderr=log,
    )  # fmt: skip
    spans.close()  # the child has its own descriptor
    deployment.processes[name] = (process, log)
    return process, out


async def test_one_trace_from_submit_through_the_agent_back_to_the_result(
    deployment: Deployment,
) -> None:
    # Given serve and an agent, each exporting its spans
    _, serve_spans = await traced(deployment, "serve", "serve")
    await wait_until(deployment.answers, timeout=30, interval=0.2)
    _, agent_spans = await traced(deployment, "agent", "agent", "run", "tests.agent_app:make_agent")
    deployment.queue_keys.add(route_key("work", ["traced"]))

    async def agent_registered() -> bool:
        from broker import AgentsRequest

        return any(a["agent_id"] == "traced-agent" for a in await deployment.rpc(AgentsRequest()))

    await wait_until(agent_registered, timeout=30, interval=0.2)

    # When a client in a process of its own submits in a span of its own and waits
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CLIENT, deployment.broker_url, deployment.prefix],
        cwd=ROOT, env=deployment.env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, *client_lines = done.stdout.splitlines()
    outcome = json.loads(first)
    assert outcome["status"] == "completed"
    client = [json.loads(line) for line in client_lines]

    # Then (once both processes flushed their spans at exit) every span of the
    # task's path shares the client's trace, each the child of the step before it
    for name in ("agent", "serve"):
        assert await deployment.stop(name) == 0
    spans = client + spans_in(serve_spans.read_text()) + spans_in(agent_spans.read_text())
    (checkout,) = [s for s in client if s["name"] == "checkout"]
    trace_id = checkout["context"]["trace_id"]
    in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
    by_id = {s["context"]["span_id"]: s for s in in_trace}

    t = Topology(deployment.prefix)
    key = route_key("work", ["traced"])
    chain = [
        ("send", f"{t.requests_exchange}:{t.rpc_queue}", "SpanKind.PRODUCER"),
        ("process", f"{t.requests_exchange}:{t.rpc_queue}", "SpanKind.CONSUMER"),
        ("send", f"{t.tasks_exchange}:{key}", "SpanKind.PRODUCER"),
        ("process", f"{t.tasks_exchange}:{key}", "SpanKind.CONSUMER"),
        ("process", f"{t.events_exchange}:task.finished.traced-agent", "SpanKind.CONSUMER"),
    ]
    found = []
    for operation, destination, kind in chain:
        matching = [s for s in in_trace if s["name"] == f"{operation} {destination}"]
        assert matching, (operation, destination, sorted(s["name"] for s in in_trace))
        span = matching[0]
        assert span["kind"] == kind
        attributes = span["attributes"]
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.destination.name"] == destination
        assert attributes["messaging.operation.type"] == operation
        found.append(span)
    # each step is a descendant of the one before it
    for parent, child in itertools.pairwise(found):
        ancestor = child
        while (
            ancestor is not None and ancestor["context"]["span_id"] != parent["context"]["span_id"]
        ):
            ancestor = by_id.get(ancestor.get("parent_id"))
        assert ancestor is not None, (parent["name"], child["name"])
    assert found[0]["parent_id"] == checkout["context"]["span_id"]
