"""The peer benchmark: this project beside Celery, Dramatiq, taskiq and a raw
aio-pika loop, on one RabbitMQ, in one run.

How to run it (from the repository root)::

    ./run.sh bench peers                       # every system, 2000 tasks, 3 rounds
    ./run.sh bench peers --tasks 500 --rounds 1 --systems project-memory,raw
    ./run.sh bench peers --out docs/bench/peers.json --plot docs/bench/peers.png

Every system pushes N no-op tasks through and waits for every result (see
``peer_common`` for the phases and what each figure is). Rounds are
interleaved (every system once, then again) and each figure is the median of
the rounds. Every run of a system is a fresh client process with fresh worker
processes, so that no system's threads, connections or memory show in
another's figures.

The broker: by default a private RabbitMQ node of this run's own
(``tests/brokers.LocalNode``, the installed rabbitmq-server) with the
management plugin, so that the AMQP counters (publishes, deliveries, acks per
task) are the broker's own and its Erlang VM's CPU is this benchmark's alone.
``--broker URL`` uses another broker instead (the shared one, say): no AMQP
counters then unless ``--management URL`` names its management API, and no
broker CPU. Queue names carry a per-run prefix and are deleted afterwards.

Redis (Dramatiq's and taskiq's results) is ``--redis`` (default
``redis://127.0.0.1:6379/13``): only that database is flushed, never the server.

The peers are installed on demand from ``tests/bench/requirements-peers.txt``
into this interpreter's environment (never the package's dependencies);
``--no-install`` skips the systems whose packages are missing instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.bench.peer_common import ROOT, Options, bench_env, flush_redis, measure
from tests.bench.peer_report import markdown_table, plot

REQUIREMENTS = Path(__file__).with_name("requirements-peers.txt")

SYSTEMS: dict[str, dict[str, Any]] = {
    # name: the module with runner(options, variant), its variant, what it is.
    "project-memory": {
        "module": "tests.bench.peer_project",
        "variant": "memory",
        "label": "this project, memory store",
        "durable": True,
    },
    "project-one-agent": {
        "module": "tests.bench.peer_project",
        "variant": "memory-one-agent",
        "label": "this project, memory store, one agent process (as many processes as raw)",
        "durable": True,
    },
    "project-sqlite": {
        "module": "tests.bench.peer_project",
        "variant": "sqlite",
        "label": "this project, SQLite store",
        "durable": True,
    },
    "celery-solo": {
        "module": "tests.bench.peer_celery",
        "variant": "solo",
        "label": "Celery, solo pool, rpc results, acks_late",
        "durable": False,
        "needs": ("celery",),
    },
    "celery-prefork": {
        "module": "tests.bench.peer_celery",
        "variant": "prefork",
        "label": "Celery, prefork pool, rpc results, acks_late",
        "durable": False,
        "needs": ("celery",),
    },
    "dramatiq": {
        "module": "tests.bench.peer_dramatiq",
        "variant": "plain",
        "label": "Dramatiq, Redis results, no publisher confirms",
        "durable": False,
        "needs": ("dramatiq", "pika", "redis"),
    },
    "dramatiq-confirms": {
        "module": "tests.bench.peer_dramatiq",
        "variant": "confirms",
        "label": "Dramatiq, Redis results, publisher confirms",
        "durable": True,
        "needs": ("dramatiq", "pika", "redis"),
    },
    "taskiq": {
        "module": "tests.bench.peer_taskiq",
        "variant": "plain",
        "label": "taskiq + taskiq-aio-pika, Redis results",
        "durable": True,
        "needs": ("taskiq", "taskiq_aio_pika", "taskiq_redis"),
    },
    "raw": {
        "module": "tests.bench.peer_raw",
        "variant": "plain",
        "label": "raw aio-pika, two processes, persistent + confirms",
        "durable": True,
    },
}
REFERENCE = "project-memory"


# ---------------------------------------------------------------- one run of one system (child)


def run_child_system(name: str, options: Options, out: Path) -> None:
    spec = SYSTEMS[name]
    os.environ.update(bench_env(options, name, spec["variant"]))
    runner, uses_redis = importlib.import_module(spec["module"]).runner(options, spec["variant"])
    if uses_redis:
        flush_redis(options.redis_url)
    try:
        figures = measure(runner, options, uses_redis)
    finally:
        if uses_redis:
            flush_redis(options.redis_url)
    out.write_text(json.dumps(figures))


def run_system(name: str, options: Options) -> dict[str, Any] | None:
    """One run of one system in a fresh process; None (and why, on stderr) if it failed."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "figures.json"
        opts = {**asdict(options), "prefix": f"{options.prefix}-{uuid.uuid4().hex[:6]}"}
        command = [
            sys.executable,
            "-m",
            "tests.bench.peers",
            "--child",
            name,
            "--child-options",
            json.dumps(opts),
            "--child-out",
            str(out),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            print(f"error: {name} failed (exit {done.returncode}):", file=sys.stderr)
            print(done.stderr[-4000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


# ---------------------------------------------------------------- medians and ratios


def median_of(runs: list[Any]) -> Any:
    """The median of each figure across rounds, nested dicts figure by figure."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs if key in run]) for key in first}
    if first is None:
        return None
    if isinstance(first, int | float):
        return round(statistics.median(runs), 3)
    return first


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    reference = results.get(REFERENCE)
    for figures in results.values():
        if reference is None:
            figures["ratio"] = None
            continue
        figures["ratio"] = {
            "tasks_per_s": round(figures["tasks_per_s"] / reference["tasks_per_s"], 3),
            "cpu_ms_per_task": round(
                figures["cpu_ms_per_task"]["total"] / reference["cpu_ms_per_task"]["total"], 3
            ),
            "idle_result_p50_ms": round(
                figures["idle_result_p50_ms"] / reference["idle_result_p50_ms"], 3
            ),
        }


# ---------------------------------------------------------------- broker, Redis, packages


def start_node() -> tuple[Any, str, str]:
    """A private RabbitMQ node with the management plugin: (node, amqp URL, management URL)."""
    from tests.brokers import LocalNode, NodeConfig, free_port

    port = free_port()
    node = LocalNode(
        NodeConfig(
            conf={
                "management.tcp.port": port,
                "management.tcp.ip": "127.0.0.1",
                "collect_statistics_interval": 500,
            },
            plugins=("rabbitmq_management",),
        ),
        label="bench",
    )
    node.start()
    return node, node.url, f"http://guest:guest@127.0.0.1:{port}/"


def redis_pid(url: str) -> int | None:
    """The redis-server serving ``url`` on this machine (its CPU is counted), if found."""
    port = str(urlsplit(url).port or 6379)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(("redis-server", "/usr/bin/redis-server")) and f":{port}" in cmdline:
            return int(entry.name)
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def missing_packages(names: list[str]) -> list[str]:
    # uvloop for every run: the project's processes and the raw loop run on it
    # where it is installed (broker/event_loop.py), as a deployment would.
    needs = {"uvloop"} | {module for name in names for module in SYSTEMS[name].get("needs", ())}
    return sorted(m for m in needs if importlib.util.find_spec(m) is None)


def install_peers() -> None:
    print(f"installing the peers from {REQUIREMENTS.relative_to(ROOT)}", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True
    )
    importlib.invalidate_caches()


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--idle", type=int, default=50, help="one-at-a-time tasks (default 50)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="unmeasured tasks first (default 20)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes where configurable"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="tasks per agent at once")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, of: {', '.join(SYSTEMS)} (default all)",
    )
    parser.add_argument("--broker", help="amqp:// URL of a broker to use instead of a private node")
    parser.add_argument("--management", help="http:// URL of that broker's management API")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="Redis for results")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per phase")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of tasks/s and latency here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here too")
    parser.add_argument("--no-install", action="store_true", help="skip peers not installed")
    parser.add_argument(
        "--in-process",
        choices=("yes", "no", "only"),
        default="yes",
        help="also measure the in-process figures (tests/bench/inprocess.py)",
    )
    parser.add_argument(
        "--in-process-tasks", type=int, default=20000, help="tasks for in-process tasks/s"
    )
    parser.add_argument(
        "--pending",
        default="1000,100000,1000000",
        help="pending-task counts for the submit-cost figure (default 1000,100000,1000000)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-options", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.system_names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.system_names if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    for name in ("tasks", "rounds", "idle", "workers", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child_system(args.child, Options(**json.loads(args.child_options)), args.child_out)
        return 0
    report: dict[str, Any] = {
        "benchmark": "no-op tasks, submitter waits for every result",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, {cpu_model()}",
        "tasks": args.tasks,
        "rounds": args.rounds,
        "workers": args.workers,
    }
    status = 0
    if args.in_process != "only":
        status = run_peers(args, report)
    if args.in_process != "no":
        from tests.bench.inprocess import run_in_child

        pending = [int(p) for p in args.pending.split(",") if p.strip()]
        report["in_process"] = run_in_child(args.in_process_tasks, pending)
    text = markdown_table(report)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot and report.get("systems"):
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
    return status


def run_peers(args: argparse.Namespace, report: dict[str, Any]) -> int:
    names = list(args.system_names)
    missing = missing_packages(names)
    if missing and not args.no_install:
        install_peers()
        missing = missing_packages(names)
    if missing:
        skipped = [n for n in names if set(SYSTEMS[n].get("needs", ())) & set(missing)]
        if skipped:
            print(
                f"skipping {', '.join(skipped)}: {', '.join(missing)} not installed",
                file=sys.stderr,
            )
        names = [n for n in names if n not in skipped]
    node = None
    try:
        if args.broker:
            broker_url, management_url, broker_pid = args.broker, args.management, None
        else:
            node, broker_url, management_url = start_node()
            broker_pid = node.beam_pid()
        options = Options(
            tasks=args.tasks,
            idle=args.idle,
            warmup=args.warmup,
            workers=args.workers,
            concurrency=args.concurrency,
            broker_url=broker_url,
            management_url=management_url,
            redis_url=args.redis,
            prefix=f"peerbench-{uuid.uuid4().hex[:6]}",
            broker_pid=broker_pid,
            redis_pid=redis_pid(args.redis),
            timeout=args.timeout,
        )
        report["broker"] = "private node (management plugin)" if node else "given by --broker"
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names:
                print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr)
                figures = run_system(name, options)
                if figures is not None:
                    runs[name].append(figures)
    finally:
        if node is not None:
            node.stop()
    results = {name: median_of(r) for name, r in runs.items() if r}
    for name, figures in results.items():
        figures["label"] = SYSTEMS[name]["label"]
        figures["durable"] = SYSTEMS[name]["durable"]
        figures["rounds"] = len(runs[name])
    add_ratios(results)
    report["systems"] = results
    failed = [name for name, r in runs.items() if len(r) < args.rounds]
    if failed:
        print(f"error: some rounds failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
