"""The README's commands, run as written.

The code blocks are read from README.md, not copied here, so a change to the
README that breaks them fails this test. Commands that end with ``&`` are
long-running: they start in the background and the test waits until they are
ready (the orchestrator answers, the agent is registered) before the next line.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from broker import AgentsRequest
from tests.conftest import require_broker
from tests.deployment import ROOT, Deployment, Result, base_env, management_api, require_tools
from tests.harness import wait_until

README = ROOT / "README.md"
BIN = str(Path(sys.executable).parent)
"""Where the ``orchestrator`` console script is installed: on PATH, as for a user."""


def code_block(section: str, language: str) -> str:
    """The first ``language`` block under the README heading ``section``."""
    text = README.read_text()
    heading = re.search(rf"^#+ {re.escape(section)}\s*$", text, re.MULTILINE)
    assert heading, f"README has no section {section!r}"
    block = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    match = block.search(text, heading.end())
    assert match, f"no {language} block under {section!r}"
    return match.group(1)


def code_blocks(section: str, language: str) -> list[str]:
    """Every ``language`` block under the README heading ``section``, up to the next heading."""
    text = README.read_text()
    heading = re.search(rf"^#+ {re.escape(section)}\s*$", text, re.MULTILINE)
    assert heading, f"README has no section {section!r}"
    following = re.compile(r"^#+ ", re.MULTILINE).search(text, heading.end())
    body = text[heading.end() : following.start() if following else len(text)]
    return re.findall(rf"^```{language}\n(.*?)^```", body, re.MULTILINE | re.DOTALL)


def commands(block: str) -> list[str]:
    """The block's command lines, without their trailing comments."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line]


async def shell(command: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> Result:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def with_path(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


@pytest.fixture
async def session(prefix: str):
    """A broker prefix of its own, and the processes the README's lines start on it."""
    deployment = Deployment(prefix, require_broker())
    try:
        yield deployment
    finally:
        await deployment.close()


async def test_quick_start_demo_runs_as_written() -> None:
    [demo] = [c for c in commands(code_block("Quick start", "bash")) if " demo" in c]
    result = await shell(demo, ROOT, with_path(base_env()), timeout=300)
    assert result.code == 0, result
    assert "tasks completed, 0 failed" in result.out


def without_venv_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with a new user's PATH: without the virtual environment's bin folder."""
    venv_bin = Path(BIN).resolve()
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    return {**env, "PATH": os.pathsep.join(path)}


async def test_quick_start_says_how_to_run_the_command_line() -> None:
    # Given a new user's shell, where `orchestrator` is not a command (yet)
    env = without_venv_on_path(base_env())
    assert shutil.which("orchestrator", path=env["PATH"]) is None, env["PATH"]

    # When they run the quick start's `./run.sh orchestrator` line, then it is the command line
    [through_run_sh] = [
        c for c in commands(code_block("Quick start", "bash")) if "./run.sh orchestrator" in c
    ]
    result = await shell(through_run_sh, ROOT, env)
    assert result.code == 0, result
    assert "Usage: orchestrator" in result.out

    # When they put it on their PATH as the quick start says, then `orchestrator` runs
    [on_path] = [b for b in code_blocks("Quick start", "bash") if "PATH=" in b]
    result = await shell("\n".join(commands(on_path)), ROOT, env)
    assert result.code == 0, result
    assert "Usage: orchestrator" in result.out


def test_quick_start_test_command_is_the_one_ci_runs() -> None:
    """The quick start's test line is not run from inside the suite it starts:
    CI runs it, exactly as written, from a clean clone."""
    [test] = [c for c in commands(code_block("Quick start", "bash")) if " test" in c]
    ci_lines = commands((ROOT / ".ci" / "run").read_text())
    assert test in ci_lines, (test, ci_lines)


@pytest.mark.rabbitmq
async def test_command_line_session_and_curl_client_run_as_written(
    session: Deployment, tmp_path: Path
) -> None:
    deployment = session
    # Given the README's agent in my_agents.py, in the folder the session runs in
    (tmp_path / "my_agents.py").write_text(code_block("An agent", "python"))
    env = with_path({**deployment.env, "PYTHONPATH": str(tmp_path)})
    deployment.queue_keys.add("technical_analysis")

    # When every line of the command-line session runs as written
    outputs: list[Result] = []
    for number, command in enumerate(commands(code_block("Command line", "bash"))):
        if command.endswith("&"):
            name = "serve" if " serve" in command else f"background-{number}"
            await start(deployment, name, command.removesuffix("&").strip(), tmp_path, env)
            await ready(deployment, name)
        else:
            result = await shell(command, tmp_path, env)
            assert result.code == 0, (command, result)
            outputs.append(result)

    # Then the task ran on the README's agent, and the orchestrator kept its records
    assert any('"rsi": 42.0' in r.out for r in outputs), outputs
    assert (tmp_path / "state.db").exists()

    # And the curl client of the protocol section submits a task that completes
    require_tools("curl", "jq")
    api = management_api(deployment.broker_url)
    [curl] = commands(code_block("A protocol for other services", "bash"))
    result = await shell(
        curl,
        ROOT,
        {
            **env,
            "RABBITMQ_API": api.api,
            "RABBITMQ_USER": api.user,
            "RABBITMQ_PASSWORD": api.password,
            "WAIT_SECONDS": "30",
        },
    )
    assert result.code == 0, result
    assert '"status": "completed"' in result.out


async def start(deployment: Deployment, name: str, command: str, cwd: Path, env) -> None:
    """A background line of the README, stopped (SIGTERM) by the deployment's close."""
    log = tempfile.NamedTemporaryFile("w+b", prefix=f"{name}-", suffix=".log")
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {command}", cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deployment.processes[name] = (process, log)


async def ready(deployment: Deployment, name: str) -> None:
    if name == "serve":
        await wait_until(deployment.answers, timeout=30, interval=0.1)
        return

    async def registered() -> bool:
        process = deployment.processes[name][0]
        assert process.returncode is None, deployment.log(name)
        return bool(await deployment.rpc(AgentsRequest()))

    await wait_until(registered, timeout=30, interval=0.1)
