"""Throughput of no-op tasks through the orchestrator, on each bus.

What is measured
----------------
N tasks whose handler does nothing are submitted to a ``TaskOrchestrator``
with ``submit_task`` (concurrently, in chunks of 200 with ``asyncio.gather``),
and every one is awaited with ``wait_for_task``. Two figures come out:

- submit/s: N divided by the time from the first submit to the return of the
  last one (on RabbitMQ each submit returns once the broker has confirmed the
  publish);
- end-to-end tasks/s: N divided by the time from the first submit to the last
  completion the orchestrator has recorded, that is to say the whole round
  trip: orchestrator -> task queue -> agent -> TaskStarted / TaskFinished
  events -> orchestrator.

Peak RSS is the ``ru_maxrss`` of the process that runs the orchestrator (and,
on the in-process bus, the agents too); on RabbitMQ the agents' own peak RSS
(``VmHWM``, the largest of them) is reported beside it.

The buses
---------
``memory``: a ``MemoryBus``, the orchestrator and K ``agents.Agent`` objects in
this one process; each agent's handler is ``async def noop(ctx): return {}``.

``rabbitmq``: the orchestrator in this process on a ``RabbitMQBus``, and K
agents in their own processes (``python -m agents
tests.bench.throughput:make_noop_agent``), running the same no-op handler as
the in-process agents: on both buses a task costs two events (started,
finished) and no work. ``--agent-app MODULE:FACTORY`` runs other agents in
those processes, configured by the same environment variables (AGENT_ID,
AGENT_MAX, AGENT_HEARTBEAT; for example ``tests.agent_app:make_agent``, the
tests' agent, which also reports progress once per task). Every run uses its
own prefix (``bench-<uuid8>``) and deletes its queues and exchanges at the end.

With ``--bus both`` each bus runs in a child process of its own, so that
neither run's memory shows in the other's peak RSS; the ratio rabbitmq/memory
is printed after the table.

How to run it
-------------
From the repository root, with RabbitMQ on the broker URL::

    .venv/bin/python tests/bench/throughput.py
    .venv/bin/python tests/bench/throughput.py --tasks 200 --agents 1 --bus memory
    .venv/bin/python tests/bench/throughput.py --bus rabbitmq --broker amqp://guest:guest@host:5672/
    .venv/bin/python tests/bench/throughput.py --json > results.json
    .venv/bin/python tests/bench/throughput.py --store sqlite   # state in a SQLite file

Defaults: 2000 tasks, 2 agents, 50 concurrent tasks per agent, both buses,
the broker from ``ORCHESTRATOR_BROKER_URL`` or ``amqp://guest:guest@127.0.0.1:5672/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from agents import Agent, TaskContext
from broker import (
    BusError,
    BusSettings,
    MemoryBus,
    RabbitMQBus,
    default_broker_url,
    event_loop,
    redact_url,
)
from orchestrator import SQLiteStore, StateStore, TaskOrchestrator

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 200
"""Submits awaited together."""
BUSES = ("memory", "rabbitmq")
NOOP_AGENT_APP = "tests.bench.throughput:make_noop_agent"
"""What the RabbitMQ agent processes run by default: ``make_noop_agent`` below."""


@dataclass
class Result:
    bus: str
    tasks: int
    agents: int
    concurrency: int
    completed: int
    """Tasks that ended ``completed`` (anything else is reported as an error)."""
    submit_seconds: float
    total_seconds: float
    submit_per_s: float
    tasks_per_s: float
    peak_rss_mib: float
    """Peak RSS of the orchestrator's process."""
    agent_peak_rss_mib: float | None
    """Largest peak RSS of the agent processes (RabbitMQ only)."""
    agent_app: str | None
    """What the agent processes ran (RabbitMQ only)."""
    store: str = "memory"
    """The orchestrator's state store: memory, or sqlite (a file in a temporary directory)."""


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def process_peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a running process (Linux), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------- the measurement


