"""The DAG benchmark (tests/bench/dag.py) at a tiny size, so it cannot rot unnoticed.

Its figures are printed, not asserted; what is asserted is that it runs to
the end on each bus and that its exit status says whether every task completed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import BROKER_URL
from tests.harness import ROOT

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s", re.MULTILINE)


def run_dag(bus_kind: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if bus_kind == "rabbitmq":
        env["ORCHESTRATOR_BROKER_URL"] = BROKER_URL
    else:
        env.pop("ORCHESTRATOR_BROKER_URL", None)
    return subprocess.run(
        [sys.executable, "tests/bench/dag.py", "--bus", bus_kind, "--prefix", prefix, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_dag_bench_runs_to_completion(bus_kind: str, prefix: str) -> None:
    done = run_dag(bus_kind, prefix, "--tasks", "60", "--agents", "2")
    assert done.returncode == 0, done.stderr
    rows = [tuple(map(int, m)) for m in ROW.findall(done.stdout)]
    # (tasks, edges, completed) for the tenth-size graph and the full one
    assert [(t, c) for t, _, c in rows] == [(6, 6), (60, 60)], done.stdout
    assert "release time per task, 60 vs 6 tasks: x" in done.stdout


def test_dag_bench_exits_non_zero_when_tasks_do_not_complete(bus_kind: str, prefix: str) -> None:
    done = run_dag(bus_kind, prefix, "--tasks", "40", "--agents", "2", "--fail-rate", "0.5")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"error: only \d+ of 40 tasks completed", done.stderr), done.stderr
