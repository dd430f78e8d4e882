"""The operator's commands as subprocesses: ``tasks``, the agent flags
(``agent run`` and ``python -m agents``: ``--id``, ``--concurrency``,
``--reload``), ``purge``, ``--version`` and ``schemas``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import AgentsRequest, BusSettings, RabbitMQBus, TaskStatusRequest, Topology
from broker.rabbitmq_purge import find
from tests.deployment import ROOT, Deployment, base_env, run
from tests.harness import wait_until


async def agents_of(deployment: Deployment) -> dict[str, dict]:
    return {a["agent_id"]: a for a in await deployment.rpc(AgentsRequest())}


async def ended(deployment: Deployment, task_id: str) -> bool:
    status = await deployment.rpc(TaskStatusRequest(task_id=task_id))
    return status["status"] in ("completed", "failed", "cancelled", "timeout")


# --- tasks ------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_tasks_lists_newest_first_with_filters(deployment: Deployment) -> None:
    # Given serve, an agent, and four tasks: two completed, one failed, one waiting
    await deployment.serve()
    await deployment.agent("list_agent", "analysis")
    ids = []
    for task_type, payload in (("report", "{}"), ("analysis", "{}"), ("analysis", '{"fail": "x"}')):
        submitted = await deployment.run(
            "submit", task_type, "-p", payload, "--max-retries", "0", "--name", f"{task_type} job"
        )
        assert submitted.code == 0, submitted
        ids.append(submitted.out.strip())
        await wait_until(lambda: ended(deployment, ids[-1]), timeout=20, interval=0.05)
    deployment.queue_keys.add("idle.nobody")
    waiting = await deployment.run("submit", "idle", "-r", "nobody")
    ids.append(waiting.out.strip())
    report, analysis, failed, idle = ids

    # When the operator lists them, then newest first, filtered as asked
    async def listed(*args: str) -> list[str]:
        result = await deployment.run("tasks", "--json", *args)
        assert result.code == 0, result
        return [t["task_id"] for t in json.loads(result.out)]

    assert await listed() == [idle, failed, analysis, report]
    assert await listed("--status", "completed") == [analysis, report]
    assert await listed("--status", "failed,pending") == [idle, failed]
    assert await listed("--type", "analysis") == [failed, analysis]
    assert await listed("--agent", "list_agent", "--limit", "2") == [failed, analysis]
    assert await listed("--type", "nothing") == []

    # And the table, piped, shows every id whole on one line with its status
    table = await deployment.run("tasks", COLUMNS="80")
    assert table.code == 0, table
    rows = {line.split()[1]: line for line in table.out.splitlines() if "task_" in line}
    assert set(rows) == set(ids)
    assert "failed" in rows[failed] and "list_agent" in rows[failed]
    assert "pending" in rows[idle]

    # And bad filters are one line, naming the option, exit 1
    bad = await deployment.run("tasks", "--status", "sleeping")
    assert bad.code == 1
    assert bad.error.startswith("error: --status: Input should be 'pending'")
    bad = await deployment.run("tasks", "--limit", "0")
    assert (bad.code, bad.error.startswith("error: --limit:")) == (1, True)


# --- agent flags ------------------------------------------------------------------------------

ENTRY_POINTS = {
    "orchestrator agent run": None,  # the console script
    "python -m agents": [sys.executable, "-m", "agents"],
}


async def start_agent(
    deployment: Deployment, how: str, name: str, *args: str, **env: str
) -> asyncio.subprocess.Process:
    command = ENTRY_POINTS[how]
    if command is None:
        return await deployment.start(name, "agent", "run", *args, **env)
    log = io.BytesIO()  # what the deployment closes; the output goes nowhere
    process = await asyncio.create_subprocess_exec(
        *command, *args, cwd=ROOT, env={**deployment.env, **env},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deployment.processes[name] = (process, log)
    return process


@pytest.mark.rabbitmq
@pytest.mark.parametrize("how", list(ENTRY_POINTS))
async def test_agent_run_takes_its_id_and_concurrency_from_flags(
    deployment: Deployment, how: str
) -> None:
    # Given serve, and one agent module started twice with ids and limits of its own
    await deployment.serve()
    deployment.queue_keys.add("analysis")
    for agent_id, concurrency in (("flag_agent_1", "2"), ("flag_agent_2", "7")):
        await start_agent(
            deployment, how, agent_id,
            "tests.agent_app:make_agent", "--id", agent_id, "--concurrency", concurrency,
            "--prefix", deployment.prefix,
            AGENT_ID="the_codes_id", AGENT_CAPABILITIES="analysis", ORCHESTRATOR_PREFIX="other",
        )  # fmt: skip

    # Then both register with the flags' ids and limits, on the flag's prefix
    async def both() -> bool:
        return {"flag_agent_1", "flag_agent_2"} <= set(await agents_of(deployment))

    await wait_until(both, timeout=20, interval=0.1)
    agents = await agents_of(deployment)
    assert "the_codes_id" not in agents
    assert agents["flag_agent_1"]["max_concurrent_tasks"] == 2
    assert agents["flag_agent_2"]["max_concurrent_tasks"] == 7

    # And a task runs on them; and SIGTERM stops each with exit 0
    submitted = await deployment.run("submit", "analysis", "-r", "analysis", "--wait", "--json")
    assert submitted.code == 0, submitted
    assert json.loads(submitted.out)["assigned_agent"] in ("flag_agent_1", "flag_agent_2")
    for name in ("flag_agent_1", "flag_agent_2"):
        assert await deployment.stop(name) == 0


def test_both_agent_entry_points_declare_the_same_flags() -> None:
    """``orchestrator agent run`` and ``python -m agents`` parse the flags each its own way."""
    import typer.main

    from agents.runner import parser
    from orchestrator.cli import app

    # Given the flags each declares
    command = typer.main.get_command(app).commands["agent"].commands["run"]  # type: ignore[attr-defined]
    cli = {opt for param in command.params for opt in param.opts if opt.startswith("-")}
    module = {opt for action in parser()._actions for opt in action.option_strings}

    # Then python -m agents has each of the command's but the broker's files (it reads
    # those from ORCHESTRATOR_* only), and nothing else but its -h
    assert module - {"-h", "--help"} <= cli
    assert cli - module == {
        "--broker-ca-file", "--broker-cert-file", "--broker-key-file",
        "--broker-password-file", "--tls-no-verify",
    }  # fmt: skip


@pytest.mark.parametrize("how", list(ENTRY_POINTS))
def test_agent_flags_refuse_bad_values_alike(how: str) -> None:
    command = ENTRY_POINTS[how] or [
        str(Path(sys.executable).with_name("orchestrator")),
        "agent",
        "run",
    ]
    env = base_env(AGENT_ID="a", ORCHESTRATOR_BROKER_URL="amqp://guest:guest@127.0.0.1:1/")
    cases = [
        (["tests.agent_app:make_agent", "--concurrency", "0"], 1, "--concurrency: must be at least 1"),
        (["tests.agent_app:make_agent", "--id", "a b"], 1, "--id: 'a b' must be 1-128"),
        (["no_such_module:agent"], 1, "agent: cannot import 'no_such_module'"),
        (["tests.agent_app:make_agent"], 3, "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/"),
    ]  # fmt: skip
    for args, code, message in cases:
        done = subprocess.run(
            [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
        assert message in done.stderr, done.stderr


AGENT_MODULE = """
from agents import Agent

