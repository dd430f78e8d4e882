"""Prometheus figures of one agent, read off its counters at scrape time.

The agent already counts what it did (``Agent.counters``) for its own
bookkeeping; exporting those at scrape time costs the hot path nothing.
Names follow ``dramatiq_messages_*``: ``agent_tasks_total`` by ``outcome``
(received, completed, failed, timed_out, cancelled), ``agent_tasks_running``,
``agent_concurrency`` (its ``max_concurrent_tasks``) and
``agent_utilization`` (running over concurrency), each labelled with the
agent's ``agent_id`` so that several agents' series can be summed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker import CommunicationBus
from broker.probes import ProbeServer

if TYPE_CHECKING:
    from .agent import Agent

OUTCOMES = ("received", "completed", "failed", "timed_out", "cancelled")


class AgentMetrics:
    """A registry with the figures of ``agent`` (tests run many agents: one registry each)."""

    def __init__(self, agent: Agent, registry: CollectorRegistry | None = None) -> None:
        self.agent = agent
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        agent, counters = self.agent, self.agent.counters
        labels = ["agent_id"]
        tasks = CounterMetricFamily(
            "agent_tasks", "Task deliveries by what became of them.", labels=[*labels, "outcome"]
        )
        for outcome in OUTCOMES:
            tasks.add_metric([agent.agent_id, outcome], getattr(counters, outcome))
        yield tasks
        running = GaugeMetricFamily("agent_tasks_running", "Handlers running now.", labels=labels)
        running.add_metric([agent.agent_id], counters.running)
        yield running
        limit = GaugeMetricFamily(
            "agent_concurrency", "Tasks this agent runs at once at most.", labels=labels
        )
        limit.add_metric([agent.agent_id], agent.max_concurrent_tasks)
        yield limit
        use = GaugeMetricFamily(
            "agent_utilization", "Running handlers over concurrency.", labels=labels
        )
        use.add_metric([agent.agent_id], counters.running / max(1, agent.max_concurrent_tasks))
        yield use


@contextlib.asynccontextmanager
async def serving_metrics(
    agent: Agent, bus: CommunicationBus, port: int | None, host: str = "0.0.0.0"
) -> AsyncIterator[ProbeServer | None]:
    """``/metrics``, ``/healthz`` and ``/readyz`` (ready while its link is up) on ``port``;
    nothing when ``port`` is None. All interfaces: a probe comes from outside the pod."""
    if port is None:
        yield None
        return

    def ready() -> tuple[bool, str]:
        if bus.is_connected:
            return True, f"agent {agent.agent_id}: connected"
        return False, f"agent {agent.agent_id}: not connected to the broker"

    async with ProbeServer(
        AgentMetrics(agent).registry, ready=ready, host=host, port=port
    ) as probe:
        yield probe
