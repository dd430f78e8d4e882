"""A deployment as a user runs it, for tests: the ``orchestrator`` commands as
processes on one test's prefix, and RabbitMQ's management HTTP API.

Shared by test_cli, test_deploy and test_readme.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from broker import AgentsRequest, BusSettings, NoReply, QueuesRequest, RabbitMQBus, StatsRequest
from tests.conftest import require_broker
from tests.harness import wait_until

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("orchestrator")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "orchestrator"]
"""The console script as installed, or the module where it is not."""


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one line on stderr (fails if there is not exactly one)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        return lines[0]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **extra}


async def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: bytes | None = None
) -> Result:
    """Run one command to its end (``stdin``: what it reads there; nothing by default)."""
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=ROOT,
        env=env or base_env(),
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class Deployment:
    """One test's broker prefix and the processes it runs on it."""

    def __init__(self, prefix: str, broker_url: str) -> None:
        self.prefix = prefix
        self.broker_url = broker_url
        self.env = base_env(
            ORCHESTRATOR_BROKER_URL=broker_url,
            ORCHESTRATOR_PREFIX=prefix,
            ORCHESTRATOR_REQUEST_TIMEOUT="5",
            ORCHESTRATOR_HEARTBEAT_TIMEOUT="3",
            ORCHESTRATOR_MONITOR_INTERVAL="0.2",
            ORCHESTRATOR_TIMEOUT_GRACE="0.5",
            ORCHESTRATOR_RETRY_BASE_DELAY="0.05",
        )
        self.processes: dict[str, tuple[asyncio.subprocess.Process, Any]] = {}
        self.queue_keys: set[str] = set()
        self.client = RabbitMQBus(
            settings=BusSettings(broker_url=broker_url, prefix=prefix), declare_topology=False
        )

    async def run(
        self, *args: str, timeout: float = 60, stdin: bytes | None = None, **env: str
    ) -> Result:
        return await run(*args, env={**self.env, **env}, timeout=timeout, stdin=stdin)

    async def start(self, name: str, *args: str, **env: str) -> asyncio.subprocess.Process:
        """A long-running command; its output goes to a log file (see ``log``)."""
        log = tempfile.NamedTemporaryFile("w+b", prefix=f"{name}-", suffix=".log")
        process = await asyncio.create_subprocess_exec(
            *CLI,
            *args,
            cwd=ROOT,
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = (process, log)
        return process

    def log(self, name: str) -> str:
        log = self.processes[name][1]
        log.seek(0)
        return log.read().decode(errors="replace")

    async def serve(self) -> asyncio.subprocess.Process:
        """``orchestrator serve``, once it answers requests."""
        process = await self.start("serve", "serve")
        await wait_until(self.answers, timeout=20, interval=0.1)
        return process

    async def answers(self) -> bool:
        """Whether the orchestrator answers requests (fails if serve has exited)."""
        process = self.processes["serve"][0]
        if process.returncode is not None:
            raise AssertionError(f"serve exited {process.returncode}:\n{self.log('serve')}")
        try:
            await self.rpc(StatsRequest(), timeout=0.5)
        except NoReply:
            return False
        return True

    async def agent(self, agent_id: str, *capabilities: str, **env: str) -> None:
        """``orchestrator agent run`` of tests/agent_app.py, once it is registered."""
        self.queue_keys.update(capabilities)
        await self.start(
            agent_id,
            "agent",
            "run",
            "tests.agent_app:make_agent",
            AGENT_ID=agent_id,
            AGENT_CAPABILITIES=",".join(capabilities),
            **env,
        )

        async def registered() -> bool:
            agents = await self.rpc(AgentsRequest())
            return agent_id in {a["agent_id"] for a in agents}

        await wait_until(registered, timeout=20, interval=0.1)

    async def rpc(self, request: Any, timeout: float = 5) -> Any:
        """What the orchestrator answers (for waiting on conditions, not under test)."""
        if not self.client.is_connected:
            await self.client.connect()
        reply = await self.client.request(request, timeout=timeout)
        assert reply.ok, reply.error
        return reply.result

    async def stop(self, name: str) -> int:
        """SIGTERM, then the exit code (killed after 15 s)."""
        process = self.processes[name][0]
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode

    async def close(self) -> None:
        # The task queues in use, as the orchestrator lists them (their keys hold
        # task types): asked while it still answers, deleted below.
        with contextlib.suppress(Exception):
            if any(p.returncode is None for p, _ in self.processes.values()):
                self.queue_keys.update(q["key"] for q in await self.rpc(QueuesRequest(), 2))
        keep = os.environ.get("DEPLOYMENT_LOGS")  # a folder: each process's log kept there
        for name in reversed(list(self.processes)):  # agents before the orchestrator
            await self.stop(name)
            if keep:
                _keep_log(Path(keep) / f"{self.prefix}-{name}.log", self.log(name))
            self.processes[name][1].close()
        if not self.client.is_connected:
            await self.client.connect()
        try:
            await self.client.delete_topology(self.queue_keys)
        finally:
            await self.client.close()


def _keep_log(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- the management HTTP API --------------------------------------------------------------


def skip_or_fail(message: str) -> None:
    """Skip the test; fail it under CI=true, where everything it needs must be there."""
    if IN_CI:
        pytest.fail(message + " (CI=true: it is needed)")
    pytest.skip(message)


def require_tools(*tools: str) -> None:
    """Skip (fail under CI=true) unless these programs are on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} not installed")


class ManagementAPI:
    """RabbitMQ's HTTP API with the broker URL's credentials (guest/guest locally)."""

    def __init__(self, broker_url: str) -> None:
        parts = urlsplit(broker_url)
        host = parts.hostname or "127.0.0.1"
        self.local = host in ("127.0.0.1", "localhost", "::1")
        self.base = os.environ.get("RABBITMQ_MANAGEMENT_URL") or f"http://{host}:15672"
        self.user = unquote(parts.username or "guest")
        self.password = unquote(parts.password or "guest")
        credentials = f"{self.user}:{self.password}".encode()
        self._auth = "Basic " + base64.b64encode(credentials).decode()

    @property
    def api(self) -> str:
        """The API's root, as the curl client takes it (RABBITMQ_API)."""
        return f"{self.base.rstrip('/')}/api"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The status and JSON answer of one call; ``path`` starts with /api/."""
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        return status, (json.loads(raw) if raw.strip() else None)

    def answers(self) -> bool:
        try:
            return self.call("GET", "/api/overview")[0] == 200
        except OSError:
            return False


def management_api(broker_url: str | None = None, timeout: float = 60) -> ManagementAPI:
    """The management API of the broker (the test broker by default), enabling the
    plugin if it is off; skips when it cannot be had (fails under CI=true)."""
    api = ManagementAPI(broker_url or require_broker())
    if api.answers():
        return api
    if api.local and shutil.which("rabbitmq-plugins"):
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if api.answers():
                return api
            time.sleep(1)
    skip_or_fail(f"RabbitMQ's management API does not answer at {api.base}")
    raise AssertionError("unreachable")


@dataclass
class BrokerUser:
    name: str
    password: str
    url: str
    """amqp:// URL of the broker with this user's credentials."""


@contextlib.contextmanager
def broker_user(api: ManagementAPI, broker_url: str) -> Iterator[BrokerUser]:
    """A RabbitMQ user of the test's own, with a random password (not its name)
    and every permission on the vhost /; deleted at the end."""
    name = f"test-{secrets.token_hex(5)}"
    password = secrets.token_urlsafe(18)
    assert password != name
    parts = urlsplit(broker_url)
    url = f"amqp://{name}:{password}@{parts.hostname or '127.0.0.1'}:{parts.port or 5672}/"
    status, body = api.call("PUT", f"/api/users/{name}", {"password": password, "tags": ""})
    assert status < 300, body
    try:
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        status, body = api.call("PUT", f"/api/permissions/%2F/{name}", permissions)
        assert status < 300, body
        yield BrokerUser(name, password, url)
    finally:
        api.call("DELETE", f"/api/users/{name}")


async def count_finished(deployment: Deployment) -> list[int]:
    """A counter (in a list) of the task.finished events from now on."""
    count = [0]

    async def on_event(event: Any) -> None:
        count[0] += 1

    if not deployment.client.is_connected:
        await deployment.client.connect()
    await deployment.client.subscribe_events(on_event, patterns=["task.finished"])
    return count
