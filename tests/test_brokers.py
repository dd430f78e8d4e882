"""The test brokers themselves (tests/brokers.py): private nodes, containers,
PostgreSQL, the CI rule, and that fault tests leave the shared broker alone."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time

import aio_pika
import pytest

from tests import brokers, conftest
from tests.brokers import LocalNode, LocalPostgres, NodeConfig, RabbitMQNode


async def round_trip(url: str, body: bytes = b"ping") -> bytes:
    """Publish to a queue of our own and get the message back."""
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"round-trip-{secrets.token_hex(4)}", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        message = await queue.get(timeout=10)
        await message.ack()
        return message.body


def require_private_nodes() -> None:
    if brokers.rabbitmq_bin() is None:
        brokers.skip_or_fail("rabbitmq-server is not installed: no private node")


def epmd_names() -> str:
    try:
        return subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ----------------------------------------------------------------- private RabbitMQ nodes


async def test_a_private_node_serves_a_round_trip_and_leaves_nothing_behind() -> None:
    require_private_nodes()
    # Given a private node started with a config of its own
    node = LocalNode(NodeConfig(conf={"consumer_timeout": 1234567}), label="selftest")
    try:
        node.start()
        beam = node.beam_pid()
        assert beam is not None and brokers._alive(beam)
        print(f"\nprivate node {node.name} started in {node.startup_seconds:.1f}s")

        # Then it is its own node: name, ports, data folder, config
        assert not node.name.startswith("rabbit@")
        assert node.port != 5672 and node.dist_port not in (25672, node.port)
        assert node.base.is_dir() and str(node.base) in brokers._cmdline(beam)
        assert node.get_env("consumer_timeout") == "1234567"
        assert node.identity().amqp_ports == (node.port,)
        assert node.name.split("@")[0] in epmd_names()

        # and it serves a round trip
        assert await round_trip(node.url) == b"ping"
    finally:
        node.stop()

    # When it has stopped: no process, no data folder, no port, no name in epmd
    assert not brokers._alive(beam)
    assert not node.base.exists()
    assert not brokers.reachable(node.url, node.port, timeout=1)
    assert node.name.split("@")[0] not in epmd_names()
    assert node not in brokers._live


@pytest.mark.fault
async def test_fault_helpers_act_on_the_private_node_alone(
    private_rabbitmq: RabbitMQNode,
) -> None:
    node = private_rabbitmq
    ORIGINAL_ENV["consumer_timeout"] = node.get_env("consumer_timeout")
    before = node.identity()

    # When its application restarts: the VM's uptime runs on, the rabbit
    # application is another: what tells a restart of the shared node
    node.restart_app()
    after_app = node.identity()
    changes = brokers.same_node_since(before, after_app)
    assert after_app.os_pid == before.os_pid and after_app.uptime_ms > before.uptime_ms
    assert len(changes) == 1 and "rabbit application was restarted" in changes[0]

    # When it is SIGKILLed and started again on its data folder
    queue_name = f"survives-{secrets.token_hex(4)}"
    connection = await aio_pika.connect(node.url, timeout=15)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
    url = node.url
    # Mnesia writes its log behind: a kill right after a declare can lose the
    # queue (it did, on a loaded machine), so the test has it written first.
    node.eval("mnesia:sync_log().")
    node.kill()
    assert not brokers.reachable(url, 0, timeout=1)
    node.start_again()

    # Then it is another VM, at the same URL, with its durable queue and message
    after_kill = node.identity()
    assert after_kill.os_pid != after_app.os_pid
    assert any("VM is another process" in c for c in brokers.same_node_since(before, after_kill))
    assert node.url == url
    connection = await aio_pika.connect(node.url, timeout=15)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=10)
        assert message.body == b"kept"
        await message.ack()
        await queue.delete()

    # and set_env reaches that node (the fixture puts it back afterwards)
    node.set_env("consumer_timeout", "4321")
    assert node.get_env("consumer_timeout") == "4321"
    # (that the shared broker saw none of it, the last test checks for every fault test)


ORIGINAL_ENV: dict[str, str] = {}


def test_set_env_is_put_back_after_a_fault_test(private_rabbitmq: RabbitMQNode) -> None:
    # (the previous test left consumer_timeout at 4321)
    if not ORIGINAL_ENV:
        pytest.skip("runs after test_fault_helpers_act_on_the_private_node_alone")
    assert private_rabbitmq.get_env("consumer_timeout") == ORIGINAL_ENV["consumer_timeout"]


def test_folders_left_by_a_killed_test_run_are_reaped() -> None:
    # Given a private node's folder whose test process (this one) lives
    mine = brokers._new_base("rabbitmq")
    # and one whose test process is gone, its server running
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    base = brokers._new_base("rabbitmq")
    (base / "owner").write_text(str(dead.pid))
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", str(base)], start_new_session=True
    )
    (base / "pid").write_text(str(server.pid))
    while str(base) not in brokers._cmdline(server.pid):  # until it has exec'd
        time.sleep(0.01)
    try:
        # When the next node is made (it reaps first)
        reaped = brokers.reap_stale()

        # Then the orphan's server is killed and its folder gone; ours stays
        assert base in reaped and not base.exists()
        assert server.wait(timeout=10) == -9
        assert mine.exists()
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------- containers


def require_docker() -> None:
    """Skip, even under CI=true: these machines have no Docker daemon to give."""
    reason = brokers.docker_unavailable_reason()
    if reason:
        pytest.skip(f"testcontainers path not exercised: {reason}")


async def test_a_rabbitmq_container_serves_a_round_trip_and_is_removed() -> None:
    require_docker()
    node = brokers.ContainerNode()
    try:
        node.start()
        print(f"\nRabbitMQ container started in {node.startup_seconds:.1f}s")
        assert await round_trip(node.url) == b"ping"
        before = node.identity()
        node.restart_app()
        assert brokers.same_node_since(before, node.identity())
        assert await round_trip(node.url) == b"ping"
        container_id = node._container.get_wrapped_container().id
    finally:
        node.stop()
    client = brokers._quiet_import("docker").from_env()
    assert container_id not in {c.id for c in client.containers.list(all=True)}


def test_a_postgres_container_answers_and_is_removed() -> None:
    require_docker()
    server = brokers.ContainerPostgres()
    try:
        server.start()
        assert server.admin("SELECT 40 + 2") == "42"
        container_id = server._container.get_wrapped_container().id
    finally:
        server.stop()
    client = brokers._quiet_import("docker").from_env()
    assert container_id not in {c.id for c in client.containers.list(all=True)}


def test_docker_detection_says_why_when_no_daemon_answers(monkeypatch) -> None:
    # Given DOCKER_HOST naming a socket where no daemon listens
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    started = time.monotonic()
    reason = brokers.docker_unavailable_reason()
    # Then it says so, quickly
    assert reason is not None and ("Docker" in reason or "testcontainers" in reason)
    assert time.monotonic() - started < 10


# ----------------------------------------------------------------- PostgreSQL


def test_a_private_postgres_answers_and_leaves_nothing_behind() -> None:
    if brokers.postgres_bin() is None:
        brokers.skip_or_fail("PostgreSQL (initdb) is not installed: no private cluster")
    server = LocalPostgres()
    try:
        server.start()
        print(f"\nprivate PostgreSQL started in {server.startup_seconds:.1f}s")
        pid = server.postmaster_pid()
        assert pid is not None and brokers._alive(pid)
        assert server.port != 5432
        assert server.admin("SELECT 40 + 2") == "42"
    finally:
        server.stop()
    assert not brokers._alive(pid)
    assert not server.base.exists()


def test_each_test_gets_a_postgres_database_of_its_own(postgres_url: str) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    assert name.startswith("test_")
    out = brokers._psql(
        postgres_url,
        "CREATE TABLE t (v int); INSERT INTO t VALUES (7); SELECT current_database(), sum(v) FROM t",
    )
    assert out.splitlines()[-1] == f"{name}|7"


def test_a_test_database_is_dropped_afterwards() -> None:
    with conftest.POSTGRES.database() as url:
        name = url.rsplit("/", 1)[1]
        server = conftest.POSTGRES.server()
        assert server.admin(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "1"
    assert server.admin(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0"


# ----------------------------------------------------------------- where none can be had


def test_ci_fails_a_test_whose_broker_cannot_be_had(monkeypatch) -> None:
    # Given no shared broker, no rabbitmq-server and no Docker
    monkeypatch.delenv("ORCHESTRATOR_BROKER_URL", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_TEST_BROKER", raising=False)
    monkeypatch.setattr(brokers, "default_broker_url", lambda: "amqp://guest:guest@127.0.0.1:9/")
    monkeypatch.setattr(brokers, "rabbitmq_bin", lambda: None)
    monkeypatch.setattr(brokers, "docker_unavailable_reason", lambda: "no Docker daemon (test)")

    for in_ci, outcome in ((False, pytest.skip.Exception), (True, pytest.fail.Exception)):
        monkeypatch.setattr(brokers, "IN_CI", in_ci)
        session = brokers.Brokers()
        assert not session.use_shared
        # When a test asks for a broker, or a fault test for its node
        with pytest.raises(outcome) as raised:
            session.require()
        # Then it skips on a laptop and fails under CI=true, saying why
        assert "rabbitmq-server is not installed" in str(raised.value)
        assert "no Docker daemon (test)" in str(raised.value)
        with pytest.raises(outcome):
            session.fault_node()


def test_an_explicit_broker_url_is_the_only_one_tried(monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", "amqp://guest:guest@127.0.0.1:9/")
    monkeypatch.delenv("ORCHESTRATOR_TEST_BROKER", raising=False)
    monkeypatch.setattr(
        brokers, "default_broker_url", lambda: os.environ["ORCHESTRATOR_BROKER_URL"]
    )
    monkeypatch.setattr(brokers, "IN_CI", True)
    session = brokers.Brokers()
    assert session.use_shared and session.url.endswith(":9/")
    with pytest.raises(pytest.fail.Exception, match="not reachable"):
        session.require()


# ----------------------------------------------------------------- the shared broker


@pytest.mark.after_fault_tests
def test_the_fault_tests_left_the_shared_broker_running() -> None:
    """Runs last; compares the shared broker's identity read before any test ran."""
    if not conftest.BROKERS.use_shared:
        pytest.skip("no shared broker in this run: nothing to protect")
    if not conftest.FAULT_TESTS_RUN:
        pytest.skip("no fault test ran in this session: nothing to compare across")
    before = conftest.SHARED_BEFORE[0] if conftest.SHARED_BEFORE else "not read"
    if isinstance(before, str):
        brokers.skip_or_fail(f"the shared broker's identity cannot be read: {before}")
        return
    after = brokers.shared_node_identity(conftest.BROKERS.shared_url)
    changes = brokers.same_node_since(before, after)
    assert changes == [], (
        f"the shared broker restarted while {len(conftest.FAULT_TESTS_RUN)} fault tests ran "
        f"({', '.join(conftest.FAULT_TESTS_RUN)}): {'; '.join(changes)}"
    )
    print(
        f"\nshared broker unchanged across {len(conftest.FAULT_TESTS_RUN)} fault tests: "
        f"same VM (pid {after.os_pid}, up {after.uptime_ms // 1000}s), "
        f"same rabbit application {after.rabbit}"
    )
