"""Bad settings fail fast and clearly; a signal ends any command within 2 s.

Issue 10, item 8, as a new user meets it: a broker URL that is not an AMQP
address, a TLS file that is not there, a virtual host or login the broker
refuses, a store that cannot be used. Each is one line that names the
setting and what is wrong, exit 1, before anything connects (the broker
given to the store cases answers nowhere, so reaching it would be exit 3).
And SIGTERM or SIGINT ends every command within 2 s, while it connects too:
a broker that accepts the connection and never answers holds it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from broker import BusSettings, RabbitMQBus
from tests.conftest import require_broker
from tests.deployment import CLI, ROOT, Deployment, Result, base_env, management_api
from tests.harness import wait_until

UNREACHABLE = "amqp://someone:pw-s3cret@127.0.0.1:1/"
STOP_WITHIN = 2.0


async def run_bounded(*args: str, env: dict[str, str], timeout: float = 20) -> Result:
    """Run a command to its end; fail (and kill it) if it takes longer than ``timeout``."""
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, cwd=ROOT, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{args} still ran after {timeout}s")
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


# --- the broker URL -----------------------------------------------------------------------------

NOT_AMQP = [
    ("127.0.0.1:5673", "no amqp:// or amqps:// in front"),
    ("not a url", "no amqp:// or amqps:// in front"),
    ("http://guest:pw-s3cret@127.0.0.1:5672/", "scheme 'http://' is not AMQP"),
    ("amqp:///", "no host"),
    ("amqp://guest:pw-s3cret@rabbit:port/", "the port is not a number"),
]


@pytest.mark.parametrize(("url", "problem"), NOT_AMQP)
def test_bus_settings_refuse_a_url_that_is_not_an_amqp_address(url: str, problem: str) -> None:
    # When a library user makes settings with it, then a ValueError names the setting,
    # says what is wrong, and shows no password
    with pytest.raises(ValueError) as raised:
        BusSettings(broker_url=url)
    text = str(raised.value)
    assert "broker_url" in text and problem in text, text
    assert "s3cret" not in text and "s3cret" not in repr(raised.value)


async def test_a_bus_given_a_bad_url_beside_its_settings_refuses_it_before_connecting() -> None:
    # Given a bus whose URL bypassed the settings' check (settings plus a URL)
    bus = RabbitMQBus("http://127.0.0.1:15672/", settings=BusSettings(prefix="x"))

    # When it connects, then it refuses the URL, naming the setting
    with pytest.raises(ValueError, match=r"^broker_url: scheme 'http://' is not AMQP"):
        await bus.connect()
    assert not bus.is_connected


def test_tls_files_named_in_the_url_must_be_there(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    missing = tmp_path / "no" / "ca.pem"
    with pytest.raises(ValueError, match=f"cafile '{missing}' does not exist"):
        BusSettings(broker_url=f"amqps://rabbit:5671/?cafile={missing}")
    with pytest.raises(ValueError, match=f"certfile '{tmp_path}' is a folder"):
        BusSettings(broker_url=f"amqps://rabbit:5671/?certfile={tmp_path}")
    with pytest.raises(ValueError, match=f"capath '{ca}' is not a folder"):
        BusSettings(broker_url=f"amqps://rabbit:5671/?capath={ca}")
    with pytest.raises(ValueError, match="cafile is a TLS option, and TLS needs amqps://"):
        BusSettings(broker_url=f"amqp://rabbit:5672/?cafile={ca}")
    # And a file that is there is taken
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    url = f"amqps://rabbit:5671/?cafile={ca}"
    assert BusSettings(broker_url=url).broker_url == url


@pytest.mark.parametrize(("url", "problem"), NOT_AMQP)
@pytest.mark.parametrize("given_by", ["option", "environment"])
async def test_a_url_that_is_not_amqp_is_one_line_exit_1_at_once(
    url: str, problem: str, given_by: str
) -> None:
    # When a command is given a broker URL that is not an AMQP address
    env = base_env()
    args = ["stats"]
    if given_by == "option":
        args += ["--broker", url]
        setting = "--broker"
    else:
        env["ORCHESTRATOR_BROKER_URL"] = url
        setting = "ORCHESTRATOR_BROKER_URL"
    result = await run_bounded(*args, env=env, timeout=10)

    # Then it names the setting and what is wrong in one line, without the password; exit 1
    assert result.code == 1, result
    assert result.error.startswith(f"error: {setting}: {problem}"), result.error
    assert "s3cret" not in result.out + result.err


@pytest.mark.parametrize(
    "args",
    [
        ["serve"],
        ["agent", "run", "tests.agent_app:make_agent"],
        ["submit", "t", "--wait"],
        ["status", "task_1"],
        ["cancel", "task_1"],
        ["agents"],
        ["watch"],
        ["demo", "--workflows", "1"],
    ],
)
async def test_every_command_refuses_a_url_without_a_scheme(args: list[str]) -> None:
    # The URL of the issue: it hung for ever
    result = await run_bounded(*args, "--broker", "127.0.0.1:5673", env=base_env(AGENT_ID="a"))
    assert result.code == 1, result
    assert result.error.startswith("error: --broker: no amqp:// or amqps:// in front"), result


async def test_a_missing_ca_file_is_one_line_naming_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "certs" / "ca.pem"
    url = f"amqps://guest:pw-s3cret@127.0.0.1:1/?cafile={missing}"
    result = await run_bounded("stats", "--broker", url, env=base_env(), timeout=10)
    assert result.code == 1, result
    assert result.error == f"error: --broker: cafile '{missing}' does not exist"


TLS_FILES = [
    ("--broker-ca-file", "ORCHESTRATOR_BROKER_CA_FILE", "CA file"),
    ("--broker-cert-file", "ORCHESTRATOR_BROKER_CERT_FILE", "certificate file"),
    ("--broker-key-file", "ORCHESTRATOR_BROKER_KEY_FILE", "key file"),
]


@pytest.mark.parametrize(("option", "variable", "what"), TLS_FILES)
@pytest.mark.parametrize("given_by", ["option", "environment"])
async def test_a_missing_tls_file_setting_is_one_line_naming_it_and_its_path(
    tmp_path: Path, option: str, variable: str, what: str, given_by: str
) -> None:
    # Given a TLS file that is not there, or a folder, by option or in the environment
    missing = tmp_path / "certs" / "x.pem"
    for path, problem in [(missing, "does not exist"), (tmp_path, "is a folder, not a file")]:
        env = base_env(ORCHESTRATOR_BROKER_URL="amqps://guest@127.0.0.1:1/")
        args = ["agents"]
        if given_by == "option":
            args += [option, str(path)]
        else:
            env[variable] = str(path)

        # When a command starts, then it names the setting and the path in one line, exit 1
        result = await run_bounded(*args, env=env, timeout=10)
        assert result.code == 1, result
        setting = option if given_by == "option" else variable
        assert result.error == f"error: {setting}: {what} '{path}' {problem}", result.error


async def test_a_file_that_is_not_a_certificate_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    env = base_env(ORCHESTRATOR_BROKER_URL="amqps://guest@127.0.0.1:1/")
    result = await run_bounded("stats", "--broker-ca-file", str(not_pem), env=env, timeout=10)
    assert result.code == 1, result  # 3 would mean it tried the broker
    assert result.error.startswith(
        f"error: --broker-ca-file: '{not_pem}' holds no CA certificate we can read"
    ), result.error
    cert_only = await run_bounded("stats", "--broker-key-file", str(not_pem), env=env, timeout=10)
    assert cert_only.code == 1, cert_only
    assert cert_only.error == (
        "error: --broker-key-file: a client key needs its certificate, broker_cert_file"
    )


def _with(url: str, *, path: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username or 'guest'}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=path if path is not None else parts.path))


@pytest.mark.rabbitmq
async def test_a_virtual_host_or_login_the_broker_refuses_is_one_line_exit_1() -> None:
    broker = require_broker()
    user = urlsplit(broker).username or "guest"
    vhost = f"no-such-vhost-{os.getpid()}"
    cases = [
        (
            _with(broker, path=f"/{vhost}"),
            f"refused virtual host '{vhost}': it does not exist, or user '{user}' has no"
            " permission to use it",
        ),
        (
            _with(broker, password="Not-The-Pa55word"),
            f"refused the login of user '{user}': wrong user name or password",
        ),
    ]
    for url, refusal in cases:
        # When a command connects with it, then it says what the broker refused, at once
        began = time.monotonic()
        result = await run_bounded("stats", "--broker", url, env=base_env(), timeout=20)
        assert result.code == 1, result
        lines = result.err.strip().splitlines()
        if urlsplit(url).password != user:  # warned first (not guest:guest): test_secrets.py
            assert "--broker: a password in the URL on a command line" in lines[0], result.err
            lines = lines[1:]
        [error] = lines
        assert error.startswith("error: --broker: RabbitMQ at "), error
        assert error.endswith(refusal), error
        assert "Not-The-Pa55word" not in result.err
        assert "InvalidFrameError" not in result.err
        assert time.monotonic() - began < 10  # no retries: the next try meets it again

        # And a library user gets a ConnectionError that says the same
        bus = RabbitMQBus(settings=BusSettings(broker_url=url), declare_topology=False)
        with pytest.raises(ConnectionError, match=r"^broker_url: RabbitMQ at .* refused "):
            await bus.connect()


# --- the store ----------------------------------------------------------------------------------


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere it may change modes: a folder nobody writes in
        return Path("/proc")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize(
    "case", ["folder", "not sqlite", "read-only folder", "under a file", "missing folder"]
)
async def test_a_store_serve_cannot_use_is_one_line_exit_1_before_connecting(
    case: str, tmp_path: Path
) -> None:
    # Given a --store that names something a SQLite store cannot be
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n")
    path, problem = {
        "folder": (tmp_path, f"'{tmp_path}' is a folder; name a file in it"),
        "not sqlite": (text_file, f"'{text_file}' is not a SQLite database"),
        "read-only folder": (
            _read_only_folder(tmp_path) / "state.db",
            f"cannot create a file in folder '{_read_only_folder_name(tmp_path)}'",
        ),
        "under a file": (text_file / "state.db", f"'{text_file}' is a file, not a folder"),
        "missing folder": (
            _read_only_folder(tmp_path) / "new" / "state.db",
            f"cannot create a file in folder '{_read_only_folder_name(tmp_path)}'",
        ),
    }[case]

    # When serve starts on it (with a broker nobody answers at), by option and by environment
    for args, env, setting in [
        (["--store", f"sqlite:{path}"], base_env(), "--store"),
        ([], base_env(ORCHESTRATOR_STORE=f"sqlite:{path}"), f"ORCHESTRATOR_STORE='sqlite:{path}'"),
    ]:
        env["ORCHESTRATOR_BROKER_URL"] = UNREACHABLE  # (in --broker its password is warned about)
        result = await run_bounded("serve", *args, env=env)

        # Then it names the setting and what is wrong in one line, exit 1: the broker
        # was never tried
        assert result.code == 1, result
        assert result.error.startswith(f"error: {setting}: {problem}"), result.error
        assert "Traceback" not in result.err


def _read_only_folder_name(tmp_path: Path) -> str:
    return "/proc" if os.geteuid() == 0 else str(tmp_path / "read-only")


async def test_serve_opens_its_store_before_it_connects(tmp_path: Path) -> None:
    # Given a store in a folder yet to be made, and a broker nobody answers at
    store = tmp_path / "new" / "state.db"

    # When serve starts, then it fails on the broker (exit 3) having made the store first
    result = await run_bounded("serve", "--store", f"sqlite:{store}", "--broker", UNREACHABLE,
                               env=base_env())  # fmt: skip
    assert result.code == 3, result
    assert store.is_file()
    assert store.read_bytes().startswith(b"SQLite format 3\x00")


# --- signals ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP port that accepts connections and never says a word: a connect to it
    waits until its timeout. The event is set once a client has connected."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()
        await reader.read()  # until the client goes away

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:guest@127.0.0.1:{port}/", connected
    finally:
        for writer in held:
            writer.close()
        server.close()


SIGNALLED = [
    (["serve"], signal.SIGTERM, 0),
    (["serve"], signal.SIGINT, 0),
    (["agent", "run", "tests.agent_app:make_agent"], signal.SIGTERM, 0),
    (["watch"], signal.SIGTERM, 0),
    (["watch"], signal.SIGINT, 0),
    (["stats"], signal.SIGTERM, 128 + signal.SIGTERM),
    (["stats"], signal.SIGINT, 128 + signal.SIGINT),
    (["status", "task_1"], signal.SIGTERM, 128 + signal.SIGTERM),
    (["cancel", "task_1"], signal.SIGTERM, 128 + signal.SIGTERM),
    (["agents"], signal.SIGTERM, 128 + signal.SIGTERM),
    (["submit", "t", "--wait"], signal.SIGTERM, 128 + signal.SIGTERM),
    (["demo", "--workflows", "1"], signal.SIGTERM, 128 + signal.SIGTERM),
]


@pytest.mark.parametrize(
    ("args", "sig", "code"),
    SIGNALLED,
    ids=[f"{' '.join(a[:2])}-{s.name}" for a, s, _ in SIGNALLED],
)
async def test_a_signal_ends_a_command_within_2s_while_it_connects(
    args: list[str], sig: signal.Signals, code: int
) -> None:
    async with silent_broker() as (url, connected):
        # Given a command connecting to a broker that never answers
        process = await asyncio.create_subprocess_exec(
            *CLI, *args, "--broker", url, cwd=ROOT, env=base_env(AGENT_ID="a"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            await asyncio.wait_for(connected.wait(), 30)

            # When it gets the signal
            process.send_signal(sig)
            began = time.monotonic()
            _, err = await asyncio.wait_for(process.communicate(), 10)
            took = time.monotonic() - began
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    # Then it has ended within 2 s: serve, watch and agent run as they end on a
    # signal (exit 0), a command that was not done with 128 + the signal and one line
    assert took < STOP_WITHIN, (took, err.decode())
    assert process.returncode == code, err.decode()
    if code:
        assert err.decode().strip().splitlines() == [f"error: interrupted by {sig.name}"]
    assert "Traceback" not in err.decode()


@pytest.mark.rabbitmq
async def test_sigterm_stops_a_serving_orchestrator_within_2s(prefix: str) -> None:
    deployment = Deployment(prefix, require_broker())
    try:
        process = await deployment.serve()
        process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        await asyncio.wait_for(process.wait(), 10)
        assert time.monotonic() - began < STOP_WITHIN
        assert process.returncode == 0, deployment.log("serve")
    finally:
        await deployment.close()


@pytest.mark.rabbitmq
async def test_a_signal_ends_a_connected_command_within_2s(prefix: str) -> None:
    # Given a serving orchestrator, and connected to it: a watch, a submit
    # waiting for a task nobody can run, and a second serve standing by
    deployment = Deployment(prefix, require_broker())
    try:
        await deployment.serve()
        api = management_api()

        def watching(_: str) -> bool:
            # Its monitor queue is consumed (it draws no frame when not on a terminal).
            status, queues = api.call("GET", "/api/queues/%2F")
            return status == 200 and any(
                q["name"].startswith(f"{prefix}.monitor.") and q.get("consumers") for q in queues
            )

        ready = {
            "watch": (["watch"], watching, 0),
            "waiting": (["submit", "t", "--wait"], lambda log: "wait" in log, 128 + signal.SIGTERM),
            "standby": (["serve"], lambda log: "standing by" in log, 0),
        }
        for name, (args, _, _) in ready.items():
            await deployment.start(name, *args, PYTHONUNBUFFERED="1")
        for name, (_, is_ready, _) in ready.items():

            async def ready_now(name: str = name, is_ready=is_ready) -> bool:
                return await asyncio.to_thread(is_ready, deployment.log(name))

            await wait_until(ready_now, timeout=30)

        # When each gets SIGTERM, then each has ended within 2 s as it should
        for name, (_, _, code) in ready.items():
            process = deployment.processes[name][0]
            process.send_signal(signal.SIGTERM)
            began = time.monotonic()
            await asyncio.wait_for(process.wait(), 10)
            took = time.monotonic() - began
            assert took < STOP_WITHIN, (name, took, deployment.log(name))
            assert process.returncode == code, (name, deployment.log(name))
            assert "Traceback" not in deployment.log(name), deployment.log(name)
    finally:
        await deployment.close()
