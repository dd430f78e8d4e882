"""The broker password stays out of ``ps`` (issue 11, Secrets).

It can come from a file (``ORCHESTRATOR_BROKER_PASSWORD_FILE``,
``--broker-password-file``) or the environment
(``ORCHESTRATOR_BROKER_PASSWORD``) beside a URL without it. A password given in
``--broker``'s URL is warned about, naming those settings, and moved out of the
process's command line before anything connects: ``ps`` of a running ``serve``
never shows it. Each test has a broker user of its own whose password is not
its name, so that a password in ``ps`` cannot hide behind the user name.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker import BusSettings, RabbitMQBus, StatsRequest
from tests.conftest import require_broker
from tests.deployment import BrokerUser, Deployment, broker_user, management_api
from tests.harness import wait_until

pytestmark = pytest.mark.rabbitmq

WARNING = (
    "WARNING orchestrator.cli: --broker: a password in the URL on a command line can be read"
    " by every user of this machine (ps); give the URL without it and the password in"
    " ORCHESTRATOR_BROKER_PASSWORD_FILE (or --broker-password-file) or"
    " ORCHESTRATOR_BROKER_PASSWORD"
)


@pytest.fixture
def user() -> Iterator[BrokerUser]:
    url = require_broker()
    with broker_user(management_api(url), url) as made:
        yield made


@pytest.fixture
async def deployment(user: BrokerUser, prefix: str) -> AsyncIterator[Deployment]:
    """A deployment whose environment names the broker without the password."""
    d = Deployment(prefix, user.url)
    d.env["ORCHESTRATOR_BROKER_URL"] = bare(user)
    try:
        yield d
    finally:
        await d.close()


def bare(user: BrokerUser) -> str:
    """The user's URL without its password."""
    return user.url.replace(f":{user.password}@", "@")


def ps_args(pid: int) -> str:
    """What ``ps`` shows every user of the machine as the process's command line."""
    return subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()


async def test_a_password_in_broker_is_warned_about_and_never_in_ps(
    deployment: Deployment, user: BrokerUser
) -> None:
    # Given serve started with the password in --broker's URL (and none in its environment)
    del deployment.env["ORCHESTRATOR_BROKER_URL"]
    process = await deployment.start("serve", "serve", "--broker", user.url)

    # When it serves (requests are answered, with this user's password)
    await wait_until(deployment.answers, timeout=20, interval=0.1)

    # Then ps shows its command line without the password, the URL with the user still
    # (the same process: it ran itself again, it did not start another)
    shown = ps_args(process.pid)
    assert user.password not in shown, shown
    assert f"serve --broker {bare(user)}" in shown, shown
    # And its log warned once, naming the safer settings, and never shows the password
    log = deployment.log("serve")
    assert log.count(WARNING) == 1, log
    assert "moved out of it now" in log
    assert user.password not in log
    # And it still says where it serves as the URL it was given, without the password
    assert f"{user.url.replace(user.password, '***')}" in log, log


async def test_the_password_from_a_file_or_the_environment(
    deployment: Deployment, user: BrokerUser, tmp_path: Path
) -> None:
    # Given the password in a file (as a mounted secret: with a line break at its end)
    secret = tmp_path / "broker-password"
    secret.write_text(user.password + "\n")
    secret.chmod(0o600)

    # When serve runs with a URL without it and --broker-password-file
    process = await deployment.start("serve", "serve", "--broker-password-file", str(secret))
    await wait_until(deployment.answers, timeout=20, interval=0.1)

    # Then it serves, nothing warns, and ps shows no password
    assert user.password not in ps_args(process.pid)
    assert "WARNING" not in deployment.log("serve"), deployment.log("serve")

    # And a command with the password in ORCHESTRATOR_BROKER_PASSWORD_FILE or
    # ORCHESTRATOR_BROKER_PASSWORD answers too
    for variable, value in [
        ("ORCHESTRATOR_BROKER_PASSWORD_FILE", str(secret)),
        ("ORCHESTRATOR_BROKER_PASSWORD", user.password),
    ]:
        result = await deployment.run("stats", "--json", **{variable: value})
        assert result.code == 0, (variable, result)
        assert result.err == "", result.err

    # And a library user gets it from the settings
    bus = RabbitMQBus(
        settings=BusSettings(
            broker_url=bare(user), broker_password_file=str(secret), prefix=deployment.prefix
        ),
        declare_topology=False,
    )
    await bus.connect()
    try:
        assert (await bus.request(StatsRequest(), timeout=5)).ok
    finally:
        await bus.close()


async def test_a_wrong_or_missing_password_names_where_it_came_from(
    deployment: Deployment, user: BrokerUser, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    missing = tmp_path / "no-such-file"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--broker-password-file", str(wrong)], {}, "error: --broker-password-file: RabbitMQ at"),
        ([], {"ORCHESTRATOR_BROKER_PASSWORD": "nope"}, "error: ORCHESTRATOR_BROKER_PASSWORD:"),
        (
            ["--broker-password-file", str(missing)],
            {},
            f"error: --broker-password-file: password file '{missing}' does not exist",
        ),
        (
            [],
            {"ORCHESTRATOR_BROKER_PASSWORD_FILE": str(empty)},
            f"error: ORCHESTRATOR_BROKER_PASSWORD_FILE: password file '{empty}' is empty",
        ),
        (
            ["--broker", user.url],
            {"ORCHESTRATOR_BROKER_PASSWORD": "other"},
            "error: ORCHESTRATOR_BROKER_PASSWORD: the broker URL has a password too: give only one",
        ),
    ]
    for args, env, expected in cases:
        result = await deployment.run("stats", *args, **env)
        assert result.code == 1, (args, env, result)
        last = result.err.strip().splitlines()[-1]
        assert last.startswith(expected), (args, env, result.err)
        assert user.password not in result.err
        assert "nope" not in result.err and "not-the-password" not in result.err


async def test_a_password_given_to_main_in_process_is_warned_about(
    caplog: pytest.LogCaptureFixture, user: BrokerUser, prefix: str
) -> None:
    # main() called from Python: the password is not on this process's command line,
    # so nothing runs again; the warning is still given
    from orchestrator.cli import main

    code = await asyncio.to_thread(main, ["stats", "--broker", user.url, "--prefix", prefix])
    assert code == 3  # nobody serves the prefix
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [WARNING.removeprefix("WARNING orchestrator.cli: ")], caplog.text
    assert user.password not in caplog.text


def test_python_m_agents_refuses_a_password_in_broker() -> None:
    """The entry point without the command line's re-run refuses what it cannot hide."""
    import sys

    from tests.deployment import ROOT, base_env

    done = subprocess.run(
        [sys.executable, "-m", "agents", "tests.agent_app:make_agent",
         "--broker", "amqp://someone:s3cret-pw@127.0.0.1:1/"],
        cwd=ROOT, env=base_env(AGENT_ID="a"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done
    assert "ORCHESTRATOR_BROKER_PASSWORD_FILE" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