async def wait_agents(
    orchestrator: TaskOrchestrator,
    agent_ids: set[str],
    timeout: float,
    processes: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    """Until the orchestrator has registered every one of ``agent_ids`` and
    told each which queues to consume (``Registry.told``): a task queue
    declared after that is told of after it, on the same control queue."""
    deadline = time.monotonic() + timeout
    while True:
        told = {a for a in agent_ids if orchestrator.registry.told(a) is not None}
        if told == agent_ids:
            return
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"agent process {process.pid} exited with {process.returncode}")
        if time.monotonic() > deadline:
            missing = sorted(agent_ids - told)
            raise TimeoutError(f"agents not registered within {timeout:g}s: {missing}")
        await asyncio.sleep(0.02)


async def submit_and_wait(
    orchestrator: TaskOrchestrator, tasks: int, timeout: float
) -> tuple[float, float, int]:
    """Submit ``tasks`` no-op tasks and wait for them all.

    Returns (seconds to submit them, seconds until the last completed, how
    many completed), both times counted from the first submit.
    """
    task_ids: list[str] = []
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            for low in range(0, tasks, CHUNK):
                task_ids += await asyncio.gather(
                    *(
                        orchestrator.submit_task(
                            name=f"noop-{i}", description="", task_type="noop", payload={"i": i}
                        )
                        for i in range(low, min(tasks, low + CHUNK))
                    )
                )
            submitted = time.perf_counter()
            statuses = await asyncio.gather(*(orchestrator.wait_for_task(t) for t in task_ids))
    except TimeoutError:
        stats = await orchestrator.get_stats()
        raise TimeoutError(
            f"not every task finished within {timeout:g}s: "
            f"{stats['completed_tasks']} completed, {stats['pending_tasks']} waiting, "
            f"{stats['running_tasks']} running"
        ) from None
    finished = time.perf_counter()
    completed = sum(1 for s in statuses if s["status"] == "completed")
    return submitted - start, finished - start, completed


def make_result(
    bus: str,
    args: argparse.Namespace,
    measured: tuple[float, float, int],
    agent_rss: float | None = None,
) -> Result:
    submit_seconds, total_seconds, completed = measured
    return Result(
        bus=bus,
        tasks=args.tasks,
        agents=args.agents,
        concurrency=args.concurrency,
        completed=completed,
        submit_seconds=round(submit_seconds, 4),
        total_seconds=round(total_seconds, 4),
        submit_per_s=round(args.tasks / submit_seconds, 1),
        tasks_per_s=round(args.tasks / total_seconds, 1),
        peak_rss_mib=round(peak_rss_mib(), 1),
        agent_peak_rss_mib=None if agent_rss is None else round(agent_rss, 1),
        agent_app=args.agent_app if bus == "rabbitmq" else None,
        store=args.store,
    )


def make_store(args: argparse.Namespace, directory: str) -> StateStore | None:
    """The store ``--store`` names; None is the orchestrator's own memory store."""
    return SQLiteStore(Path(directory) / "state.sqlite") if args.store == "sqlite" else None


def new_prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- in-process bus


def noop_agent(agent_id: str, concurrency: int, **options: Any) -> Agent:
    agent = Agent(agent_id, [], concurrency, **options)

    @agent.handler()
    async def noop(ctx: TaskContext) -> dict[str, Any]:
        return {}

    return agent


def make_noop_agent() -> Agent:
    """What the RabbitMQ agent processes run (the ``--agent-app`` default): the
    in-process agents' no-op agent, configured like ``tests/agent_app.py``
    (AGENT_ID, AGENT_MAX, AGENT_HEARTBEAT)."""
    return noop_agent(
        os.environ["AGENT_ID"],
        int(os.environ.get("AGENT_MAX", "5")),
        heartbeat_interval=float(os.environ.get("AGENT_HEARTBEAT", "0.3")),
    )


