"""Prometheus figures of an orchestrator, named the way Celery's and Dramatiq's exporters name theirs.

Two sources, so that nothing is counted twice and nothing scans the tasks:

- every status change, heard as a ``Lifecycle`` observer: finished tasks by
  type and status, retries, and the wait (submitted to started) and run
  (started to ended) times as histograms;
- ``get_stats()`` read at scrape time: tasks by status, agents, their load and
  utilisation, refused messages, dead letters, and who leads. These are what ``get_stats``
  answers, so a scrape and a stats call never disagree.

Names (``orchestrator_`` like ``celery_task_`` / ``dramatiq_messages_``):

==========================================  =========  =================================
``orchestrator_tasks_submitted_total``       counter    tasks accepted by submit
``orchestrator_tasks_finished_total``        counter    by ``task_type`` and final ``status``
``orchestrator_task_retries_total``          counter    attempts after the first, by ``task_type``
``orchestrator_task_wait_seconds``           histogram  submitted to first started, by ``task_type``
``orchestrator_task_run_seconds``            histogram  started to ended, by ``task_type``
``orchestrator_tasks``                       gauge      tasks now in each ``status``
``orchestrator_agents``                      gauge      registered agents
``orchestrator_agent_utilization``           gauge      running / concurrency, by ``agent_id``
``orchestrator_utilization``                 gauge      running / concurrency, all agents
``orchestrator_refused_messages_total``      counter    messages refused, by ``reason``
``orchestrator_dead_letters_total``          counter    dead letters received, by ``kind``
``orchestrator_leader``                      gauge      1 while this process leads its prefix
==========================================  =========  =================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .lifecycle import Move
from .models import Task, TaskStatus
from .stats import DEAD_LETTER_KINDS

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
"""From a no-op task (milliseconds) to a long job (an hour)."""

MAX_TASK_TYPES = 200
"""Label values are series in Prometheus: task types past this many are counted as ``other``,
so a client submitting random type names cannot blow up the scrape."""


class OrchestratorMetrics:
    """The figures of one orchestrator, in a registry of their own (tests run many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.finished = Counter(
            "orchestrator_tasks_finished",
            "Tasks that reached a final status.",
            ["task_type", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "orchestrator_task_retries",
            "Attempts published after a task's first (retries, and lost messages sent again).",
            ["task_type"],
            registry=self.registry,
        )
        self.wait = Histogram(
            "orchestrator_task_wait_seconds",
            "Time from submit to the first start.",
            ["task_type"],
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self.run = Histogram(
            "orchestrator_task_run_seconds",
            "Time from start to the end of the attempt that ended the task.",
            ["task_type"],
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )
        self._types: set[str] = set()
        self._stats: Mapping[str, Any] = {}
        self.registry.register(_StatsCollector(self))

    def task_type(self, task: Task) -> str:
        name = task.task_type
        if name in self._types:
            return name
        if len(self._types) >= MAX_TASK_TYPES:
            return "other"
        self._types.add(name)
        return name

    def moved(self, task: Task, move: Move) -> None:
        """A ``Lifecycle`` observer: constant time per move."""
        new = move.new
        if new is TaskStatus.PENDING and move.attempt > move.old_attempt >= 1:
            self.retries.labels(self.task_type(task)).inc()
        elif new is TaskStatus.RUNNING and move.attempt == 1 and move.old is not new:
            self.wait.labels(self.task_type(task)).observe(max(0.0, move.at - task.created_at))
        elif new.is_final:
            kind = self.task_type(task)
            self.finished.labels(kind, new.value).inc()
            if task.started_at is not None and new is not TaskStatus.CANCELLED:
                self.run.labels(kind).observe(max(0.0, move.at - task.started_at))

    def refresher(self, stats: Callable[[], Awaitable[Mapping[str, Any]]]):
        """A coroutine function for ``ProbeServer(refresh=...)``: reads the stats before a scrape."""

        async def refresh() -> None:
            self._stats = await stats()

        return refresh


class _StatsCollector:
    """Gauges and counters read off the last ``get_stats`` answer."""

    def __init__(self, metrics: OrchestratorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self.metrics._stats
        if not stats:
            return
        submitted = CounterMetricFamily("orchestrator_tasks_submitted", "Tasks accepted by submit.")
        submitted.add_metric([], stats.get("tasks_created", 0))
        yield submitted
        tasks = GaugeMetricFamily(
            "orchestrator_tasks", "Tasks now in each status.", labels=["status"]
        )
        tasks.add_metric(
            ["pending"], stats.get("pending_tasks", 0)
        )  # and assigned, as the seed counts
        tasks.add_metric(["running"], stats.get("running_tasks", 0))
        tasks.add_metric(["completed"], stats.get("completed_tasks", 0))
        tasks.add_metric(["failed"], stats.get("tasks_failed", 0))
        yield tasks
        agents = GaugeMetricFamily("orchestrator_agents", "Registered agents.")
        agents.add_metric([], stats.get("registered_agents", 0))
        yield agents
        per_agent = GaugeMetricFamily(
            "orchestrator_agent_utilization",
            "Running tasks over concurrency, per agent.",
            labels=["agent_id"],
        )
        for agent_id, value in sorted(stats.get("agent_utilization", {}).items()):
            per_agent.add_metric([agent_id], value)
        yield per_agent
        overall = GaugeMetricFamily(
            "orchestrator_utilization", "Running tasks over concurrency, all agents."
        )
        overall.add_metric([], stats.get("overall_utilization", 0.0))
        yield overall
        refused = stats.get("refused_messages")
        if isinstance(refused, Mapping):
            family = CounterMetricFamily(
                "orchestrator_refused_messages", "Messages refused, by reason.", labels=["reason"]
            )
            for reason, count in sorted(refused.items()):
                if isinstance(count, int | float):
                    family.add_metric([str(reason)], count)
            yield family
        dead = stats.get("dead_letters")
        if isinstance(dead, Mapping):
            family = CounterMetricFamily(
                "orchestrator_dead_letters",
                "Dead letters received, by what they were (task, event, control, other).",
                labels=["kind"],
            )
            for kind in DEAD_LETTER_KINDS:  # every kind, 0 until one comes: rate() needs a start
                family.add_metric([kind], dead.get(kind, 0))
            yield family
        leader = stats.get("leader")
        if leader is not None or "role" in stats:
            family = GaugeMetricFamily("orchestrator_leader", "1 while this process leads.")
            family.add_metric([], 1.0 if stats.get("role", "leader") == "leader" else 0.0)
            yield family
