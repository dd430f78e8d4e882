"""In-process figures: what the orchestrator itself costs, with no broker in the way.

Three figures, through the public API (``TaskOrchestrator``, ``agents.Agent``)
on the in-process ``MemoryBus``:

- no-op tasks/s: ``throughput.run_memory`` (two in-process agents, each task
  submitted and awaited to its result);
- the cost of one submit with 1k, 100k, 1M tasks pending: an orchestrator with
  no agent (so every task stays pending) is filled up to each count, and then
  ``SAMPLE`` submits are timed one by one; flat means the cost does not grow
  with what is pending. Beside it, the mean cost over each bulk fill, which
  also holds the interpreter's full garbage collections;
- memory per retained finished task: ``tracemalloc``'s traced memory after
  ``RETAINED`` tasks ran to completion and are kept (as the orchestrator keeps
  finished tasks for ``get_task_status``), less the memory before, per task;
  the peak over the same run is reported beside it.

Run alone: ``.venv/bin/python -m tests.bench.inprocess --tasks 20000``; the
peer benchmark runs it in a child process of its own, so that no other run's
memory is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from broker import BusSettings, MemoryBus, event_loop
from orchestrator import OrchestratorSettings, TaskOrchestrator
from tests.bench import throughput
from tests.bench.peer_common import ROOT

SAMPLE = 500
"""Submits timed at each pending count."""
CHUNK = 500
RETAINED = 5000


async def submit_many(orchestrator: TaskOrchestrator, n: int) -> None:
    for low in range(0, n, CHUNK):
        await asyncio.gather(
            *(
                orchestrator.submit_task(name="p", description="", task_type="wait", payload={})
                for _ in range(min(CHUNK, n - low))
            )
        )


async def submit_cost(pending: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds per submit at each pending count: the median of ``SAMPLE``
    timed one by one, and the mean over the bulk fill up to that count (chunks
    of ``CHUNK`` at once; this one includes the interpreter's full garbage
    collections, which scan every retained object and come once the heap
    grew by a quarter, too rarely to fall among the timed ones)."""
    bus = MemoryBus(settings=BusSettings(prefix=throughput.new_prefix()))
    await bus.connect()
    orchestrator = TaskOrchestrator(bus)
    costs: dict[str, float] = {}
    bulk: dict[str, float] = {}
    try:
        await orchestrator.start()
        have = 0
        for target in sorted(pending):
            began = time.perf_counter()
            filled = max(0, target - have)
            await submit_many(orchestrator, filled)
            if filled:
                bulk[str(target)] = round((time.perf_counter() - began) / filled * 1e6, 2)
            have = max(have, target)
            gc.collect()
            timings = []
            for _ in range(SAMPLE):
                began = time.perf_counter()
                await orchestrator.submit_task(
                    name="p", description="", task_type="wait", payload={}
                )
                timings.append(time.perf_counter() - began)
            have += SAMPLE
            timings.sort()
            costs[str(target)] = round(timings[len(timings) // 2] * 1e6, 2)
    finally:
        await orchestrator.stop()
        await bus.close()
    return costs, bulk


async def retained_bytes(tasks: int) -> tuple[float, float]:
    """(bytes retained per finished task, peak bytes per task) over ``tasks`` no-op tasks."""
    bus = MemoryBus(settings=BusSettings(prefix=throughput.new_prefix()))
    await bus.connect()
    # tracemalloc slows everything several times over: an agent's heartbeat
    # must not be judged late meanwhile.
    orchestrator = TaskOrchestrator(bus, settings=OrchestratorSettings(heartbeat_timeout=3600))
    agent = throughput.noop_agent("retain-agent", 50)
    try:
        await orchestrator.start()
        await agent.start(bus)
        await throughput.wait_agents(orchestrator, {agent.agent_id}, 30)
        await throughput.submit_and_wait(orchestrator, 200, 60)  # warm: caches, first objects
        gc.collect()
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await throughput.submit_and_wait(orchestrator, tasks, 600)
        # Measured from the next step of the loop: until then the callback that
        # woke us holds the final gather and with it every task's status dict
        # and waiting task (about 1.2 KB a task), which are the benchmark's own.
        await asyncio.sleep(0)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await agent.stop(drain_timeout=1)
        await orchestrator.stop()
        await bus.close()
    return (after - before) / tasks, (peak - before) / tasks


def measure(tasks: int, pending: list[int]) -> dict[str, Any]:
    args = argparse.Namespace(tasks=tasks, agents=2, concurrency=50, store="memory", timeout=600)
    # On the loop the project's processes run on (uvloop where installed).
    speed = event_loop.run(throughput.run_memory(args))
    costs, bulk = event_loop.run(submit_cost(pending)) if pending else ({}, {})
    retained = min(RETAINED, max(tasks, 1))
    per_task, peak = event_loop.run(retained_bytes(retained))
    values = [costs[k] for k in sorted(costs, key=int)]
    return {
        "tasks": tasks,
        "agents": args.agents,
        "loop": event_loop.name(),
        "completed": speed.completed,
        "tasks_per_s": speed.tasks_per_s,
        "submit_us_by_pending": costs,
        "submit_cost_ratio": round(values[-1] / values[0], 3) if len(values) > 1 else None,
        "bulk_submit_us_by_pending": bulk,
        "retained_tasks": retained,
        "bytes_per_finished_task": round(per_task, 1),
        "peak_bytes_per_task": round(peak, 1),
    }


def run_in_child(tasks: int, pending: list[int]) -> dict[str, Any] | None:
    """``measure`` in a fresh process; None (and why, on stderr) if it failed."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "inprocess.json"
        command = [sys.executable, "-m", "tests.bench.inprocess", f"--tasks={tasks}"]
        command += [f"--pending={','.join(map(str, pending))}", f"--out={out}"]
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL)
        if done.returncode != 0 or not out.exists():
            print(f"error: the in-process figures failed (exit {done.returncode})", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="In-process figures of the orchestrator.")
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--pending", default="1000,100000,1000000")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    pending = [int(p) for p in args.pending.split(",") if p.strip()]
    figures = measure(args.tasks, pending)
    text = json.dumps(figures, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
