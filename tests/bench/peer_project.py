"""This project in the peer benchmark: a TaskOrchestrator in the client process
and agent processes (``python -m agents tests.bench.peer_project:make_agent``),
with the memory store or the SQLite store.

The ``memory-one-agent`` variant runs one agent process with every slot of
the others (``--workers`` times ``--concurrency``): as many processes as the
raw loop, to show what the extra process costs on a machine of few cores.

The agents are the project's own ``agents.Agent`` with its default settings
(heartbeat included) and a handler that returns the time it started, so that
the idle phase can tell submit-to-start from submit-to-result. The agent
processes and the clean-up are those of ``tests/bench/throughput.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agents import Agent, TaskContext
from broker import BusSettings, RabbitMQBus, event_loop
from orchestrator import SQLiteStore, TaskOrchestrator
from tests.bench.peer_common import Options, Workers
from tests.bench.throughput import delete_topology, wait_agents

IN_FLIGHT = 200
"""Submits awaited together (as ``throughput.py`` does)."""
AGENT_APP = "tests.bench.peer_project:make_agent"


def make_agent() -> Agent:
    """What the agent processes run: AGENT_ID, AGENT_MAX from the environment."""
    agent = Agent(os.environ["AGENT_ID"], [], int(os.environ.get("AGENT_MAX", "50")))

    @agent.handler()
    async def noop(ctx: TaskContext) -> dict[str, Any]:
        return {"started": time.monotonic()}

    return agent


class ProjectRunner:
    def __init__(self, options: Options, store: str, agents: int | None = None) -> None:
        self.options = options
        self.store = store
        self.agents = options.workers if agents is None else agents
        """Agent processes; their slots are ``options.workers * options.concurrency`` in all."""
        self.slots = options.workers * options.concurrency // self.agents
        self.settings = BusSettings(broker_url=options.broker_url, prefix=options.prefix)
        self.workers = Workers()
        self.loop = event_loop.new_event_loop()  # as serve runs: uvloop where installed
        self.directory = tempfile.TemporaryDirectory()
        self.orchestrator: TaskOrchestrator | None = None
        self.bus: RabbitMQBus | None = None

    def setup(self) -> None:
        self.loop.run_until_complete(self._setup())

    async def _setup(self) -> None:
        self.bus = RabbitMQBus(settings=self.settings)
        await self.bus.connect()
        store = (
            SQLiteStore(Path(self.directory.name) / "state.sqlite")
            if self.store == "sqlite"
            else None
        )
        self.orchestrator = TaskOrchestrator(self.bus, store=store)
        await self.orchestrator.start()
        ids = [f"{self.options.prefix}-agent-{k}" for k in range(self.agents)]
        for agent_id in ids:
            self.workers.spawn(
                ["-m", "agents", AGENT_APP],
                {
                    "ORCHESTRATOR_BROKER_URL": self.options.broker_url,
                    "ORCHESTRATOR_PREFIX": self.options.prefix,
                    "AGENT_ID": agent_id,
                    "AGENT_MAX": str(self.slots),
                },
            )
        await wait_agents(self.orchestrator, set(ids), self.options.timeout, self.workers.processes)

    async def _run(self, i: int) -> tuple[float, dict[str, Any], float]:
        assert self.orchestrator is not None
        sent = time.monotonic()
        task_id = await self.orchestrator.submit_task(
            name=f"noop-{i}", description="", task_type="noop", payload={"i": i}
        )
        status = await self.orchestrator.wait_for_task(task_id)
        seen = time.monotonic()
        if status["status"] != "completed":
            raise RuntimeError(f"task {task_id} ended {status['status']}: {status.get('error')}")
        return sent, status, seen

    def one(self, i: int) -> tuple[float, float, float]:
        sent, status, seen = self.loop.run_until_complete(
            asyncio.wait_for(self._run(i), self.options.timeout)
        )
        return sent, status["result"]["started"], seen

    async def _batch(self, n: int) -> list[tuple[float, float]]:
        assert self.orchestrator is not None
        orchestrator = self.orchestrator
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def task(i: int) -> tuple[float, float]:
            async with gate:
                sent = time.monotonic()
                task_id = await orchestrator.submit_task(
                    name=f"noop-{i}", description="", task_type="noop", payload={"i": i}
                )
            status = await orchestrator.wait_for_task(task_id)
            if status["status"] != "completed":
                raise RuntimeError(f"task {task_id} ended {status['status']}")
            return sent, time.monotonic()

        async with asyncio.timeout(self.options.timeout):
            return list(await asyncio.gather(*(task(i) for i in range(n))))

    def batch(self, n: int) -> list[tuple[float, float]]:
        return self.loop.run_until_complete(self._batch(n))

    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def teardown(self) -> None:
        self.workers.stop()
        self.loop.run_until_complete(self._teardown())
        self.loop.close()
        self.directory.cleanup()

    async def _teardown(self) -> None:
        keys: set[str] = set()
        if self.orchestrator is not None:
            with contextlib.suppress(Exception):  # it may not have started
                keys = set(await self.orchestrator.get_queues())
            await self.orchestrator.stop()
        if self.bus is not None:
            await self.bus.close()
            await delete_topology(self.settings, keys)


def runner(options: Options, variant: str) -> tuple[ProjectRunner, bool]:
    if variant == "memory-one-agent":
        return ProjectRunner(options, "memory", agents=1), False
    return ProjectRunner(options, variant), False