async def run_memory(args: argparse.Namespace) -> Result:
    prefix = new_prefix()
    bus = MemoryBus(settings=BusSettings(prefix=prefix))
    await bus.connect()
    directory = tempfile.TemporaryDirectory()
    orchestrator = TaskOrchestrator(bus, store=make_store(args, directory.name))
    agents: list[Agent] = []
    try:
        await orchestrator.start()
        for k in range(args.agents):
            agent = noop_agent(f"{prefix}-agent-{k}", args.concurrency)
            await agent.start(bus)
            agents.append(agent)
        await wait_agents(orchestrator, {a.agent_id for a in agents}, args.timeout)
        measured = await submit_and_wait(orchestrator, args.tasks, args.timeout)
        return make_result("memory", args, measured)
    finally:
        for agent in agents:
            await agent.stop(drain_timeout=1)
        await orchestrator.stop()
        await bus.close()
        directory.cleanup()


# ---------------------------------------------------------------- RabbitMQ


def spawn_agent(
    app: str, agent_id: str, settings: BusSettings, concurrency: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """An agent in its own process, as ``tests.harness.Harness.spawn_agent`` does."""
    environment = {
        **os.environ,
        "ORCHESTRATOR_BROKER_URL": settings.broker_url or "",
        "ORCHESTRATOR_PREFIX": settings.prefix,
        "AGENT_ID": agent_id,
        "AGENT_CAPABILITIES": "",
        "AGENT_MAX": str(concurrency),
        "AGENT_SLEEP": "0",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "agents", app],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,  # a file, not a pipe: an unread pipe can fill up and block the agent
    )


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log: IO[bytes], lines: int = 20) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


async def run_rabbitmq(args: argparse.Namespace) -> Result:
    settings = BusSettings(broker_url=args.broker, prefix=new_prefix())
    bus = RabbitMQBus(settings=settings)
    directory = tempfile.TemporaryDirectory()
    orchestrator = TaskOrchestrator(bus, store=make_store(args, directory.name))
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    connected = ok = False
    try:
        await bus.connect()  # declares the fixed topology
        connected = True
        await orchestrator.start()
        agent_ids = [f"{settings.prefix}-agent-{k}" for k in range(args.agents)]
        for agent_id in agent_ids:
            logs.append(tempfile.TemporaryFile())
            processes.append(
                spawn_agent(args.agent_app, agent_id, settings, args.concurrency, logs[-1])
            )
        await wait_agents(orchestrator, set(agent_ids), args.timeout, processes)
        measured = await submit_and_wait(orchestrator, args.tasks, args.timeout)
        rss = [process_peak_rss_mib(p.pid) for p in processes]
        known = [r for r in rss if r is not None]
        ok = True
        return make_result("rabbitmq", args, measured, max(known) if known else None)
    finally:
        await asyncio.to_thread(stop_processes, processes)
        if not ok:
            for process, log in zip(processes, logs, strict=True):
                text = tail(log)
                if text or process.returncode not in (0, -signal.SIGTERM):
                    print(f"--- agent {process.pid} (exit {process.returncode}):", file=sys.stderr)
                    print(text, file=sys.stderr)
        for log in logs:
            log.close()
        keys: set[str] = set()
        try:
            if connected:
                with contextlib.suppress(Exception):  # it may not have started
                    keys = set(await orchestrator.get_queues())
            await orchestrator.stop()
            await bus.close()  # ours: we connected it before start()
        finally:
            directory.cleanup()
            if connected:
                await delete_topology(settings, keys)


async def delete_topology(settings: BusSettings, queue_keys: set[str]) -> None:
    """Delete the run's queues and exchanges, on a connection of its own."""
    cleaner = RabbitMQBus(settings=settings)
    try:
        await cleaner.connect()
        await cleaner.delete_topology(queue_keys)
    except Exception as exc:
        print(f"could not delete the {settings.prefix} topology: {exc}", file=sys.stderr)
    finally:
        await cleaner.close()


# ---------------------------------------------------------------- reporting


def ratios(results: list[Result]) -> dict[str, float] | None:
    by_bus = {r.bus: r for r in results}
    if not set(BUSES) <= set(by_bus):
        return None
    rabbit, memory = by_bus["rabbitmq"], by_bus["memory"]
    return {
        "tasks_per_s": round(rabbit.tasks_per_s / memory.tasks_per_s, 4),
        "submit_per_s": round(rabbit.submit_per_s / memory.submit_per_s, 4),
    }


