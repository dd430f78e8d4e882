"""``orchestrator agent run`` and ``python -m agents`` given a bad invocation: the
same exit code from both, and one line on stderr saying what is wrong.

Each parses its flags its own way (click, argparse), so a usage error is
where they could drift apart: the exit codes are the ones the agent's module
documents (2 usage, 1 bad input), and every error is one ``error:`` line,
a usage error's saying where the help is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployment import ROOT, base_env

ENTRY_POINTS = {
    "orchestrator agent run": [str(Path(sys.executable).with_name("orchestrator")), "agent", "run"],
    "python -m agents": [sys.executable, "-m", "agents"],
}
if not Path(ENTRY_POINTS["orchestrator agent run"][0]).exists():  # not installed: the module
    ENTRY_POINTS["orchestrator agent run"] = [sys.executable, "-m", "orchestrator", "agent", "run"]

CASES = {
    "no MODULE:OBJECT": ([], 2, ["MODULE:OBJECT", "--help"]),
    "an unknown flag": (["tests.agent_app:make_agent", "--bogus"], 2, ["--bogus", "--help"]),
    "a flag's value of the wrong type": (
        ["tests.agent_app:make_agent", "--concurrency", "many"], 2, ["--concurrency", "--help"],
    ),
    "a log format it has not": (
        ["tests.agent_app:make_agent", "--log-format", "xml"], 2, ["--log-format", "xml", "--help"],
    ),
    "a spec without its object": (["tests.agent_app"], 1, ["expected 'module:object'"]),
    "an object that is not an agent": (
        ["tests.agent_app:FILE_POLL"], 1, ["'tests.agent_app:FILE_POLL' is not an Agent"],
    ),
    "a function returning no agent": (["os:getcwd"], 1, ["'os:getcwd' is not an Agent"]),
    "an object the module has not": (
        ["tests.agent_app:nothing"], 1, ["module 'tests.agent_app' has no 'nothing'"],
    ),
}  # fmt: skip


def invoke(how: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    # A broker nobody listens on: nothing here may get as far as connecting.
    env = base_env(AGENT_ID="usage", ORCHESTRATOR_BROKER_URL="amqp://guest:guest@127.0.0.1:1/")
    return subprocess.run(
        [*ENTRY_POINTS[how], *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("case", list(CASES))
def test_both_agent_entry_points_refuse_a_bad_invocation_alike(case: str) -> None:
    args, code, named = CASES[case]
    # When each entry point is run so
    done = {how: invoke(how, args) for how in ENTRY_POINTS}

    # Then both exit with the same code, the documented one, and say why in one line
    assert {how: d.returncode for how, d in done.items()} == dict.fromkeys(ENTRY_POINTS, code), {
        how: d.stderr for how, d in done.items()
    }
    for how, result in done.items():
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (how, result.stderr)
        for part in named:
            assert part in lines[0], (how, part, lines[0])
        assert result.stdout == "", (how, result.stdout)
