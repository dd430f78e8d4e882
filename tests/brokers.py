"""Brokers (and PostgreSQL servers) for the tests: the shared one, a private node, a container.

A test that only needs *a* RabbitMQ gets, in this order:

1. **shared**: the broker at ``ORCHESTRATOR_BROKER_URL``, else ``127.0.0.1:5672``,
   each test under its own topology prefix. Set explicitly, that URL is the
   only one tried.
2. **private**: a RabbitMQ node of the test session's own, where ``rabbitmq-server``
   is installed: its own node name, AMQP and distribution ports, data folder,
   config and enabled-plugins file (none: it binds no management port), and
   its own Erlang cookie; stopped and its folder removed afterwards.
3. **container**: RabbitMQ in Docker through testcontainers, where a Docker
   daemon answers.

Fault tests (marked ``fault``: they restart, kill or reconfigure their broker)
never get the shared broker: a private node, else a container. So a fault test
cannot disturb another test, or another process on the machine.
``ORCHESTRATOR_TEST_BROKER=shared|private|container`` forces one source.

PostgreSQL the same way: ``ORCHESTRATOR_TEST_POSTGRES_URL`` (else
``postgresql://postgres@127.0.0.1:5432/postgres``), a private cluster where
``initdb`` is installed, a container; each test gets a database of its own.

Under ``CI=true`` a test whose broker cannot be had fails, never skips.

Nothing starts at import: a node starts when the first test asks for it.
Whatever was started is stopped at the end of the session, at interpreter exit
(``atexit``), and, if the test process was killed outright, by the next
session, which reaps folders whose owning process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest

from broker import default_broker_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RABBITMQ_IMAGE = "rabbitmq:3.10"
POSTGRES_IMAGE = "postgres:15"
BASE_PREFIX = "orchestrator-test-"
"""Every private node's folder is ``$TMPDIR/orchestrator-test-<kind>-<random>``."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Unavailable(Exception):
    """Raised when a source of brokers cannot give one here (the reason says why)."""


def skip_or_fail(message: str) -> None:
    """Skip the test; fail it under CI=true, where what it needs must be there."""
    if IN_CI:
        pytest.fail(message + " (CI=true: a test's broker that cannot be had is a failure)")
    pytest.skip(message)


def reachable(url: str, default_port: int, timeout: float = 2) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout
        ):
            return True
    except OSError:
        return False


_AVOID = {5432, 5671, 5672, 15672, 15692, 25672, 4369}
_taken: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (where outgoing
    connections take theirs), so a node that restarts finds it still free."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    for _ in range(200):
        port = random.randrange(10000, low)
        if port in _AVOID or port in _taken or 35672 <= port <= 35682:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise Unavailable("no free port below the ephemeral range")


# ----------------------------------------------------------------- cleanup


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_live: list[_Stoppable] = []


def stop_all() -> None:
    """Stop every node and container this process started and has not stopped."""
    while _live:
        item = _live.pop()
        with contextlib.suppress(Exception):
            item.stop()


atexit.register(stop_all)