def table(results: list[Result]) -> str:
    header = (
        "bus",
        "store",
        "tasks",
        "agents",
        "concurrency",
        "submit/s",
        "tasks/s",
        "peak RSS MiB",
        "agent RSS MiB",
    )
    rows = [header] + [
        (
            r.bus,
            r.store,
            str(r.tasks),
            str(r.agents),
            str(r.concurrency),
            f"{r.submit_per_s:.0f}",
            f"{r.tasks_per_s:.0f}",
            f"{r.peak_rss_mib:.1f}",
            "-" if r.agent_peak_rss_mib is None else f"{r.agent_peak_rss_mib:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.completed != r.tasks:
            lines.append(f"warning: {r.bus}: only {r.completed} of {r.tasks} tasks completed")
    for r in results:
        if r.agent_app is not None:
            lines.append(f"{r.bus} agents ran {r.agent_app}")
    ratio = ratios(results)
    if ratio is not None:
        lines.append(
            f"rabbitmq/memory: end-to-end tasks/s x{ratio['tasks_per_s']:.3f}, "
            f"submit/s x{ratio['submit_per_s']:.3f}"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, results: list[Result]) -> dict[str, Any]:
    return {
        "benchmark": "no-op tasks through rabbit-task-orchestrator",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "broker": redact_url(args.broker) if "rabbitmq" in {r.bus for r in results} else None,
        "results": [asdict(r) for r in results],
        "ratio_rabbitmq_over_memory": ratios(results),
    }


# ---------------------------------------------------------------- main


def run_child(bus: str, args: argparse.Namespace) -> Result | None:
    """One bus in a fresh process, so that its peak RSS is its own; None if it failed."""
    command = [
        sys.executable,
        "-m",
        "tests.bench.throughput",
        f"--bus={bus}",
        f"--tasks={args.tasks}",
        f"--agents={args.agents}",
        f"--concurrency={args.concurrency}",
        f"--broker={args.broker}",
        f"--timeout={args.timeout}",
        f"--agent-app={args.agent_app}",
        f"--store={args.store}",
        "--json",
    ]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE) as child:
        try:
            stdout, _ = child.communicate()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it delete its topology (no kill).
            child.wait()
            raise
    try:
        return Result(**json.loads(stdout)["results"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        # It said why on stderr, which it shares with us.
        print(f"error: the {bus} run failed (exit {child.returncode})", file=sys.stderr)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tasks/s of no-op tasks through the in-process bus and through RabbitMQ."
    )
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to run (default 2000)")
    parser.add_argument("--agents", type=int, default=2, help="agents (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="concurrent tasks per agent (default 50)"
    )
    parser.add_argument("--bus", choices=(*BUSES, "both"), default="both")
    parser.add_argument(
        "--broker",
        default=default_broker_url(),
        help="amqp:// URL (default: ORCHESTRATOR_BROKER_URL or the local broker)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the agents to register, and for the tasks (default 90)",
    )
    parser.add_argument(
        "--agent-app",
        default=NOOP_AGENT_APP,
        help=f"module:factory the RabbitMQ agent processes run (default {NOOP_AGENT_APP}: the"
        " in-process agents' no-op agent, so both buses run the same work)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "sqlite"),
        default="memory",
        help="the orchestrator's state store (default memory; sqlite: a file in a temp dir)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    for name in ("tasks", "agents", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    if args.bus == "both":
        runs = [run_child(bus, args) for bus in BUSES]
        results = [r for r in runs if r is not None]
        if not results:
            return 1
    else:
        runner = run_memory if args.bus == "memory" else run_rabbitmq
        try:
            results = [event_loop.run(runner(args))]  # uvloop where installed, as the agents
        except (TimeoutError, RuntimeError, ConnectionError, BusError) as exc:
            print(f"error: {args.bus}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report(args, results), indent=2))
    else:
        print(table(results))
    failed = args.bus == "both" and len(results) < len(BUSES)
    return 0 if not failed and all(r.completed == r.tasks for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
