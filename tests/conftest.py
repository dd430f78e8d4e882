"""Fixtures: every behaviour runs on the in-process bus and on the real broker.

The RabbitMQ runs take their broker from tests/brokers.py: the shared one
(ORCHESTRATOR_BROKER_URL, else the local broker), else a private node of the
session's own, else a container. Where none can be had they skip, except in CI
(CI=true), where a missing broker fails the run. Every test gets its own
topology prefix and deletes its queues and exchanges afterwards.

Tests marked ``fault`` restart, kill or reconfigure their broker: their
RabbitMQ runs get a private node (``private_rabbitmq``), never the shared
broker, and a test run after them checks that the shared broker was not
restarted meanwhile.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from broker import BusSettings
from tests import brokers
from tests.brokers import NodeConfig, RabbitMQNode
from tests.harness import Harness

BROKERS = brokers.Brokers()
"""The session's brokers; nothing is started until a test asks."""
POSTGRES = brokers.PostgresServers()
BROKER_URL = BROKERS.url
"""The ordinary RabbitMQ tests' broker; ``require_broker()`` makes sure it is up."""


def broker_reachable(url: str = BROKER_URL) -> bool:
    return brokers.reachable(url, 5672)


def require_broker() -> str:
    """The broker URL (started, if it is one of the tests' own), or skip (fail
    in CI) when no broker can be had."""
    return BROKERS.require()


# ----------------------------------------------------------------- markers and order


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault: restarts, kills or reconfigures its broker; gets a private node, never the shared one",
    )
    config.addinivalue_line(
        "markers", "after_fault_tests: runs after every other test (it checks what they left)"
    )


SHARED_BEFORE: list[brokers.NodeIdentity | str] = []
"""The shared broker's identity read before any test ran (or why it could not be)."""
FAULT_TESTS_RUN: list[str] = []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.get_closest_marker("after_fault_tests")]
    if not last:
        return
    items[:] = [item for item in items if item not in last] + last
    if any(item.get_closest_marker("fault") for item in items) and BROKERS.use_shared:
        try:
            SHARED_BEFORE.append(brokers.shared_node_identity(BROKERS.shared_url))
        except brokers.Unavailable as exc:
            SHARED_BEFORE.append(str(exc))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "fault" in report.keywords:
        FAULT_TESTS_RUN.append(report.nodeid)


def _controls_workers(config: pytest.Config) -> bool:
    """This process hands the tests to pytest-xdist workers and runs none itself."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


def pytest_sessionstart(session: pytest.Session) -> None:
    # Under pytest-xdist the test above runs in one worker and sees only that
    # worker's fault tests; the controller, which hears every test's report,
    # checks the whole run at its end (``pytest_sessionfinish``).
    if _controls_workers(session.config) and BROKERS.use_shared:
        try:
            SHARED_BEFORE.append(brokers.shared_node_identity(BROKERS.shared_url))
        except brokers.Unavailable as exc:
            SHARED_BEFORE.append(str(exc))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _controls_workers(session.config) and FAULT_TESTS_RUN and SHARED_BEFORE:
        before = SHARED_BEFORE[0]
        if not isinstance(before, str):
            changes = brokers.same_node_since(
                before, brokers.shared_node_identity(BROKERS.shared_url)
            )
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            line = (
                f"the shared broker restarted while {len(FAULT_TESTS_RUN)} fault tests ran:"
                f" {'; '.join(changes)}"
                if changes
                else f"shared broker unchanged across {len(FAULT_TESTS_RUN)} fault tests"
            )
            if reporter is not None:
                reporter.ensure_newline()
                reporter.write_line(line, red=bool(changes))
            if changes:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
    BROKERS.stop()
    POSTGRES.stop()
    brokers.stop_all()


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def private_rabbitmq() -> Iterator[RabbitMQNode]:
    """The session's private node for fault tests (started on first use), running;
    after the test its settings are put back and it is running again."""
    node = BROKERS.fault_node()
    node.ensure_running()
    try:
        yield node
    finally:
        node.ensure_running()
        node.restore_env()


@pytest.fixture
def rabbitmq_node_factory() -> Iterator[object]:
    """``factory(NodeConfig(...))``: a new private node (TLS listener, cluster
    membership, plugins...) of this test's own, stopped and removed afterwards."""
    started: list[RabbitMQNode] = []

    def factory(config: NodeConfig | None = None) -> RabbitMQNode:
        try:
            node = brokers.new_node(config, label="own")
        except brokers.Unavailable as exc:
            brokers.skip_or_fail(f"no private RabbitMQ node can be had: {exc}")
            raise
        started.append(node)
        return node

    try:
        yield factory
    finally:
        for node in started:
            node.stop()


@pytest.fixture
def own_rabbitmq(rabbitmq_node_factory) -> RabbitMQNode:
    """A private node of this test's own (seconds to start: prefer ``private_rabbitmq``)."""
    return rabbitmq_node_factory()


@pytest.fixture
def broker_url(request: pytest.FixtureRequest) -> str:
    """The RabbitMQ of this test: a private node for fault tests, else the shared one."""
    if request.node.get_closest_marker("fault"):
        return request.getfixturevalue("private_rabbitmq").url
    return require_broker()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own (shared server, else a private
    cluster, else a container), dropped afterwards."""
    with POSTGRES.database() as url:
        yield url


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def bus_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        request.getfixturevalue("broker_url")
    return request.param


@pytest.fixture
def bus_settings(bus_kind: str, prefix: str, request: pytest.FixtureRequest) -> BusSettings:
    url = request.getfixturevalue("broker_url") if bus_kind == "rabbitmq" else None
    return BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)


@pytest.fixture
async def harness(bus_kind: str, bus_settings: BusSettings):
    h = Harness(bus_kind, bus_settings)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def deployment(prefix: str, broker_url: str):
    """Processes of the command line (``serve``, agents, clients) on the test's
    broker (``broker_url``) under its prefix, stopped and their topology deleted after."""
    from tests.deployment import Deployment  # (it imports this module)

    d = Deployment(prefix, broker_url)
    try:
        yield d
    finally:
        await d.close()