def _new_base(kind: str) -> Path:
    reap_stale()
    base = Path(tempfile.mkdtemp(prefix=f"{BASE_PREFIX}{kind}-"))
    (base / "owner").write_text(str(os.getpid()))
    return base


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return "Z" not in line.split()[1]
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def reap_stale() -> list[Path]:
    """Remove the folders (and kill the servers) of private nodes whose test
    process is gone: what a test run killed outright left behind. A process is
    killed only if its command line names that folder."""
    reaped = []
    for base in Path(tempfile.gettempdir()).glob(BASE_PREFIX + "*"):
        try:
            owner = int((base / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        for pid_file in (base / "pid", base / "data" / "postmaster.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if str(base) in _cmdline(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


# ----------------------------------------------------------------- RabbitMQ nodes


class RabbitMQNode(Protocol):
    """A broker of the tests' own that they may restart, kill and reconfigure."""

    kind: str
    name: str
    port: int

    @property
    def url(self) -> str: ...
    def start(self) -> RabbitMQNode: ...
    def stop(self) -> None: ...
    def ctl(self, *args: str, timeout: float = 120) -> str: ...
    def restart_app(self) -> None: ...
    def kill(self) -> None: ...
    def start_again(self) -> None: ...
    def eval(self, expression: str) -> str: ...
    def get_env(self, key: str) -> str: ...
    def set_env(self, key: str, value: str) -> None: ...
    def restore_env(self) -> None: ...
    def ensure_running(self) -> None: ...


@dataclass
class NodeConfig:
    """What a private node is started with, beyond its name, ports and folders.

    ``conf`` becomes rabbitmq.conf lines (a TLS listener: ``listeners.ssl.default``
    and ``ssl_options.*``; cluster membership: ``cluster_formation.*``);
    ``advanced`` is advanced.config (Erlang terms); ``plugins`` the enabled plugins
    (a plugin that listens needs its own port in ``conf``, e.g. ``management.tcp.port``).
    """

    conf: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    advanced: str | None = None


def rabbitmq_bin() -> Path | None:
    """The folder of RabbitMQ's own scripts (Debian's /usr/sbin ones switch user)."""
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    return Path(found).resolve().parent if found else None


_COOKIE = secrets.token_hex(16).upper()
"""One Erlang cookie for this session's private nodes (so they could cluster),
not the machine's: no private node can talk to the shared one."""


class LocalNode:
    """A RabbitMQ node of its own, run from the installed rabbitmq-server."""

    kind = "private"

    def __init__(
        self, config: NodeConfig | None = None, *, label: str = "node", port: int | None = None
    ) -> None:
        bin_dir = rabbitmq_bin()
        if bin_dir is None:
            raise Unavailable("rabbitmq-server is not installed")
        self.bin = bin_dir
        self.config = config or NodeConfig()
        self.name = f"orchtest-{label}-{secrets.token_hex(4)}@localhost"
        self.port = port or free_port()
        self.dist_port = free_port()
        self.base = _new_base("rabbitmq")
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._saved_env: dict[str, str] = {}
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def __repr__(self) -> str:
        return f"<LocalNode {self.name} amqp:{self.port} dist:{self.dist_port} {self.base}>"

    # --- files and environment

    def _write_files(self) -> None:
        home = self.base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(_COOKIE)
        cookie.chmod(0o400)
        conf = {
            "listeners.tcp.default": f"127.0.0.1:{self.port}",
            "loopback_users.guest": "true",
            "disk_free_limit.absolute": "1MB",
            **self.config.conf,
        }
        (self.base / "rabbitmq.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in conf.items())
        )
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.config.plugins)}].\n")
        (self.base / "advanced.config").write_text(self.config.advanced or "[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # not the machine's

    def _env(self, *, server: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.base / "home"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
        )
        if server:
            env.update(
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(self.port),
                RABBITMQ_DIST_PORT=str(self.dist_port),
                RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
                RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(self.base / "log"),
                RABBITMQ_PID_FILE=str(self.base / "pid"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=("-kernel inet_dist_use_interface {127,0,0,1}"),
            )
        return env

    # --- life

    def start(self, timeout: float = 120) -> LocalNode:
        """Start the node (again, after ``kill``, on the same data) and wait until
        it serves AMQP."""
        began = time.monotonic()
        if self not in _live:
            _live.append(self)
        out = open(self.base / "server.out", "ab")
        try:
            self._process = subprocess.Popen(
                [str(self.bin / "rabbitmq-server")],
                env=self._env(server=True),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        # Its own log says when it is up (cheaper than rabbitmqctl await_startup,
        # which starts an Erlang VM of its own: a second and a half here).
        log = self.base / "log" / f"{self.name}.log"
        deadline = began + timeout
        while not (_log_says(log, "Server startup complete") and reachable(self.url, 0, 1)):
            if self._process.poll() is not None:
                raise Unavailable(f"{self.name} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{self.name} did not start within {timeout}s: {self.log_tail()}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the node and remove its folder; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        beam = self.beam_pid()
        if beam is not None and str(self.base) in _cmdline(beam):
            with contextlib.suppress(OSError):
                os.kill(beam, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        if self in _live:
            _live.remove(self)

    def beam_pid(self) -> int | None:
        """The Erlang VM's process id (the pid file; the started process is a
        shell wrapper that forwards signals)."""
        try:
            return int((self.base / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        texts = []
        for path in [self.base / "server.out", *sorted((self.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    # --- faults

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n <this node> ...``: its output; raises on failure."""
        done = subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", self.name, *args],
            env=self._env(server=False),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stderr}{done.stdout}"
            )
        return done.stdout

    def restart_app(self) -> None:
        """stop_app and start_app on this node: every connection drops, durable
        queues and persistent messages stay."""
        self.ctl("stop_app")
        self.ctl("start_app")  # returns once the app has booted

    def kill(self) -> None:
        """SIGKILL this node's Erlang VM (no goodbye to any client); its data stays."""
        beam = self.beam_pid()
        if beam is not None and str(self.base) in _cmdline(beam):
            os.kill(beam, signal.SIGKILL)
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
            _signal_group(process, signal.SIGKILL)  # what is left of its group
        (self.base / "pid").unlink(missing_ok=True)

    def start_again(self) -> None:
        """Start after ``kill``, on the same data folder."""
        self.start()

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).strip()

    def get_env(self, key: str) -> str:
        return _env_value(self.eval(f"application:get_env(rabbit, {key})."))

    def set_env(self, key: str, value: str) -> None:
        """``application:set_env(rabbit, key, value)`` on this node; ``restore_env``
        (run after every test by the fixtures) puts the first value back."""
        if key not in self._saved_env:
            self._saved_env[key] = self.get_env(key)
        self.eval(f"application:set_env(rabbit, {key}, {value}).")

    def restore_env(self) -> None:
        if not self._saved_env:
            return
        calls = [
            f"application:unset_env(rabbit, {key})"
            if value == "undefined"
            else f"application:set_env(rabbit, {key}, {value})"
            for key, value in self._saved_env.items()
        ]
        self.eval(", ".join(calls) + ".")  # one rabbitmqctl: each costs a VM start
        self._saved_env.clear()

    def ensure_running(self) -> None:
        """Bring the node back as the next test expects it: VM up, app started
        (its AMQP listener closes with stop_app, so a listening port says both)."""
        if not self.running:
            self.start()
        elif not reachable(self.url, 0, 1):
            self.ctl("start_app")

    def identity(self) -> NodeIdentity:
        return parse_identity(self.eval(IDENTITY_EXPR))


def _log_says(log: Path, text: str) -> bool:
    """Whether the log's last boot (after a kill the file goes on) says ``text``."""
    try:
        content = log.read_text(errors="replace")
    except OSError:
        return False
    start = content.rfind("Logging: configured log handlers are now ACTIVE")
    return text in (content[start:] if start >= 0 else content)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _env_value(out: str) -> str:
    match = re.fullmatch(r"\{ok,(.+)\}", out.strip(), re.DOTALL)
    return match.group(1) if match else "undefined"


def _quiet_import(*modules: str) -> Any:
    """The first of these modules that imports (testcontainers moves its modules
    under ``community``), without their DeprecationWarnings."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in modules[:-1]:
            with contextlib.suppress(ImportError):
                return importlib.import_module(module)
        return importlib.import_module(modules[-1])


def docker_unavailable_reason() -> str | None:
    """Why testcontainers cannot run here, or None when a Docker daemon answers."""
    try:
        docker = _quiet_import("docker")
        _quiet_import("testcontainers.core.container")
    except ImportError:
        return "testcontainers is not installed (pip install -e '.[test]')"
    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker daemon answers ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def _start_container(node: Any) -> None:
    """Start ``node``'s testcontainers container; whatever did start is
    removed (``node.stop()``) if it fails, and it is ``Unavailable``."""
    _live.append(node)
    node._started = True  # so that stop() removes whatever did start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node._container.start()
    except Exception as exc:
        node.stop()
        raise Unavailable(f"the container did not start: {exc}") from exc


class ContainerNode:
    """RabbitMQ in a Docker container (testcontainers), on a fixed host port so its
    URL survives a kill and a start."""

    kind = "container"

    def __init__(self, *, port: int | None = None, image: str = RABBITMQ_IMAGE) -> None:
        reason = docker_unavailable_reason()
        if reason:
            raise Unavailable(reason)
        module = _quiet_import("testcontainers.community.rabbitmq", "testcontainers.rabbitmq")
        self.port = port or free_port()
        self.name = f"container:{image}"
        self.startup_seconds: float | None = None
        self._container = module.RabbitMqContainer(image).with_bind_ports(5672, self.port)
        self._saved_env: dict[str, str] = {}
        self._started = False

    @property
    def url(self) -> str:
        host = self._container.get_container_host_ip() if self._started else "127.0.0.1"
        return f"amqp://guest:guest@{host}:{self.port}/"

    def start(self) -> ContainerNode:
        began = time.monotonic()
        _start_container(self)
        self.name = self.eval("node().")
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._container.stop()
        if self in _live:
            _live.remove(self)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        code, out = self._container.exec(["rabbitmqctl", *args])
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} in the container: {text}")
        return text

    def restart_app(self) -> None:
        self.ctl("stop_app")
        self.ctl("start_app")
        self.ctl("await_startup")

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def start_again(self) -> None:
        wrapped = self._container.get_wrapped_container()
        wrapped.start()
        deadline = time.monotonic() + 120
        while not reachable(self.url, self.port, timeout=1):
            if time.monotonic() > deadline:
                raise Unavailable("the RabbitMQ container did not come back")
            time.sleep(0.3)
        self.ctl("await_startup")

    @property
    def running(self) -> bool:
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status == "running"

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression).strip()

    get_env = LocalNode.get_env
    set_env = LocalNode.set_env
    restore_env = LocalNode.restore_env
    identity = LocalNode.identity

    def ensure_running(self) -> None:
        if not self.running:
            self.start_again()
        elif not reachable(self.url, 0, 1):
            self.ctl("start_app")


def forced_source() -> str:
    source = os.environ.get("ORCHESTRATOR_TEST_BROKER", "auto").lower()
    if source not in ("auto", "shared", "private", "container"):
        raise pytest.UsageError(
            f"ORCHESTRATOR_TEST_BROKER={source}: expected shared, private or container"
        )
    return source


def new_node(
    config: NodeConfig | None = None, *, port: int | None = None, label: str = "node"
) -> RabbitMQNode:
    """A started broker of the caller's own: a private node where rabbitmq-server
    is installed, else a container (ORCHESTRATOR_TEST_BROKER=private or container
    allows only that one); raises Unavailable with every reason."""
    reasons = []
    source = forced_source()
    if source != "container":
        try:
            node = LocalNode(config, label=label, port=port)
        except Unavailable as exc:
            reasons.append(f"private node: {exc}")
        else:
            try:
                return node.start()
            except BaseException as exc:
                node.stop()
                if not isinstance(exc, Unavailable):
                    raise
                reasons.append(f"private node: {exc}")
    if source != "private":
        if config and (config.conf or config.plugins or config.advanced):
            reasons.append("container: a node config is for private nodes only")
        else:
            try:
                return ContainerNode(port=port).start()
            except Unavailable as exc:
                reasons.append(f"container: {exc}")
    raise Unavailable("; ".join(reasons))


# ----------------------------------------------------------------- the session's brokers


class Brokers:
    """The brokers of one test session, each started on first use."""

    def __init__(self) -> None:
        self.source = forced_source()
        self.explicit = "ORCHESTRATOR_BROKER_URL" in os.environ
        self.shared_url = default_broker_url()
        if self.source == "shared" or (self.source == "auto" and self.explicit):
            self.use_shared = True
        elif self.source == "auto":
            self.use_shared = reachable(self.shared_url, 5672)
        else:
            self.use_shared = False
        self._reserved_port = None if self.use_shared else free_port()
        self._default: RabbitMQNode | None = None
        self._fault: RabbitMQNode | None = None
        self._failed: dict[str, str] = {}

    @property
    def url(self) -> str:
        """The URL of the tests' ordinary broker, known before it starts: the
        shared one, else a port reserved for the node or container."""
        if self.use_shared:
            return self.shared_url
        return f"amqp://guest:guest@127.0.0.1:{self._reserved_port}/"

    def require(self) -> str:
        """The ordinary broker's URL, started if it is ours; else skip (fail in CI)."""
        if self.use_shared:
            if not reachable(self.shared_url, 5672):
                host = urlsplit(self.shared_url).hostname
                skip_or_fail(f"RabbitMQ is not reachable at {host}")
            return self.shared_url
        if self._default is None:
            self._default = self._get("default", port=self._reserved_port, label="session")
        return self._default.url

    def fault_node(self) -> RabbitMQNode:
        """The session's broker for fault tests: never the shared one."""
        if self._fault is None:
            self._fault = self._get("fault", label="faults")
        return self._fault

    def _get(self, role: str, **kwargs: Any) -> RabbitMQNode:
        if role in self._failed:
            skip_or_fail(self._failed[role])
        try:
            return new_node(**kwargs)
        except Unavailable as exc:
            self._failed[role] = f"no broker of the tests' own can be had: {exc}"
            skip_or_fail(self._failed[role])
            raise

    def stop(self) -> None:
        for node in (self._default, self._fault):
            if node is not None:
                node.stop()
        self._default = self._fault = None


# ----------------------------------------------------------------- is the shared node untouched?


IDENTITY_EXPR = (
    'lists:flatten(io_lib:format("~s ~s ~b ~w", ['
    "os:getpid(), "
    'case application_controller:get_master(rabbit) of undefined -> "stopped"; '
    "M -> pid_to_list(M) end, "
    "element(1, erlang:statistics(wall_clock)), "
    "[P || {listener, N, amqp, _, _, P, _} <- rabbit_networking:active_listeners(), "
    "N =:= node()]]))."
)


@dataclass(frozen=True)
class NodeIdentity:
    """Which running broker this is. ``rabbit`` (the rabbit application's master
    process) changes on stop_app/start_app, which leave the VM's uptime running;
    ``os_pid`` and ``uptime_ms`` change when the VM restarts."""

    os_pid: int
    rabbit: str
    uptime_ms: int
    amqp_ports: tuple[int, ...]
    read_at: float = field(default_factory=time.monotonic, compare=False)


def parse_identity(out: str) -> NodeIdentity:
    match = re.search(r"(\d+) (\S+) (\d+) \[([\d,]*)\]", out)
    if not match:
        raise RuntimeError(f"unexpected node identity: {out!r}")
    ports = tuple(int(p) for p in match.group(4).split(",") if p)
    return NodeIdentity(int(match.group(1)), match.group(2), int(match.group(3)), ports)


def same_node_since(before: NodeIdentity, after: NodeIdentity) -> list[str]:
    """What shows the broker restarted between two readings (empty: it did not)."""
    changes = []
    if after.os_pid != before.os_pid:
        changes.append(f"its VM is another process ({before.os_pid} -> {after.os_pid})")
    if after.rabbit != before.rabbit:
        changes.append(f"its rabbit application was restarted ({before.rabbit} -> {after.rabbit})")
    elapsed_ms = (after.read_at - before.read_at) * 1000
    if after.uptime_ms < before.uptime_ms + elapsed_ms - 5000:
        changes.append(
            f"its uptime went from {before.uptime_ms} ms to {after.uptime_ms} ms"
            f" over {elapsed_ms:.0f} ms"
        )
    return changes


def shared_node_identity(url: str) -> NodeIdentity:
    """The shared broker's identity through the machine's ``rabbitmqctl`` (its
    default node, as the machine configures it), checked to be the node behind
    ``url``. Raises Unavailable where it cannot be read."""
    parts = urlsplit(url)
    if (parts.hostname or "127.0.0.1") not in LOOPBACK:
        raise Unavailable(f"the shared broker is not on this machine ({parts.hostname})")
    if shutil.which("rabbitmqctl") is None:
        raise Unavailable("rabbitmqctl is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
    try:
        done = subprocess.run(
            ["rabbitmqctl", "eval", IDENTITY_EXPR],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        raise Unavailable("rabbitmqctl eval on the shared node timed out") from exc
    if done.returncode != 0:
        raise Unavailable(f"rabbitmqctl cannot reach the shared node: {done.stderr[:300]}")
    identity = parse_identity(done.stdout)
    if (parts.port or 5672) not in identity.amqp_ports:
        raise Unavailable(
            f"rabbitmqctl's default node listens on {identity.amqp_ports}, not {parts.port or 5672}"
        )
    return identity


# ----------------------------------------------------------------- PostgreSQL


SHARED_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class PostgresServer(Protocol):
    kind: str

    def url(self, database: str) -> str: ...
    def admin(self, sql: str) -> str: ...
    def stop(self) -> None: ...


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return parts._replace(path="/" + database).geturl()


def _psql(url: str, sql: str, **kwargs: Any) -> str:
    psql = shutil.which("psql")
    if psql is None:
        raise Unavailable("psql is not installed")
    done = subprocess.run(
        [psql, url, "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {done.stderr}")
    return done.stdout.strip()


class SharedPostgres:
    kind = "shared"

    def __init__(self, url: str) -> None:
        self.admin_url = url

    def url(self, database: str) -> str:
        return _with_database(self.admin_url, database)

    def admin(self, sql: str) -> str:
        return _psql(self.admin_url, sql)

    def stop(self) -> None:
        pass


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


class LocalPostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary folder), on its own
    port, trust authentication on loopback; run as ``postgres`` when we are root."""

    kind = "private"

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise Unavailable("PostgreSQL (initdb) is not installed")
        self.bin = bin_dir
        self.port = free_port()
        self.base = _new_base("postgres")
        self.startup_seconds: float | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam("postgres")
            except KeyError as exc:
                shutil.rmtree(self.base, ignore_errors=True)
                raise Unavailable("running as root and there is no postgres user") from exc
            self._user = "postgres"
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.data = self.base / "data"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*args], capture_output=True, text=True, timeout=120, user=self._user, cwd=self.base
        )
        if done.returncode != 0:
            raise Unavailable(f"{Path(args[0]).name} failed: {done.stderr[-800:]}")

    def start(self) -> LocalPostgres:
        began = time.monotonic()
        _live.append(self)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = f"-F -p {self.port} -c listen_addresses=127.0.0.1 -k {self.base}"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.startup_seconds = time.monotonic() - began
        return self

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return _with_database(self.admin_url, database)

    def admin(self, sql: str) -> str:
        return _psql(self.admin_url, sql)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(Unavailable, subprocess.TimeoutExpired):
                self._run(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                )
            if _alive(pid) and str(self.base) in _cmdline(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        if self in _live:
            _live.remove(self)


class ContainerPostgres:
    kind = "container"

    def __init__(self, image: str = POSTGRES_IMAGE) -> None:
        reason = docker_unavailable_reason()
        if reason:
            raise Unavailable(reason)
        module = _quiet_import("testcontainers.community.postgres", "testcontainers.postgres")
        self._container = module.PostgresContainer(image, driver=None)
        self.startup_seconds: float | None = None
        self._started = False

    def start(self) -> ContainerPostgres:
        began = time.monotonic()
        _start_container(self)
        self.startup_seconds = time.monotonic() - began
        return self

    @property
    def admin_url(self) -> str:
        return self._container.get_connection_url(driver=None)

    def url(self, database: str) -> str:
        return _with_database(self.admin_url, database)

    def admin(self, sql: str) -> str:
        c = self._container
        code, out = c.exec(["psql", "-U", c.username, "-d", c.dbname, "-X", "-Atc", sql])
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        if code != 0:
            raise RuntimeError(f"psql {sql!r} in the container: {text}")
        return text.strip()

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._container.stop()
        if self in _live:
            _live.remove(self)


def new_postgres() -> PostgresServer:
    """A started PostgreSQL of the caller's own: private cluster, else container."""
    reasons = []
    try:
        return LocalPostgres().start()
    except Unavailable as exc:
        reasons.append(f"private cluster: {exc}")
    try:
        return ContainerPostgres().start()
    except Unavailable as exc:
        reasons.append(f"container: {exc}")
    raise Unavailable("; ".join(reasons))


class PostgresServers:
    """The session's PostgreSQL: the shared one, else one of its own, on first use."""

    def __init__(self) -> None:
        self.explicit = "ORCHESTRATOR_TEST_POSTGRES_URL" in os.environ
        self.shared_url = os.environ.get("ORCHESTRATOR_TEST_POSTGRES_URL", SHARED_POSTGRES_URL)
        self._server: PostgresServer | None = None
        self._failed: str | None = None

    def server(self) -> PostgresServer:
        if self._server is not None:
            return self._server
        if self._failed:
            skip_or_fail(self._failed)
        if self.explicit or reachable(self.shared_url, 5432):
            if not reachable(self.shared_url, 5432):
                skip_or_fail(f"PostgreSQL is not reachable at {urlsplit(self.shared_url).hostname}")
            self._server = SharedPostgres(self.shared_url)
            return self._server
        try:
            self._server = new_postgres()
        except Unavailable as exc:
            self._failed = f"no PostgreSQL can be had: {exc}"
            skip_or_fail(self._failed)
            raise
        return self._server

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A database of the test's own on the session's server, dropped afterwards."""
        server = self.server()
        name = f"test_{secrets.token_hex(5)}"
        try:
            server.admin(f"CREATE DATABASE {name}")
        except Unavailable as exc:
            skip_or_fail(f"cannot create a database on the {server.kind} PostgreSQL: {exc}")
        try:
            yield server.url(name)
        finally:
            server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
