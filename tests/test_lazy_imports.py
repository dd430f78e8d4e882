"""The packages' public names import on first use, and the command line starts
without the modules only some commands need (issue 9: start-up CPU).

``orchestrator/__init__`` imports its names lazily (PEP 562), and the command
line imports the orchestrator, its stores, its metrics and rich where a command
uses them; each public name must still import, and a command that needs none
of them must not pay for them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import agents
import broker
import orchestrator
from tests.deployment import ROOT

HEAVY = ("asyncpg", "prometheus_client", "rich")
"""What the command line imports only where a command needs it: the PostgreSQL
store, the metrics endpoint, tables and progress bars."""


@pytest.mark.parametrize("package", [orchestrator, broker, agents], ids=lambda p: p.__name__)
def test_every_public_name_imports_from_its_package(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    namespace: dict[str, object] = {}
    exec(f"from {package.__name__} import {', '.join(names)}", namespace)
    assert all(namespace[name] is getattr(package, name) for name in names)
    assert set(names) <= set(dir(package))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        orchestrator.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        exec("from orchestrator import NoSuchThing", {})


def imported_by(code: str) -> list[str]:
    """The heavy top-level modules in ``sys.modules`` after ``code``, in a fresh process."""
    script = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_command_line_starts_without_the_stores_metrics_or_rich() -> None:
    assert imported_by("import orchestrator.cli") == []
    assert imported_by("import orchestrator") == []


def test_help_topology_and_a_failing_command_run_without_them() -> None:
    run = "import contextlib, io, orchestrator.cli as cli\n"
    run += "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main({args!r})"
    assert imported_by(run.format(args=["--help"])) == []
    assert imported_by(run.format(args=["topology", "--prefix", "p"])) == []
    # nor a command that fails (here: no broker there)
    unreachable = ["stats", "--broker", "amqp://guest:guest@127.0.0.1:1/", "--prefix", "lazy"]
    assert imported_by(run.format(args=unreachable)) == []


def test_the_names_that_need_them_still_have_them() -> None:
    assert imported_by("from orchestrator import PostgresStore") == ["asyncpg"]
    assert imported_by("from orchestrator import OrchestratorMetrics") == ["prometheus_client"]


@pytest.mark.parametrize(
    "given", ["x:smile: [bold]y[/bold] \x1b[2J\t表 " + "w" * 120, "a  b\u2028"]
)
def test_an_error_line_is_what_rich_printed(given: str) -> None:
    """The error line, written without rich, is the line rich's ``err.print`` wrote
    (no markup, no emoji codes, no wrapping at 80 columns), controls escaped."""
    from io import StringIO

    from rich.console import Console

    # When a command fails on a value holding markup, emoji codes, controls, wide characters
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "serve", "--store", given],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},
        timeout=60,
    )
    assert done.returncode == 1, done.stderr

    # Then it is one line, as rich would have printed it
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: --store: expected") and "\x1b" not in line
    console = Console(file=StringIO(), emoji=False, markup=False, width=80)
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    assert done.stderr == console.file.getvalue()  # type: ignore[attr-defined]
