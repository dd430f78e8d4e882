"""The command line as a user drives it: ``orchestrator`` subprocesses on the real broker.

Each test gets its own prefix (ORCHESTRATOR_PREFIX) and stops its processes
(SIGTERM) and deletes its topology at the end. The test process talks to the
orchestrator only to wait for conditions (is it serving, are the agents
registered); every action under test is a command line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from broker import (
    AgentsRequest,
    BusSettings,
    StatsRequest,
    SubmitTaskRequest,
    TaskStatusRequest,
    redact_url,
)
from tests.conftest import require_broker
from tests.deployment import (
    ROOT,
    Deployment,
    base_env,
    broker_user,
    management_api,
    require_tools,
    run,
)
from tests.harness import wait_until

CURL_EXAMPLE = ROOT / "docs" / "examples" / "submit_with_curl.sh"
UNREACHABLE = "amqp://someone:pw-s3cret@127.0.0.1:1/"


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --- the whole story ------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_serve_two_agents_and_every_task_command(deployment: Deployment, tmp_path) -> None:
    # Given `orchestrator serve` and two `orchestrator agent run`
    await deployment.serve()
    await deployment.agent("cli_agent_1", "analysis")
    await deployment.agent("cli_agent_2", "analysis", "trading")

    # When a user submits a task with its payload in a file, and waits for it
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"symbol": "BTC", "sleep": 0.3}))
    submitted = await deployment.run(
        "submit", "analysis", "--payload", f"@{payload}", "--requires", "analysis",
        "--priority", "high", "--wait",
    )  # fmt: skip

    # Then it prints the task's id, draws its progress, and ends with the result
    assert submitted.code == 0, submitted
    task_id = submitted.out.splitlines()[0]
    assert task_id.startswith("task_")
    assert "analysis [completed]" in submitted.err
    assert "100%" in submitted.err
    assert last_line(submitted.out).startswith("completed after ")
    assert '"echo": {"symbol": "BTC", "sleep": 0.3}' in submitted.out

    # When a task depends on one still running, then it starts only after that one ends
    first = await deployment.run(  # the payload from stdin
        "submit", "analysis", "-r", "analysis", "-p", "@-", stdin=b'{"sleep": 0.5}'
    )
    then = await deployment.run(
        "submit", "trade", "-r", "trading", "--depends-on", first.out.strip(), "--wait", "--json"
    )
    assert then.code == 0, then
    dependent = json.loads(then.out)
    assert dependent["assigned_agent"] == "cli_agent_2"  # the one agent that can trade
    upstream = json.loads((await deployment.run("status", first.out.strip(), "--json")).out)
    assert dependent["started_at"] >= upstream["started_at"] + 0.5
    assert upstream["result"]["echo"] == {"sleep": 0.5}

    # When the user asks for the first task's status, then it says completed, with the result
    status = await deployment.run("status", task_id, "--json")
    assert status.code == 0, status
    assert json.loads(status.out)["status"] == "completed"
    assert json.loads(status.out)["result"]["echo"] == {"symbol": "BTC", "sleep": 0.3}
    table = await deployment.run("status", task_id)
    assert "completed" in table.out
    assert task_id in table.out

    # When a task no agent can run is cancelled, then it is, once
    deployment.queue_keys.add("nobody_can")
    waiting = await deployment.run("submit", "idle", "--requires", "nobody_can")
    waiting_id = waiting.out.strip()
    cancelled = await deployment.run("cancel", waiting_id)
    assert (cancelled.code, cancelled.out.strip()) == (0, f"cancelled {waiting_id}")
    again = await deployment.run("cancel", waiting_id)
    assert again.code == 1
    assert again.error == (
        f"error: task {waiting_id} has already ended (cancelled); nothing to cancel"
    )
    status = await deployment.run("status", waiting_id, "--json")
    assert json.loads(status.out)["status"] == "cancelled"

    # When the user asks for statistics, then they count the four tasks
    stats = await deployment.run("stats", "--json")
    assert stats.code == 0, stats
    numbers = json.loads(stats.out)
    assert (numbers["tasks_created"], numbers["tasks_completed"]) == (4, 3)
    assert numbers["registered_agents"] == 2
    table = await deployment.run("stats")
    assert "tasks_completed" in table.out
    assert "utilization of cli_agent_1" in table.out

    # When the user lists the agents, then both are there with their capabilities
    agents = await deployment.run("agents")
    assert agents.code == 0, agents
    assert "cli_agent_1" in agents.out
    assert "analysis, trading" in agents.out
    records = json.loads((await deployment.run("agents", "--json")).out)
    assert {a["agent_id"]: a["capabilities"] for a in records} == {
        "cli_agent_1": ["analysis"],
        "cli_agent_2": ["analysis", "trading"],
    }

    # When a task runs past its timeout, then submit --wait says so and exits 4
    late = await deployment.run(
        "submit", "slow", "-r", "analysis", "--payload", '{"sleep": 5}',
        "--timeout", "0.3", "--max-retries", "0", "--wait",
    )  # fmt: skip
    assert late.code == 4, late
    assert "slow [timeout]" in late.err  # the progress bar's last state
    assert last_line(late.err).startswith("error: task task_")
    assert " ended timeout: exceeded timeout of 0.3s" in last_line(late.err)

    # And SIGTERM stops agents and orchestrator cleanly
    for name in ("cli_agent_1", "cli_agent_2", "serve"):
        assert await deployment.stop(name) == 0, deployment.log(name)


# --- errors: one line, an exit code, never a traceback ----------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "t", "--payload", "{bad"], "error: --payload: not valid JSON: "),
        (["submit", "t", "--payload", "@no/such/file.json"], "error: --payload: cannot read "),
        (["submit", "t", "--payload", "[1, 2]"], "error: --payload: must be a JSON object, got list"),
        (["submit", "t", "--priority", "urgent"], "error: --priority: must be one of low, medium, high, critical, got 'urgent'"),
        (["serve", "--store", "postgres"], "error: --store: expected 'memory' or 'sqlite:PATH'"),
        (["agent", "run", "no_such_module:agent"], "error: agent: cannot import 'no_such_module'"),
        (["agent", "run", "tests.agent_app:nothing"], "error: agent: module 'tests.agent_app' has"),
        (["topology", "--prefix", "a.b"], "error: --prefix: String should match pattern"),
    ],
)  # fmt: skip
async def test_bad_input_is_one_line_and_exit_1(args: list[str], message: str) -> None:
    # When a command gets input it cannot use
    result = await run(*args)

    # Then it says why in one line and exits 1
    assert result.code == 1, result
    assert result.error.startswith(message), result.error
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("args", "variable", "value", "message"),
    [
        (["stats"], "REQUEST_TIMEOUT", "abc", "Input should be a valid number"),
        (["submit", "t"], "REQUEST_TIMEOUT", "0", "Input should be greater than 0"),
        (["status", "task_1"], "PREFIX", "a.b", "String should match pattern"),
        (["serve"], "HEARTBEAT_TIMEOUT", "soon", "Input should be a valid number"),
        (["agent", "run", "tests.agent_app:make_agent"], "AMQP_HEARTBEAT", "x", "Input should be a valid integer"),
    ],
)  # fmt: skip
async def test_a_bad_setting_in_the_environment_is_one_line_and_exit_1(
    args: list[str], variable: str, value: str, message: str
) -> None:
    # Given a bad ORCHESTRATOR_* value (and a broker nobody answers at)
    env = base_env(AGENT_ID="a", ORCHESTRATOR_BROKER_URL=UNREACHABLE)
    env[f"ORCHESTRATOR_{variable}"] = value

    # When a command runs, then it names the variable and its value in one line, exit 1,
    # before it tries the broker
    result = await run(*args, env=env)
    assert result.code == 1, result
    assert result.error.startswith(f"error: ORCHESTRATOR_{variable}={value!r}: {message}")
    assert "Traceback" not in result.err


@pytest.mark.rabbitmq
async def test_requests_the_orchestrator_refuses_are_one_line_and_exit_1(
    deployment: Deployment,
) -> None:
    # Given a running orchestrator
    await deployment.serve()
    cases = [
        (["submit", "t", "--depends-on", "task_x"], "error: dependencies: unknown task id"),
        (["submit", "t", "-r", "no spaces"], "error: required_capabilities: 'no spaces' is not"),
        (["status", "task_unknown"], "error: task_id: unknown task 'task_unknown'"),
        (["cancel", "task_unknown"], "error: task_id: unknown task 'task_unknown'"),
    ]
    for args, message in cases:
        # When a user sends it a request it refuses
        result = await deployment.run(*args)

        # Then the command says why in one line and exits 1
        assert result.code == 1, (args, result)
        assert result.error.startswith(message), (args, result.error)

    # And nothing was created
    assert (await deployment.rpc(StatsRequest()))["tasks_created"] == 0


@pytest.mark.parametrize(
    ("args", "given_by"),
    [
        (["serve"], "environment"),
        (["agent", "run", "tests.agent_app:make_agent"], "option"),
        (["submit", "analysis", "--wait"], "option"),
        (["status", "task_1"], "environment"),
        (["stats"], "option"),
        (["cancel", "task_1"], "environment"),
        (["agents"], "option"),
        (["watch", "--seconds", "1"], "environment"),
        (["demo", "--workflows", "1"], "option"),
    ],
)
async def test_unreachable_broker_is_one_line_exit_3_without_the_password(
    args: list[str], given_by: str
) -> None:
    # Given a broker URL nobody answers at, with a password in it
    env = base_env(AGENT_ID="a")
    if given_by == "option":
        args = [*args, "--broker", UNREACHABLE]
    else:
        env["ORCHESTRATOR_BROKER_URL"] = UNREACHABLE

    # When a command needs the broker
    result = await run(*args, env=env)

    # Then it names the address, not the password, in one line and exits 3 (a password
    # given in --broker is warned about first: tests/test_secrets.py)
    assert result.code == 3, result
    lines = result.err.strip().splitlines()
    if given_by == "option" and "WARNING" in lines[0]:
        assert "--broker: a password in the URL on a command line" in lines[0], result.err
        lines = lines[1:]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: cannot reach RabbitMQ at amqp://someone:***@127.0.0.1:1/")
    assert "s3cret" not in result.out + result.err


@pytest.mark.rabbitmq
async def test_no_orchestrator_answering_is_one_line_and_exit_3(deployment: Deployment) -> None:
    # When nobody ever served the prefix, then a request fails at once
    never = await deployment.run("stats")
    assert never.code == 3, never
    assert never.error == (
        f"error: no queue '{deployment.prefix}.rpc' on RabbitMQ at "
        f"{redact_url(deployment.broker_url)}: no orchestrator has served prefix "
        f"'{deployment.prefix}' there"
    )
    watch = await deployment.run("watch", "--seconds", "1")
    assert watch.code == 3, watch
    assert watch.error == (
        f"error: no exchange '{deployment.prefix}.events' on RabbitMQ at "
        f"{redact_url(deployment.broker_url)}: no orchestrator has served prefix "
        f"'{deployment.prefix}' there"
    )
    # And neither declared anything of the prefix
    assert not await exists(deployment, f"{deployment.prefix}.orchestrator.announcements")
    assert not await exists(deployment, f"{deployment.prefix}.tasks.@any")

    # When the orchestrator served and stopped, then a request waits its timeout, then fails
    await deployment.serve()
    assert await deployment.stop("serve") == 0
    gone = await deployment.run("status", "task_1", ORCHESTRATOR_REQUEST_TIMEOUT="1")
    assert gone.code == 3, gone
    assert gone.error == (
        f"error: no reply from '{deployment.prefix}.rpc' within 1s: "
        f"is an orchestrator serving prefix '{deployment.prefix}'?"
    )


@pytest.mark.rabbitmq
async def test_serve_killed_and_restarted_on_its_sqlite_store_loses_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Given serve on a SQLite store, an agent, a running task with a dependent, a queued one
    deployment.env["ORCHESTRATOR_STORE"] = f"sqlite:{tmp_path / 'state.sqlite'}"
    await deployment.serve()
    await deployment.agent("sql_agent", "analysis")
    events: dict[tuple[str, str], asyncio.Event] = collections.defaultdict(asyncio.Event)

    async def on_event(event: Any) -> None:  # (kind, task id): it happened
        events[event.kind, event.task_id].set()

    await deployment.client.subscribe_events(on_event, patterns=["task.started", "task.finished"])
    # It runs until the test lets it end, after serve is killed: however slow the machine.
    release = tmp_path / "release"
    payload = json.dumps({"until_file": str(release)})
    first = (await deployment.run("submit", "a", "-r", "analysis", "-p", payload)).out
    first = first.strip()
    dependent = await deployment.run("submit", "b", "-r", "analysis", "--depends-on", first)
    queued = await deployment.run("submit", "c", "-r", "nobody_can")
    deployment.queue_keys.update({"nobody_can", "c.nobody_can"})
    assert dependent.code == 0 and queued.code == 0, (dependent, queued)

    async def first_is(status: str) -> bool:
        return (await deployment.rpc(TaskStatusRequest(task_id=first)))["status"] == status

    finished = events["task.finished", first]
    await asyncio.wait_for(events["task.started", first].wait(), 20)
    assert not finished.is_set(), "the task ended before serve was killed"

    # When serve is killed (SIGKILL) while the task runs, and starts again after it ended
    deployment.processes["serve"][0].kill()
    await deployment.processes["serve"][0].wait()
    release.touch()
    await asyncio.wait_for(finished.wait(), 20)  # the result goes to nobody
    await deployment.serve()

    # Then the result sent while it was down completes the task, its dependent runs,
    # and the queued task and the counts are as before
    done = await deployment.run("submit", "d", "-r", "analysis", "--wait", "--json")
    assert done.code == 0, done
    await wait_until(lambda: first_is("completed"), timeout=20, interval=0.1)
    await wait_until(lambda: task_is(deployment, dependent.out.strip(), "completed"), timeout=20)
    still = json.loads((await deployment.run("status", queued.out.strip(), "--json")).out)
    assert still["status"] == "pending"
    stats = json.loads((await deployment.run("stats", "--json")).out)
    assert stats["tasks_created"] == 4
    assert stats["tasks_completed"] == 3


async def task_is(deployment: Deployment, task_id: str, status: str) -> bool:
    return (await deployment.rpc(TaskStatusRequest(task_id=task_id)))["status"] == status


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "error: Missing argument 'TASK_TYPE'. (see 'orchestrator submit --help')"),
        (["explode"], "error: No such command 'explode'. (see 'orchestrator --help')"),
        (["submit", "t", "--timeout", "soon"], "error: Invalid value for '--timeout': "),
        (["submit", "t", "--bogus"], "error: No such option: --bogus (see 'orchestrator submit"),
        (["agent", "run"], "error: Missing argument 'MODULE:OBJECT'. (see 'orchestrator agent"),
    ],
)
async def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = await run(*args)
    assert result.code == 2, result
    assert result.error.startswith(message), result.error


async def test_help_lists_commands_and_exit_codes() -> None:
    result = await run("--help")
    assert result.code == 0
    for command in (
        "serve", "agent", "submit", "status", "cancel", "stats", "agents", "tasks", "watch",
        "purge",
    ):  # fmt: skip
        assert f"  {command} " in result.out
    assert "3 broker unreachable" in " ".join(result.out.split())


# --- demo, watch, topology ----------------------------------------------------------------------


async def test_demo_runs_in_process_and_ends_with_a_summary() -> None:
    # When the README's `./run.sh demo` runs (python -m orchestrator demo)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "demo", "--workflows", "1",
        cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)

    # Then it runs the workflow in-process and ends by itself with a summary
    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("demo on the in-process bus")
    assert "3 of 3 tasks completed, 0 failed" in out.decode()


@pytest.mark.rabbitmq
async def test_demo_runs_on_the_broker_without_printing_the_password() -> None:
    broker_url = require_broker()
    result = await run("demo", "--workflows", "1", "--broker", broker_url)
    assert result.code == 0, result
    assert "3 of 3 tasks completed, 0 failed" in result.out
    assert ":***@" in result.out
    password = urlsplit(broker_url).password
    assert password
    assert f":{password}@" not in result.out + result.err


# --- the password never shows ----------------------------------------------------------------


def test_log_records_lose_the_password_in_message_arguments_and_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the command line's log filter, knowing a broker URL with a password
    import io
    import logging

    from orchestrator.cli import redaction
    from orchestrator.cli.logs import LogFilter

    password = "Pw-" + secrets.token_hex(8)
    url = f"amqp://someone:{password}@127.0.0.1:5672/"
    monkeypatch.setattr(redaction, "known_secrets", set())
    redaction.remember_secret(url)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(LogFilter())
    logger = logging.getLogger(f"test.scrub.{secrets.token_hex(4)}")
    logger.addHandler(handler)
    logger.propagate = False

    # When the password is in a message's arguments, in an exception's text and
    # traceback (log.exception, exc_info), and in a stack
    logger.warning("connecting to %s", url)
    try:
        raise ConnectionError(f"cannot reach {url} (password {password})")
    except ConnectionError:
        logger.exception("failed with %s", password)
        logger.error("again", exc_info=True)
    logger.info("where", stack_info=True, extra={"x": password})
    logger.warning("plain %s")  # a stray format without arguments still logs

    # Then every line is there, and the password in none of them
    text = stream.getvalue()
    assert "connecting to amqp://someone:***@127.0.0.1:5672/" in text
    assert text.count("Traceback (most recent call last)") == 2
    assert "ConnectionError: cannot reach amqp://someone:***@127.0.0.1:5672/ (password ***)" in text
    assert "plain %s" in text
    assert password not in text


LEAKY_AGENT = """
import os

from agents import Agent, TaskContext


def make_agent() -> Agent:
    agent = Agent(os.environ["AGENT_ID"], ["leaky"], 2, heartbeat_interval=0.3)

    @agent.handler()
    async def work(ctx: TaskContext) -> dict:
        # User code that puts the broker URL into its error
        raise ConnectionError("cannot reach " + os.environ["ORCHESTRATOR_BROKER_URL"])

    return agent
"""


@pytest.mark.rabbitmq
async def test_a_users_password_is_in_no_output_and_no_log(prefix: str, tmp_path: Path) -> None:
    # Given a RabbitMQ user with a random password of its own (not its name)
    with broker_user(management_api(), require_broker()) as broker:
        user, password = broker.name, broker.password
        outputs = await _run_everything_as(broker.url, prefix, tmp_path)

    # Then the password is in no output and no log
    for text in outputs:
        assert password not in text, text
    assert any(f"cannot reach amqp://{user}:***@" in text for text in outputs)


async def _run_everything_as(url: str, prefix: str, tmp_path: Path) -> list[str]:
    """Every command's output, and every process's debug log, of a session on ``url``."""
    outputs: list[str] = []
    deployment = Deployment(prefix, url)
    try:
        (tmp_path / "leaky_agent.py").write_text(LEAKY_AGENT)
        deployment.env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{tmp_path}"

        # When serve and two agents run with debug logs, and a user submits, waits, looks
        await deployment.start("serve", "serve", "--log-level", "debug")
        await wait_until(deployment.answers, timeout=20, interval=0.1)
        deployment.queue_keys.update({"analysis", "leaky"})
        for agent_id, spec, capabilities in [
            ("pw_agent", "tests.agent_app:make_agent", "analysis"),
            ("leaky_agent", "leaky_agent:make_agent", "leaky"),
        ]:
            await deployment.start(
                agent_id, "agent", "run", spec, "--log-level", "debug",
                AGENT_ID=agent_id, AGENT_CAPABILITIES=capabilities,
            )  # fmt: skip

        async def both_registered() -> bool:
            agents = await deployment.rpc(AgentsRequest())
            return {a["agent_id"] for a in agents} == {"pw_agent", "leaky_agent"}

        await wait_until(both_registered, timeout=30, interval=0.1)
        done = await deployment.run("submit", "t", "-r", "analysis", "-p", '{"sleep": 0.2}', "-w")
        assert done.code == 0, done
        failed = await deployment.run("submit", "t", "-r", "leaky", "--max-retries", "1", "-w")
        assert failed.code == 4, failed  # its error, with the URL in it, went everywhere
        failed_id = failed.out.splitlines()[0]
        results = [
            done,
            failed,
            await deployment.run(
                "submit", "t", "-r", "leaky", "--max-retries", "0", "-w", "--json"
            ),
            await deployment.run("status", failed_id),
            await deployment.run("status", failed_id, "--json"),
            await deployment.run("stats"),
            await deployment.run("agents"),
            await deployment.run("watch", "--seconds", "1"),
            await run("demo", "--workflows", "1", "--broker", url),
        ]
        assert results[-1].code == 0, results[-1]
        user = urlsplit(url).username
        assert f"{user}:***@" in results[-1].out  # the demo names the broker, not the password
        outputs += [r.out + r.err for r in results]
        for name in list(deployment.processes):
            assert await deployment.stop(name) == 0, deployment.log(name)
        outputs += [deployment.log(name) for name in deployment.processes]
        assert any("DEBUG" in log for log in outputs)  # the logs were verbose
    finally:
        await deployment.close()
    return outputs


@pytest.mark.rabbitmq
async def test_the_password_as_a_word_in_a_result_is_data_but_not_in_a_url(prefix: str) -> None:
    # Given a broker user with a password of its own, and a task whose payload, echoed
    # in its result, holds that password as a plain word and inside a broker URL
    with broker_user(management_api(), require_broker()) as broker:
        user, password = broker.name, broker.password
        leaked = f"amqp://{user}:{password}@broker.example:5672/"
        payload = {"word": password, "sentence": f"say {password}.", "url": leaked}
        deployment = Deployment(prefix, broker.url)
        try:
            await deployment.serve()
            await deployment.agent("data_agent", "analysis")

            # When a user submits it, waits, and looks at it, as JSON and as a table
            done = await deployment.run(
                "submit", "t", "-r", "analysis", "-p", json.dumps(payload), "-w", "--json"
            )
            assert done.code == 0, done
            task_id = json.loads(done.out)["task_id"]
            as_json = await deployment.run("status", task_id, "--json")
            table = await deployment.run("status", task_id)
        finally:
            await deployment.close()

    # Then the JSON is valid and holds the word and the sentence as they were,
    # and the URL without the password
    for result in (done, as_json):
        assert result.code == 0, result
        echo = json.loads(result.out)["result"]["echo"]
        assert echo == {**payload, "url": f"amqp://{user}:***@broker.example:5672/"}
    # And so does the table
    assert table.code == 0, table
    assert f'"{password}"' in table.out and f"say {password}." in table.out
    assert f"amqp://{user}:***@broker.example:5672/" in table.out
    assert f"{user}:{password}@" not in table.out


async def exists(deployment: Deployment, queue: str) -> bool:
    """Whether the broker has this queue (a passive declare, on a connection of its own)."""
    connection = await aio_pika.connect(deployment.broker_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


AGENT_ROW = re.compile(r"│ watched_agent +│ analysis +│ (\d+)/5 +│")


@pytest.mark.rabbitmq
async def test_watch_shows_events_queue_depths_and_agent_load(deployment: Deployment) -> None:
    # Given an orchestrator, an agent running a long task, and a task waiting in a
    # queue nobody consumes
    await deployment.serve()
    await deployment.agent("watched_agent", "analysis")
    deployment.queue_keys.add("unserved")
    await deployment.run("submit", "idle", "-r", "unserved")
    long = await deployment.run("submit", "long", "-r", "analysis", "-p", '{"sleep": 30}')
    long_id = long.out.strip()
    await wait_until(lambda: task_is(deployment, long_id, "running"), timeout=20, interval=0.1)

    # When a user watches while short tasks come and go beside the long one
    watch = asyncio.ensure_future(deployment.run("watch", "--seconds", "4", "--refresh", "0.5"))
    while not watch.done():
        await deployment.rpc(
            SubmitTaskRequest(
                name="watched", task_type="t", payload={}, required_capabilities=["analysis"]
            )
        )
        await asyncio.sleep(0.3)
    result = await watch

    # Then it ends by itself, showing the events, the queue depths and the agent's load
    assert result.code == 0, result
    assert "task.finished" in result.out
    assert "completed on watched_agent" in result.out
    loads = [int(n) for n in AGENT_ROW.findall(result.out)]
    assert loads, result.out
    # the long task holds one of its five slots in every refresh (a short task
    # may hold another at the moment one is drawn)
    assert min(loads) >= 1, loads
    assert re.search(r"│ idle\.unserved +│ idle +│ unserved +│ 1 +│", result.out), result.out
    assert (await deployment.rpc(TaskStatusRequest(task_id=long_id)))["status"] == "running"


def test_watch_view_renders_stats_agents_queues_and_events() -> None:
    from rich.console import Console

    from broker import AgentAnnounced, AgentHeartbeat, TaskFinished, TaskStarted
    from orchestrator.cli.watch import WatchView

    # Given the view of a prefix, after one poll and a few events
    settings = BusSettings(broker_url="amqp://ops:view-s3cret@rabbit:5672/", prefix="shop")
    view = WatchView(settings)
    view.stats = {
        "tasks_created": 7, "pending_tasks": 2, "running_tasks": 1, "tasks_completed": 3,
        "tasks_failed": 1, "overall_utilization": 0.25,
    }  # fmt: skip
    view.agents = [
        {
            "agent_id": "a-1", "capabilities": ["analysis", "trading"], "max_concurrent_tasks": 4,
            "current_load": 1, "utilization": 0.25, "performance_score": 0.9, "last_seen": None,
        }
    ]  # fmt: skip
    view.queues = [
        {"key": "t.@any", "queue": "shop.tasks.t.@any", "task_type": "t", "capabilities": [], "depth": 0},
        {"key": "a.analysis", "queue": "shop.tasks.a.analysis", "task_type": "a", "capabilities": ["analysis"], "depth": 5},
        {"key": "analysis", "queue": "shop.tasks.analysis", "capabilities": ["analysis"], "depth": 2},
    ]  # fmt: skip
    view.note = "no reply within 1s"
    for event in (
        AgentAnnounced(agent_id="a-1", capabilities=["analysis"], max_concurrent_tasks=4),
        AgentHeartbeat(agent_id="a-1", running=1),
        TaskStarted(task_id="task_1", attempt=2, agent_id="a-1"),
        TaskFinished(task_id="task_1", attempt=2, agent_id="a-1", outcome="failed", error="boom [x]"),
    ):  # fmt: skip
        asyncio.run(view.on_event(event))

    # When it is drawn
    console = Console(record=True, width=160, color_system=None)
    console.print(view.render())
    text = console.export_text()

    # Then it shows the broker without its password, the counts, load, depths and events
    assert "prefix shop on amqp://ops:***@rabbit:5672/" in text
    assert "view-s3cret" not in text
    assert "tasks: 7 created, 2 waiting, 1 running, 3 completed, 1 failed; utilization 25%" in text
    assert "no reply within 1s" in text
    assert re.search(r"│ a-1 +│ analysis, trading +│ 1/4 +│ 25% +│ 0.90 +│ - +│", text), text
    assert re.search(r"│ t\.@any +│ t +│ \(any\) +│ 0 +│", text), text
    assert re.search(r"│ a\.analysis +│ a +│ analysis +│ 5 +│", text), text
    assert re.search(r"│ analysis +│ - +│ analysis +│ 2 +│", text), text  # an older orchestrator
    assert re.search(r"│ agent.announce +│ a-1 +│ analysis; up to 4 at once +│", text), text
    assert re.search(r"│ task.started +│ task_1 +│ on a-1 \(attempt 2\) +│", text), text
    assert re.search(r"│ task.finished +│ task_1 +│ failed: boom \[x\] on a-1 +│", text), text
    assert "agent.heartbeat" not in text  # counted, not listed
    assert view.heartbeats == 1


def test_watch_shows_the_password_as_a_word_in_data_but_in_no_url_or_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from broker import TaskFinished
    from orchestrator.cli import redaction
    from orchestrator.cli.watch import WatchView

    # Given a view knowing a broker password, a short and common one
    monkeypatch.setattr(redaction, "known_secrets", set())
    redaction.remember_secret("amqp://ops:cat@rabbit:5672/")
    view = WatchView(BusSettings(broker_url="amqp://ops:cat@rabbit:5672/", prefix="shop"))

    # When a task's error holds it as a word and in a URL, and the view's note
    # (an error of the command line) holds it too
    error = "the cat sat on amqp://ops:cat@rabbit:5672/ and AMQP://ops:cat@other/"
    event = TaskFinished(task_id="t_1", attempt=1, agent_id="a", outcome="failed", error=error)
    asyncio.run(view.on_event(event))
    view.note = "cannot reach amqp://ops:cat@rabbit:5672/ (cat)"
    console = Console(record=True, width=240, color_system=None)
    console.print(view.render())
    text = console.export_text()

    # Then the event's detail is the user's text, URLs without the password
    assert "failed: the cat sat on amqp://ops:***@rabbit:5672/ and AMQP://ops:***@other/" in text
    # And the note, an error, has no password at all
    assert "cannot reach amqp://ops:***@rabbit:5672/ (***)" in text


async def test_topology_prints_and_exports_the_definitions(tmp_path: Path) -> None:
    # When a user prints the definitions of a prefix, then they are JSON with its queues
    printed = await run("topology", "--prefix", "shop")
    assert printed.code == 0, printed
    queues = {q["name"] for q in json.loads(printed.out)["queues"]}
    assert {"shop.rpc", "shop.orchestrator.announcements", "shop.tasks.@any"} <= queues

    # When they export them to a file, then the file holds the same
    target = tmp_path / "definitions.json"
    exported = await run("topology", "--prefix", "shop", "--export", str(target))
    assert exported.code == 0, exported
    assert json.loads(target.read_text()) == json.loads(printed.out)

    # When they name agents, then each one's events queue is there too, bound to its id
    named = await run("topology", "--prefix", "shop", "--agent", "a-1", "--agent", "b")
    assert named.code == 0, named
    document = json.loads(named.out)
    assert {q["name"] for q in document["queues"]} - queues == {
        "shop.orchestrator.events.a-1",
        "shop.orchestrator.events.b",
    }
    assert {
        b["routing_key"]
        for b in document["bindings"]
        if b["destination"] == "shop.orchestrator.events.a-1"
    } == {"task.*.a-1", "agent.goodbye.a-1"}
    refused = await run("topology", "--prefix", "shop", "--agent", "not an id")
    assert refused.code != 0 and "not an agent id" in refused.error, refused


async def test_schemas_command_writes_the_checked_in_documents(tmp_path: Path) -> None:
    result = await run("schemas", "--out", str(tmp_path))
    assert result.code == 0, result
    assert (tmp_path / "asyncapi.json").read_text() == (ROOT / "docs/asyncapi.json").read_text()


# --- a client that is not Python ------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_shell_script_with_curl_submits_a_task_that_completes(
    deployment: Deployment,
) -> None:
    # Given a running orchestrator and agent, and RabbitMQ's management HTTP API
    require_tools("curl", "jq")
    api = management_api(deployment.broker_url)
    await deployment.serve()
    await deployment.agent("curl_agent", "analysis")

    # When the README's example script submits a task with curl
    process = await asyncio.create_subprocess_exec(
        "bash", str(CURL_EXAMPLE), "analysis", '{"symbol": "ETH"}', "analysis",
        cwd=ROOT,
        env={
            **base_env(),
            "RABBITMQ_API": api.api,
            "RABBITMQ_USER": api.user,
            "RABBITMQ_PASSWORD": api.password,
            "ORCHESTRATOR_PREFIX": deployment.prefix,
            "WAIT_SECONDS": "20",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)

    # Then it prints the task's id and its final status: completed, with the agent's result
    assert process.returncode == 0, err.decode()
    task_id, _, status_json = out.decode().partition("\n")
    status = json.loads(status_json)
    assert status["task_id"] == task_id
    assert status["status"] == "completed"
    assert status["result"]["echo"] == {"symbol": "ETH"}
    assert status["assigned_agent"] == "curl_agent"

    # And the command line sees the same task
    seen = await deployment.run("status", task_id, "--json")
    assert json.loads(seen.out)["name"] == "analysis from curl"


def test_a_short_password_is_blanked_as_a_word_not_inside_other_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.cli import redaction

    monkeypatch.setattr(redaction, "known_secrets", set())
    redaction.remember_secret("amqp://ops:y@rabbit:5672/")
    scrubbed = redaction.scrub("every user: password y refused at amqp://ops:y@rabbit:5672/")
    assert scrubbed == "every user: password *** refused at amqp://ops:***@rabbit:5672/"
