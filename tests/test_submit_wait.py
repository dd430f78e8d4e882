"""``submit --wait`` on a task no registered agent can run (issue 10, item 5).

It says, on stderr, that it waits for a capable agent and why none is one;
``--wait-timeout`` bounds the wait with an exit code of its own, leaving the
task as it was; an agent that arrives meanwhile runs it and the wait ends
as any other. Real ``serve`` and ``agent run`` processes, as a user has them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from broker import TaskStatusRequest
from tests.deployment import CLI, ROOT, Deployment, run

pytestmark = pytest.mark.rabbitmq

EXIT_WAIT_TIMED_OUT = 5


async def test_with_no_agent_it_says_so_and_gives_up_at_its_wait_timeout(
    deployment: Deployment,
) -> None:
    # Given an orchestrator and no agent at all
    await deployment.serve()
    deployment.queue_keys.add("gpu")

    # When a user submits a task and waits at most 1.5 s
    began = time.monotonic()
    result = await deployment.run(
        "submit", "render", "-r", "gpu", "--wait", "--wait-timeout", "1.5"
    )
    took = time.monotonic() - began

    # Then it says it waits for a capable agent, and why, once
    assert result.err.count("waiting for a capable agent: no agent is registered") == 1, result
    # And it gives up at the timeout with exit 5, saying the task goes on
    assert result.code == EXIT_WAIT_TIMED_OUT, result
    task_id = result.out.splitlines()[0]
    assert result.err.strip().splitlines()[-1] == (
        f"error: task {task_id} had not ended within --wait-timeout 1.5s: it is pending,"
        " waiting for a capable agent (no agent is registered); it was not cancelled"
    )
    assert 1.5 <= took < 1.5 + 5, took
    status = await deployment.rpc(TaskStatusRequest(task_id=task_id))
    assert status["status"] == "pending"


async def test_it_names_the_capability_no_registered_agent_has(deployment: Deployment) -> None:
    # Given an orchestrator and an agent that can analyse but not render
    await deployment.serve()
    await deployment.agent("analyst", "analysis")
    deployment.queue_keys.update({"gpu", "analysis+gpu"})

    # When a task needs what no agent has, then that capability is named;
    # --wait-timeout alone waits too, and --json prints the status it last saw
    gpu = await deployment.run("submit", "render", "-r", "gpu", "--wait-timeout", "1", "--json")
    assert gpu.code == EXIT_WAIT_TIMED_OUT, gpu
    assert "waiting for a capable agent: no registered agent has capability 'gpu'" in gpu.err
    assert json.loads(gpu.out)["status"] == "pending"

    # And a task needing two that the agent has only one of says so too
    both = await deployment.run(
        "submit", "render", "-r", "analysis,gpu", "-w", "--wait-timeout", "1"
    )
    assert both.code == EXIT_WAIT_TIMED_OUT, both
    assert "no registered agent has capability 'gpu'" in both.err

    # And a task it can run says nothing of the kind
    done = await deployment.run("submit", "t", "-r", "analysis", "--wait", "--wait-timeout", "30")
    assert done.code == 0, done
    assert "waiting for a capable agent" not in done.err


async def test_an_agent_that_arrives_meanwhile_runs_it_and_the_wait_ends(
    deployment: Deployment,
) -> None:
    # Given an orchestrator, and a user waiting on a task nobody can run yet
    await deployment.serve()
    process = await asyncio.create_subprocess_exec(
        *CLI, "submit", "late", "-r", "latecomer", "--wait", "--wait-timeout", "60",
        cwd=ROOT, env=deployment.env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None and process.stdout is not None
    try:
        seen = b""
        while b"waiting for a capable agent" not in seen:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"stderr ended without the note: {seen.decode()}"
            seen += line

        # When an agent that can run it registers
        await deployment.agent("latecomer_agent", "latecomer")

        # Then the task runs on it and the wait ends as usual
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, (seen + err).decode()
    assert "completed after " in out.decode()
    assert "on latecomer_agent" in out.decode()
    assert "latecomer_agent can run it" in err.decode()


async def test_a_wait_timeout_that_is_not_positive_is_refused_before_connecting() -> None:
    result = await run("submit", "t", "--wait", "--wait-timeout", "0")
    assert result.code == 1, result
    assert result.error == "error: --wait-timeout: must be greater than 0, got 0"
