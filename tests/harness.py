"""A test harness: an orchestrator and agents on one bus kind, torn down cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika

from agents import Agent, TaskContext
from broker import BusSettings, CommunicationBus, MemoryBus, RabbitMQBus
from orchestrator import NotLeader, OrchestratorSettings, TaskOrchestrator

ROOT = Path(__file__).resolve().parent.parent

FAST = OrchestratorSettings(
    heartbeat_timeout=2.0,
    monitor_interval=0.1,
    retry_base_delay=0.05,
    retry_max_delay=0.5,
    timeout_grace=0.3,
)
"""Short liveness and back-off settings: tests wait seconds, not minutes."""


class Harness:
    def __init__(self, bus_kind: str, settings: BusSettings) -> None:
        self.bus_kind = bus_kind
        self.settings = settings
        self._memory_bus: MemoryBus | None = None
        self.buses: list[CommunicationBus] = []
        self.orchestrator: TaskOrchestrator | None = None
        self.agents: list[Agent] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.queue_keys: set[str] = set()
        self.logs: list[Any] = []

    def use_memory_bus(self, bus: MemoryBus) -> MemoryBus:
        """Make ``bus`` (a ``MemoryBus`` subclass that injects faults) the shared
        in-process bus every ``new_bus()`` returns; closed with the harness."""
        self._memory_bus = bus
        self.buses.append(bus)
        return bus

    def new_bus(self) -> CommunicationBus:
        """The shared in-process bus, or a new connection to the broker."""
        if self.bus_kind == "memory":
            if self._memory_bus is None:
                self._memory_bus = MemoryBus(settings=self.settings)
                self.buses.append(self._memory_bus)
            return self._memory_bus
        bus = RabbitMQBus(settings=self.settings)
        self.buses.append(bus)
        return bus

    async def connected_bus(self) -> CommunicationBus:
        """``new_bus()``, connected (the shared in-process bus may be already)."""
        bus = self.new_bus()
        if not bus.is_connected:
            await bus.connect()
        return bus

    async def start_orchestrator(
        self, settings: OrchestratorSettings = FAST, **kwargs: Any
    ) -> TaskOrchestrator:
        bus = await self.connected_bus()
        self.orchestrator = TaskOrchestrator(bus, settings=settings, **kwargs)
        await self.orchestrator.start()
        return self.orchestrator

    async def start_agent(
        self,
        agent_id: str,
        capabilities: list[str],
        max_concurrent_tasks: int = 5,
        handler: Callable[[TaskContext], Any] | None = None,
        *,
        task_type: str = "*",
        heartbeat_interval: float = 0.3,
        wait_registered: bool = True,
        handlers: dict[str, Callable[[TaskContext], Any]] | None = None,
        specialization: dict[str, float] | None = None,
    ) -> Agent:
        """An agent with ``handler`` for ``task_type`` (or the ``handlers`` by
        type), started: it announces the types it handles."""
        agent = Agent(
            agent_id,
            capabilities,
            max_concurrent_tasks,
            heartbeat_interval=heartbeat_interval,
            specialization=specialization,
        )
        for type_, fn in (handlers or {task_type: handler or echo}).items():
            agent.add_handler(type_, fn)
        bus = self.new_bus()
        await agent.start(bus)
        self.agents.append(agent)
        if wait_registered and self.orchestrator is not None:
            await self.wait_agents(agent_id)
        return agent

    async def wait_agents(self, *agent_ids: str, timeout: float = 15) -> None:
        """Until the orchestrator has registered these agents (their events
        queues open, their queues told) and those of this process consume them."""
        orch = self.orchestrator
        assert orch is not None
        local = {agent.agent_id: agent for agent in self.agents if agent.agent_id in agent_ids}

        def through(agent_id: str) -> bool:
            told = orch.registry.told(agent_id)
            if told is None:
                return False
            agent = local.get(agent_id)
            return agent is None or set(told) <= set(agent.consumer_priorities)

        async def registered() -> bool:  # (told: registered, and not removed since)
            return all(map(through, agent_ids))

        await wait_until(registered, timeout)
        if len(local) < len(set(agent_ids)):
            # An agent process of its own: when it has taken up its queues is not
            # seen from here; its ConsumeQueues command is on its way.
            await asyncio.sleep(0.05 if self.bus_kind == "memory" else 0.3)

    def spawn_agent(
        self, agent_id: str, capabilities: list[str], **env: Any
    ) -> subprocess.Popen[bytes]:
        """An agent in its own process (RabbitMQ only), built by tests/agent_app.py."""
        environment = {
            **os.environ,
            "ORCHESTRATOR_BROKER_URL": self.settings.broker_url or "",
            "ORCHESTRATOR_PREFIX": self.settings.prefix,
            "AGENT_ID": agent_id,
            "AGENT_CAPABILITIES": ",".join(capabilities),
            "PYTHONPATH": str(ROOT),
            **{k: str(v) for k, v in env.items()},
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "agents", "tests.agent_app:make_agent"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file(agent_id),
        )
        self.processes.append(process)
        return process

    def _log_file(self, agent_id: str):
        """An agent process's log (a pipe nobody reads would block it once full)."""
        log = tempfile.NamedTemporaryFile(
            "w+b", prefix=f"agent-{agent_id}-", suffix=".log", delete=False
        )
        self.logs.append(log)
        return log

    async def inject_event(self, routing_key: str, body: bytes) -> None:
        """Put raw bytes on the orchestrator's events exchange, as a broken
        publisher would (they reach it as a dead letter, not as an event)."""
        bus = self.orchestrator.bus
        if isinstance(bus, MemoryBus):
            await bus.publish_raw(bus.topology.events_exchange, routing_key, body)
            return
        connection = await aio_pika.connect(self.settings.broker_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(bus.topology.events_exchange)
            await exchange.publish(aio_pika.Message(body), routing_key=routing_key)

    async def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                await asyncio.wait_for(agent.stop(drain_timeout=0.5), 10)
            except Exception:
                await agent.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        keep = os.environ.get("DEPLOYMENT_LOGS")  # a folder: agent process logs kept there
        for log in self.logs:
            log.close()
            if keep:
                shutil.copy(log.name, Path(keep) / Path(log.name).name)
            os.unlink(log.name)
        # (agents' events queues: those the orchestrator did not delete as they left)
        agent_ids = {agent.agent_id for agent in self.agents}
        if self.orchestrator is not None:
            try:
                keys = set(await self.orchestrator.get_queues())
            except NotLeader:  # it stood by (or stepped down): it declared no task queue
                keys = set()
            agent_ids |= {agent.agent_id for agent in self.orchestrator.registry}
            await self.orchestrator.stop()
        else:
            keys = set()
        for bus in self.buses:
            await bus.close()
        if self.bus_kind == "rabbitmq":
            cleaner = RabbitMQBus(settings=self.settings)
            await cleaner.connect()
            try:
                await cleaner.delete_topology(keys | self.queue_keys, agent_ids)
            finally:
                await cleaner.close()


async def echo(ctx: TaskContext) -> dict[str, Any]:
    return {"echo": ctx.payload, "agent": ctx.agent_id}


async def running_on(orch: TaskOrchestrator, task_id: str, agent_id: str) -> bool:
    """Whether the task is running on that agent, as the orchestrator sees it."""
    status = await orch.get_task_status(task_id)
    return (
        status is not None
        and status["status"] == "running"
        and status["assigned_agent"] == agent_id
    )


async def registered(orch: TaskOrchestrator) -> set[str]:
    """The ids of the agents the orchestrator has registered."""
    return {a.agent_id for a in await orch.get_agents()}


async def gone(orch: TaskOrchestrator, agent_id: str) -> bool:
    """Whether the orchestrator no longer has that agent registered."""
    return agent_id not in await registered(orch)


async def queue_counts(url: str, name: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, by a passive declare on a connection of its own."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count, declared.declaration_result.consumer_count


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 30, interval: float = 0.02
) -> None:
    """Re-check ``condition`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def wait_all(
    orch: TaskOrchestrator, task_ids: list[str], timeout: float = 60
) -> list[dict[str, Any]]:
    """Every task's final status, waiting on the orchestrator's own events."""
    return list(
        await asyncio.wait_for(asyncio.gather(*(orch.wait_for_task(t) for t in task_ids)), timeout)
    )
