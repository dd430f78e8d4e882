"""A DAG of 10,000 tasks: does releasing dependents stay cheap as the graph grows?

Builds a random layered DAG (each task depends on up to ``--fan-in`` earlier
tasks), runs it to completion with no-op agents, and prints the end-to-end
rate and the time the orchestrator spent handling each ``completed`` event,
which is where the task is finished and its dependents are released and
published. That time per task should depend on a task's own dependents, not
on the size of the graph, so the script also runs a graph a tenth of the size
and prints the ratio of the per-task release times (close to 1 means no
growth with the graph). The time is taken around the orchestrator's event
handler, wrapped by the bus it is given (no private method is touched).

Exits 1 when not every task completed (``--fail-rate`` makes some fail on
purpose: their dependents fail too).

    python tests/bench/dag.py [--tasks 10000] [--fan-in 3] [--agents 4] [--bus memory|rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from agents import Agent, TaskContext
from broker import (
    BusSettings,
    CommunicationBus,
    Event,
    MemoryBus,
    RabbitMQBus,
    TaskFinished,
    default_broker_url,
)
from broker.bus import BeforeAck, EventHandler, Subscription
from orchestrator import TaskOrchestrator


class ReleaseTimer:
    """The time the orchestrator spends handling ``completed`` events: the task
    is finished there and its dependents are released and published."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self.worst = 0.0

    def around(self, handler: EventHandler) -> EventHandler:
        async def timed(event: Event) -> None:
            if not (isinstance(event, TaskFinished) and event.outcome == "completed"):
                await handler(event)
                return
            began = time.perf_counter()
            await handler(event)
            spent = time.perf_counter() - began
            self.seconds += spent
            self.count += 1
            self.worst = max(self.worst, spent)

        return timed


def timed_bus(kind: type[CommunicationBus], timer: ReleaseTimer, settings: BusSettings):
    """A bus of ``kind`` whose orchestrator and agent events queues are handled under ``timer``."""

    class TimedBus(kind):  # type: ignore[valid-type, misc]
        async def subscribe_events(
            self,
            handler: EventHandler,
            *,
            patterns: Sequence[str] | None = None,
            before_ack: BeforeAck | None = None,
        ) -> Subscription:
            if patterns is None:  # the orchestrator's own queue
                handler = timer.around(handler)
            return await super().subscribe_events(handler, patterns=patterns, before_ack=before_ack)

        async def subscribe_agent_events(
            self, agent_id: str, handler: EventHandler, *, before_ack: BeforeAck | None = None
        ) -> Subscription:
            # Results come through each agent's own events queue.
            return await super().subscribe_agent_events(
                agent_id, timer.around(handler), before_ack=before_ack
            )

    return TimedBus(settings=settings)


async def run(
    tasks: int,
    fan_in: int,
    agents: int,
    bus_kind: str,
    seed: int,
    fail_rate: float = 0.0,
    prefix: str | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    settings = BusSettings(
        broker_url=default_broker_url() if bus_kind == "rabbitmq" else None,
        prefix=f"{prefix or 'bench-dag-' + uuid.uuid4().hex[:6]}-{tasks}",
    )
    timer = ReleaseTimer()
    kind = MemoryBus if bus_kind == "memory" else RabbitMQBus
    orchestrator_bus = timed_bus(kind, timer, settings)

    def new_bus() -> CommunicationBus:
        # In-process, everyone shares the orchestrator's bus.
        return orchestrator_bus if bus_kind == "memory" else RabbitMQBus(settings=settings)

    orchestrator = TaskOrchestrator(orchestrator_bus)
    workers: list[Agent] = []
    try:
        await orchestrator.start()
        for i in range(agents):
            agent = Agent(f"dag-agent-{i}", [], 50)

            @agent.handler()
            async def noop(ctx: TaskContext) -> dict:
                if ctx.payload.get("fail"):
                    raise RuntimeError("failing on purpose (--fail-rate)")
                return {}

            await agent.start(new_bus())
            workers.append(agent)

        ids: list[str] = []
        edges = 0
        began = time.perf_counter()
        for i in range(tasks):
            deps = rng.sample(
                ids[max(0, i - 500) :], min(len(ids[max(0, i - 500) :]), rng.randint(0, fan_in))
            )
            edges += len(deps)
            ids.append(
                await orchestrator.submit_task(
                    name=f"n{i}",
                    description="",
                    task_type="noop",
                    payload={"fail": True} if rng.random() < fail_rate else {},
                    dependencies=deps,
                    max_retries=0 if fail_rate else 3,
                )
            )
        submitted = time.perf_counter() - began
        statuses = await asyncio.gather(*(orchestrator.wait_for_task(t, timeout=600) for t in ids))
        elapsed = time.perf_counter() - began
        completed = sum(1 for s in statuses if s["status"] == "completed")
    finally:
        for agent in workers:
            await agent.stop()
        await orchestrator.stop()
        if bus_kind == "memory":
            await orchestrator_bus.close()
        else:
            cleaner = RabbitMQBus(settings=settings)
            await cleaner.connect()
            await cleaner.delete_topology()
            await cleaner.close()
    return {
        "tasks": tasks,
        "edges": edges,
        "completed": completed,
        "submit_s": submitted,
        "total_s": elapsed,
        "release_us_mean": timer.seconds / max(1, timer.count) * 1e6,
        "release_us_worst": timer.worst * 1e6,
        "release_s_total": timer.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--fan-in", type=int, default=3)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--bus", choices=["memory", "rabbitmq"], default="memory")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="fraction of tasks whose handler fails, without retries (default 0)",
    )
    parser.add_argument(
        "--prefix",
        help="topology prefix of the runs (each run adds its size; default: a random one)",
    )
    args = parser.parse_args()
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    rows = []
    for size in (max(1, args.tasks // 10), args.tasks):
        rows.append(
            asyncio.run(
                run(
                    size,
                    args.fan_in,
                    args.agents,
                    args.bus,
                    args.seed,
                    args.fail_rate,
                    args.prefix,
                )
            )
        )
    print(f"DAG on the {args.bus} bus, fan-in up to {args.fan_in}, {args.agents} agents x 50 slots")
    print(
        f"{'tasks':>7} {'edges':>7} {'completed':>9} {'submit s':>9} {'total s':>8} {'tasks/s':>8}"
        f" {'release µs mean':>16} {'worst':>9} {'release s':>10}"
    )
    for r in rows:
        print(
            f"{r['tasks']:>7} {r['edges']:>7} {r['completed']:>9} {r['submit_s']:>9.2f} {r['total_s']:>8.2f}"
            f" {r['tasks'] / r['total_s']:>8.0f} {r['release_us_mean']:>16.1f}"
            f" {r['release_us_worst']:>9.0f} {r['release_s_total']:>10.3f}"
        )
    small, large = rows
    if small["release_us_mean"] > 0:
        print(
            f"release time per task, {large['tasks']} vs {small['tasks']} tasks: "
            f"x{large['release_us_mean'] / small['release_us_mean']:.2f}"
        )
    incomplete = [r for r in rows if r["completed"] < r["tasks"]]
    if incomplete:
        for r in incomplete:
            print(f"error: only {r['completed']} of {r['tasks']} tasks completed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