def make():
    agent = Agent({agent_id!r}, ["reloading"], 1, heartbeat_interval=0.3, drain_timeout=1)

    @agent.handler()
    async def work(ctx):
        return {{"version": {agent_id!r}}}

    return agent
"""


@pytest.mark.rabbitmq
@pytest.mark.parametrize("how", list(ENTRY_POINTS))
async def test_agent_run_reload_restarts_the_agent_when_its_code_changes(
    deployment: Deployment, tmp_path: Path, how: str
) -> None:
    # Given serve, and an agent from a module in a folder of its own, run with --reload
    await deployment.serve()
    module = tmp_path / "reloading_agent.py"
    module.write_text(AGENT_MODULE.format(agent_id="before_edit"))
    deployment.queue_keys.add("reloading")
    process = await start_agent(
        deployment, how, "reloading", "reloading_agent:make", "--reload",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
    )  # fmt: skip

    async def registered(agent_id: str) -> bool:
        assert process.returncode is None, deployment.log("reloading")
        return agent_id in await agents_of(deployment)

    await wait_until(lambda: registered("before_edit"), timeout=20, interval=0.1)

    # When its code changes, then the agent is started again from the new code
    module.write_text(AGENT_MODULE.format(agent_id="after_edit"))
    await wait_until(lambda: registered("after_edit"), timeout=30, interval=0.1)
    submitted = await deployment.run("submit", "t", "-r", "reloading", "--wait", "--json")
    assert json.loads(submitted.out)["result"] == {"version": "after_edit"}

    # And SIGTERM stops it all with exit 0
    assert await deployment.stop("reloading") == 0, deployment.log("reloading")


# --- purge --------------------------------------------------------------------------------------


async def existing(broker_url: str, prefix: str, keys: set[str]) -> set[str]:
    """The names of the prefix's queues and exchanges that exist on the broker."""
    bus = RabbitMQBus(
        settings=BusSettings(broker_url=broker_url, prefix=prefix), declare_topology=False
    )
    await bus.connect()
    try:
        everything = Topology(prefix).everything(keys)
        found = await find(
            bus, [q.name for q in everything.queues], [e.name for e in everything.exchanges]
        )
    finally:
        await bus.close()
    return {q.name for q in found.queues} | set(found.exchanges)


