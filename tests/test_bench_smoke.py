"""The peer benchmark (tests/bench/peers.py), run tiny so that it cannot rot.

No figure is asserted beyond being there: timings on a shared machine say
nothing. This project and the raw aio-pika loop always run (on the tests'
broker, with no management API: no AMQP counters then); the peers run when
their packages (tests/bench/requirements-peers.txt) and Redis are here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import reachable

ROOT = Path(__file__).resolve().parents[1]
REDIS = "redis://127.0.0.1:6379/13"


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.peers", "--no-install", f"--out={out}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def check_system(figures: dict, tasks: int) -> None:
    assert figures["completed"] == tasks
    assert figures["rounds"] == 1
    for key in ("tasks_per_s", "load_p50_ms", "load_p99_ms", "idle_result_p50_ms"):
        assert figures[key] > 0, key
    assert figures["idle_start_p50_ms"] <= figures["idle_result_p50_ms"]
    assert {"client", "workers", "total"} <= set(figures["cpu_ms_per_task"])
    assert figures["ratio"] is not None


@pytest.mark.rabbitmq
def test_project_and_raw_loop_and_in_process_figures(broker_url: str, tmp_path: Path) -> None:
    plot = tmp_path / "peers.png"
    systems = "project-memory,project-one-agent,raw"
    args = [f"--systems={systems}", "--tasks=30", "--rounds=1", "--idle=3", "--warmup=2"]
    args += [f"--broker={broker_url}", "--in-process-tasks=200", "--pending=100,1000"]
    if importlib.util.find_spec("matplotlib") is not None:
        args.append(f"--plot={plot}")
    report, printed = run_bench(tmp_path, *args)

    assert set(report["systems"]) == set(systems.split(","))
    for figures in report["systems"].values():
        check_system(figures, 30)
        assert figures["amqp_per_task"] is None  # no management API on the tests' broker
    assert report["systems"]["project-memory"]["ratio"]["tasks_per_s"] == 1.0
    assert "| this project, memory store | yes |" in printed
    assert "| raw aio-pika, two processes, persistent + confirms | yes |" in printed

    in_process = report["in_process"]
    assert in_process["completed"] == 200
    assert in_process["tasks_per_s"] > 0
    assert set(in_process["submit_us_by_pending"]) == {"100", "1000"}
    assert in_process["bytes_per_finished_task"] > 0
    assert "one submit with 1,000 tasks pending" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes().startswith(b"\x89PNG")


PEERS = {
    "celery-solo": ("celery",),
    "dramatiq-confirms": ("dramatiq", "pika", "redis"),
    "taskiq": ("taskiq", "taskiq_aio_pika", "taskiq_redis"),
}


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_peers_when_installed(broker_url: str, tmp_path: Path) -> None:
    here = [
        name
        for name, modules in PEERS.items()
        if all(importlib.util.find_spec(m) is not None for m in modules)
    ]
    if not here:
        pytest.skip("no peer installed (pip install -r tests/bench/requirements-peers.txt)")
    if not reachable(REDIS, 6379):
        pytest.skip(f"no Redis at {REDIS}")
    args = [f"--systems={','.join(here)}", "--tasks=10", "--rounds=1", "--idle=2", "--warmup=2"]
    args += [f"--broker={broker_url}", f"--redis={REDIS}", "--in-process=no"]
    report, _ = run_bench(tmp_path, *args)
    assert set(report["systems"]) == set(here)
    for figures in report["systems"].values():
        assert figures["completed"] == 10
        assert figures["tasks_per_s"] > 0
