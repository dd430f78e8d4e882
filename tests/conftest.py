"""Fixtures: every behaviour runs on the in-process bus and on the real broker.

The RabbitMQ runs take the broker from ORCHESTRATOR_BROKER_URL (default: the
local broker). Where none answers they skip, except in CI (CI=true), where a
missing broker fails the run. Every test gets its own topology prefix and
deletes its queues and exchanges afterwards.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from broker import BusSettings, default_broker_url
from tests.harness import Harness

BROKER_URL = default_broker_url()


def broker_reachable(url: str = BROKER_URL) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def require_broker() -> str:
    """The broker URL, or skip (fail in CI) when no broker answers."""
    if not broker_reachable():
        message = f"RabbitMQ is not reachable at {urlsplit(BROKER_URL).hostname}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: a missing broker is a failure)")
        pytest.skip(message)
    return BROKER_URL


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def bus_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        require_broker()
    return request.param


@pytest.fixture
def bus_settings(bus_kind: str, prefix: str) -> BusSettings:
    url = BROKER_URL if bus_kind == "rabbitmq" else None
    return BusSettings(broker_url=url, prefix=prefix, amqp_heartbeat=5, connect_attempts=1)


@pytest.fixture
async def harness(bus_kind: str, bus_settings: BusSettings):
    h = Harness(bus_kind, bus_settings)
    try:
        yield h
    finally:
        await h.close()
