"""The RabbitMQ bus's connection: robust, with a retried first connect.

``connect_robust`` reconnects by itself once it has connected, but its first
connect fails fast, so that one is retried here (tenacity). Which aio-pika
and aiormq exceptions mean "the link is down, try again" is said once, here,
for every part of the bus.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from yarl import URL

from .errors import BusConnectionError
from .settings import BusSettings

TRANSIENT = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ChannelInvalidStateError,
    RuntimeError,  # aio-pika: "Connection closed" / "channel closed" while reconnecting
)
"""Failures that a reconnect of the robust connection can cure."""

CHANNEL_GONE = (ChannelInvalidStateError, aiormq.exceptions.AMQPError, RuntimeError)
"""What settling or cancelling on a channel that died raises. The broker has
then requeued its deliveries by itself, and they come again."""


def amqp_url(settings: BusSettings, default: str) -> str:
    """The broker URL with our heartbeat and reconnect interval, unless it sets its own."""
    url = URL(settings.broker_url or default)
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=settings.amqp_heartbeat)
    if "reconnect_interval" not in url.query:
        url = url.update_query(reconnect_interval=settings.reconnect_interval)
    return str(url)


async def open_connection(
    url: str, settings: BusSettings, *, connection_name: str, address: str
) -> AbstractRobustConnection:
    """A robust connection, after ``connect_attempts`` tries at most.

    Raises ``BusConnectionError`` naming the broker by ``address`` (the URL
    without its password), and without the password that aio-pika may have
    put in its own message.
    """
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(settings.connect_attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception_type(TRANSIENT),
            reraise=True,
        ):
            with attempt:
                return await aio_pika.connect_robust(
                    url,
                    timeout=settings.connect_timeout,
                    client_properties={"connection_name": connection_name},
                )
    except Exception as exc:
        detail = str(exc)
        password = URL(url).password
        if password:
            detail = detail.replace(password, "***")
        raise BusConnectionError(
            f"cannot reach RabbitMQ at {address}: {type(exc).__name__}: {detail}"
        ) from None
    raise AssertionError("unreachable: tenacity either returns or reraises")
