"""What every system of the peer benchmark shares: one measurement, read the same way.

A system (this project, Celery, Dramatiq, taskiq, the raw aio-pika loop) is a
``Runner``: it starts its worker processes, runs tasks one at a time or N at
once, and stops. ``measure`` drives a runner through the same phases for
every system, so that no system is timed differently from another:

1. setup and a warm-up batch (not measured: imports, connections, JIT-less
   first calls);
2. the idle phase: tasks one at a time, each timed from the submit to the
   start its worker reports (the handler returns ``time.monotonic()``, a
   machine-wide clock on Linux) and to the result the client sees;
3. the load phase: N tasks submitted at once, each timed from its submit to
   its result; tasks/s is N over the whole phase. The CPU time of every
   process (``/proc/<pid>/stat`` utime + stime: the kernel's accounting, not
   a sampler) and the broker's AMQP counters (management API) are read just
   before and just after it.

Why /proc and not psutil: psutil is not a dependency of the project, and
two fields of one file are all that is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

TICKS = os.sysconf("SC_CLK_TCK")
EMIT = 0.6
"""Seconds within which a channel has sent its counters to the management
plugin (the private node's channels emit every 500 ms, see ``peers.start_node``)."""
TICK = 5.5
"""The management plugin folds those into its overview totals once every 5 s."""


# ---------------------------------------------------------------- CPU


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pids: Iterable[int]) -> set[int]:
    """The processes and all their live descendants (a prefork pool's children,
    a Dramatiq or taskiq worker's forks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def snapshot(kinds: dict[str, set[int]]) -> dict[str, dict[int, float]]:
    return {
        kind: {pid: s for pid in pids if (s := cpu_seconds(pid)) is not None}
        for kind, pids in kinds.items()
    }


def cpu_ms_per_task(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], tasks: int
) -> dict[str, float]:
    """CPU milliseconds per task of each kind of process over the load phase."""
    out = {}
    for kind, ends in after.items():
        starts = before.get(kind, {})
        used = sum(end - starts.get(pid, 0.0) for pid, end in ends.items())
        out[kind] = round(used * 1000 / tasks, 3)
    out["total"] = round(sum(out.values()), 3)
    return out


# ---------------------------------------------------------------- AMQP counters

AMQP_COUNTERS = ("publish", "deliver_get", "ack", "confirm", "redeliver")


def amqp_counters(management_url: str | None) -> dict[str, int] | None:
    """The broker's cumulative message counters (``/api/overview``), or None
    without a management API."""
    if not management_url:
        return None
    parts = urlsplit(management_url)
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.hostname}:{parts.port}/api/overview",
        headers={
            "Authorization": "Basic "
            + b64encode(
                f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()
            ).decode()
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response).get("message_stats", {})
    return {name: int(stats.get(name, 0)) for name in AMQP_COUNTERS}


def settled_counters(management_url: str | None) -> dict[str, int] | None:
    """The counters once they hold everything done so far: after a fold of the
    overview that came later than every channel's last emission (a change of
    the totals seen after ``EMIT``; at most ``TICK`` later there was one)."""
    if not management_url:
        return None
    time.sleep(EMIT)
    first = amqp_counters(management_url)
    deadline = time.monotonic() + TICK
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = amqp_counters(management_url)
        if now != first:
            return now
    return amqp_counters(management_url)


def per_task(before: dict[str, int] | None, after: dict[str, int] | None, tasks: int) -> Any:
    if before is None or after is None:
        return None
    return {name: round((after[name] - before[name]) / tasks, 3) for name in AMQP_COUNTERS}


# ---------------------------------------------------------------- the runner


class Runner(Protocol):
    """One system under test, driven synchronously (async systems run their
    own event loop inside these calls)."""

    def setup(self) -> None: ...
    def worker_pids(self) -> list[int]: ...
    def one(self, i: int) -> tuple[float, float, float]:
        """Run one task: (submitted, started in the worker, result seen), monotonic."""
        ...

    def batch(self, n: int) -> list[tuple[float, float]]:
        """Run n tasks at once: (submitted, result seen) of each, monotonic."""
        ...

    def teardown(self) -> None: ...


@dataclass
class Options:
    tasks: int
    idle: int
    warmup: int
    workers: int
    concurrency: int
    broker_url: str
    management_url: str | None
    redis_url: str
    prefix: str
    broker_pid: int | None
    redis_pid: int | None
    timeout: float
    extra: dict[str, Any] = field(default_factory=dict)


def bench_env(options: Options, system: str, variant: str) -> dict[str, str]:
    """What the peers' app modules are built from, in the client and in their
    worker processes (which inherit it): set before the module is imported."""
    return {
        "BENCH_BROKER_URL": options.broker_url,
        "BENCH_REDIS_URL": options.redis_url,
        "BENCH_QUEUE": f"{options.prefix}_{system}".replace("-", "_"),
        "BENCH_CONFIRMS": "1" if variant == "confirms" else "0",
    }


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure(runner: Runner, options: Options, uses_redis: bool) -> dict[str, Any]:
    """The three phases above, for one system; the figures as a dict."""
    runner.setup()
    try:
        runner.batch(options.warmup)
        idle = [runner.one(i) for i in range(options.idle)]
        kinds = {"client": {os.getpid()}, "workers": descendants(runner.worker_pids())}
        if options.broker_pid:
            kinds["broker"] = {options.broker_pid}
        if uses_redis and options.redis_pid:
            kinds["redis"] = {options.redis_pid}
        counters_before = settled_counters(options.management_url)
        cpu_before = snapshot(kinds)
        began = time.monotonic()
        timed = runner.batch(options.tasks)
        ended = time.monotonic()
        cpu_after = snapshot(kinds)
        counters_after = settled_counters(options.management_url)
    finally:
        runner.teardown()
    latencies = [done - sent for sent, done in timed]
    return {
        "tasks": options.tasks,
        "completed": len(timed),
        "seconds": round(ended - began, 4),
        "tasks_per_s": round(options.tasks / (ended - began), 1),
        "load_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "load_p99_ms": round(pct(latencies, 0.99) * 1000, 3),
        "idle_start_p50_ms": round(statistics.median(s - t for t, s, _ in idle) * 1000, 3),
        "idle_result_p50_ms": round(statistics.median(r - t for t, _, r in idle) * 1000, 3),
        "cpu_ms_per_task": cpu_ms_per_task(cpu_before, cpu_after, options.tasks),
        "amqp_per_task": per_task(counters_before, counters_after, options.tasks),
    }


# ---------------------------------------------------------------- processes and topology

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Worker processes of one system, each logging to a file of its own (an
    unread pipe could fill up and block it)."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        log = tempfile.TemporaryFile()
        self.logs.append(log)
        self.processes.append(
            subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                log.seek(0)
                text = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(
                    f"worker {process.args} exited with {process.returncode}: {text}"
                )

    def stop(self, timeout: float = 15) -> None:
        from tests.bench.throughput import stop_processes

        stop_processes(self.processes, timeout)
        for log in self.logs:
            log.close()


async def queue_consumers(url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count
    except aio_pika.exceptions.ChannelClosed:
        return 0
    finally:
        await connection.close()


def wait_consumers(url: str, queue: str, count: int, workers: Workers, timeout: float) -> None:
    """Until ``queue`` has ``count`` consumers: every worker is up before anything
    is measured (a worker still starting would put its start-up into the figures)."""
    deadline = time.monotonic() + timeout
    while asyncio.run(queue_consumers(url, queue)) < count:
        workers.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue}: fewer than {count} consumers after {timeout:g}s")
        time.sleep(0.2)


async def delete_topology_async(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        for name in queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.ChannelClosed:
                pass
        for name in exchanges:
            channel = await connection.channel()
            try:
                await channel.exchange_delete(name)
            except aio_pika.exceptions.ChannelClosed:
                pass
    finally:
        await connection.close()


def delete_topology(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    try:
        asyncio.run(delete_topology_async(url, list(queues), list(exchanges)))
    except Exception as exc:  # cleanup must not hide the run's own outcome
        print(f"could not delete {list(queues)}: {exc}", file=sys.stderr)


def flush_redis(url: str) -> None:
    """FLUSHDB of the benchmark's own Redis database (the URL names it), never FLUSHALL."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