@pytest.mark.rabbitmq
async def test_purge_lists_asks_and_deletes_a_prefixs_queues(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Given serve on a SQLite store, an agent, and tasks on two capability queues
    store = f"sqlite:{tmp_path / 'state.db'}"
    await deployment.start("serve", "serve", "--store", store)
    await wait_until(deployment.answers, timeout=20, interval=0.1)
    await deployment.agent("purge_agent", "analysis")
    for args in (["-r", "analysis", "--wait"], ["-r", "pdf"]):
        assert (await deployment.run("submit", "report", *args)).code == 0
    keys = {"report.analysis", "report.pdf"}
    task_queues = {Topology(deployment.prefix).task_queue(k) for k in keys}
    assert task_queues <= await existing(deployment.broker_url, deployment.prefix, keys)

    # When purge runs while serve does, then it refuses and deletes nothing
    refused = await deployment.run("purge", "--yes", "--store", store)
    assert refused.code == 1, refused
    assert "an orchestrator serves prefix" in refused.error
    for name in ("purge_agent", "serve"):
        assert await deployment.stop(name) == 0

    # When the operator answers no, then nothing is deleted
    asked = await deployment.run("purge", "--store", store, stdin=b"n\n")
    assert asked.code == 1, asked
    assert "delete " in asked.err and "nothing deleted" in asked.err
    assert task_queues <= await existing(deployment.broker_url, deployment.prefix, keys)

    # When they purge with --yes, then it lists what it deletes, and all of it is gone
    purged = await deployment.run("purge", "--yes", "--store", store)
    assert purged.code == 0, purged
    for name in (*task_queues, f"{deployment.prefix}.rpc", f"{deployment.prefix}.events"):
        assert name in purged.out
    assert purged.out.strip().splitlines()[-1].startswith("deleted ")
    assert await existing(deployment.broker_url, deployment.prefix, keys) == set()

    # And purging again finds nothing
    again = await deployment.run("purge", "--yes")
    assert again.code == 0, again
    assert "nothing of prefix" in again.err


# --- version and schemas -----------------------------------------------------------------------


async def test_version_and_schemas_without_out_write_nothing_here(tmp_path: Path) -> None:
    version = await run("--version")
    assert version.code == 0, version
    assert version.out.startswith("orchestrator ")
    assert version.out.split()[1][0].isdigit()

    # When schemas runs in a folder with no --out, then it prints the AsyncAPI
    # document and writes nothing there
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "schemas",
        cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    assert json.loads(out)["asyncapi"] == "2.6.0"
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []
