"""A DAG of 10,000 tasks: does releasing dependents stay cheap as the graph grows?

Builds a random layered DAG (each task depends on up to ``--fan-in`` earlier
tasks), runs it to completion with no-op agents, and prints the end-to-end
rate and the time the orchestrator spent finishing completed tasks, which is
where their dependents are released and published. That time per task should
depend on a task's own dependents, not on the size of the graph, so the
script also runs a graph a tenth of the size and prints the ratio of the
per-task release times (close to 1 means no growth with the graph).

    python tests/bench/dag.py [--tasks 10000] [--fan-in 3] [--agents 4] [--bus memory|rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from typing import Any

from agents import Agent, TaskContext
from broker import BusSettings, CommunicationBus, MemoryBus, RabbitMQBus, default_broker_url
from orchestrator import TaskOrchestrator, TaskStatus


class TimedOrchestrator(TaskOrchestrator):
    """Counts the time spent in ``_finish`` for completed tasks (release included)."""

    release_seconds = 0.0
    releases = 0
    worst = 0.0

    async def _finish(self, task, status, **kwargs: Any) -> None:  # type: ignore[override]
        began = time.perf_counter()
        await super()._finish(task, status, **kwargs)
        if status is TaskStatus.COMPLETED:
            spent = time.perf_counter() - began
            self.release_seconds += spent
            self.releases += 1
            self.worst = max(self.worst, spent)


async def run(tasks: int, fan_in: int, agents: int, bus_kind: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    settings = BusSettings(
        broker_url=default_broker_url() if bus_kind == "rabbitmq" else None,
        prefix=f"bench-dag-{uuid.uuid4().hex[:6]}",
    )
    shared = MemoryBus(settings=settings) if bus_kind == "memory" else None

    def new_bus() -> CommunicationBus:
        return shared if shared is not None else RabbitMQBus(settings=settings)

    orchestrator = TimedOrchestrator(new_bus())
    await orchestrator.start()
    workers = []
    for i in range(agents):
        agent = Agent(f"dag-agent-{i}", [], 50)

        @agent.handler()
        async def noop(ctx: TaskContext) -> dict:
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
                name=f"n{i}", description="", task_type="noop", payload={}, dependencies=deps
            )
        )
    submitted = time.perf_counter() - began
    statuses = await asyncio.gather(*(orchestrator.wait_for_task(t, timeout=600) for t in ids))
    elapsed = time.perf_counter() - began
    completed = sum(1 for s in statuses if s["status"] == "completed")

    for agent in workers:
        await agent.stop()
    await orchestrator.stop()
    if bus_kind == "rabbitmq":
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
        "release_us_mean": orchestrator.release_seconds / max(1, orchestrator.releases) * 1e6,
        "release_us_worst": orchestrator.worst * 1e6,
        "release_s_total": orchestrator.release_seconds,
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
    args = parser.parse_args()
    rows = []
    for size in (max(1, args.tasks // 10), args.tasks):
        rows.append(asyncio.run(run(size, args.fan_in, args.agents, args.bus, args.seed)))
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
    print(
        f"release time per task, {large['tasks']} vs {small['tasks']} tasks: "
        f"x{large['release_us_mean'] / small['release_us_mean']:.2f}"
    )


if __name__ == "__main__":
    main()
