"""How a command talks to the broker: a client that declares nothing, requests
whose refusal is a ``CliError``, and a graceful stop on a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

from broker import BusSettings, RabbitMQBus, WireMessage

from .errors import EXIT_BAD_INPUT, EXIT_UNREACHABLE, CliError


def client(settings: BusSettings) -> RabbitMQBus:
    """A connection that only sends requests: it declares nothing on the broker."""
    return RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:cli", declare_topology=False
    )


@contextlib.asynccontextmanager
async def connected(bus: RabbitMQBus) -> AsyncIterator[RabbitMQBus]:
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def call(bus: RabbitMQBus, request: WireMessage, timeout: float) -> Any:
    """The result of a request to the orchestrator; ``CliError`` when it refuses."""
    reply = await bus.request(request, timeout=timeout)
    if reply.ok:
        return reply.result
    assert reply.error is not None
    code = EXIT_UNREACHABLE if reply.error.type == "unavailable" else EXIT_BAD_INPUT
    raise CliError(reply.error.message, code)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: a graceful stop instead of a traceback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
