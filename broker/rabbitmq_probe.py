"""Questions the RabbitMQ bus asks the broker on throwaway channels.

A refused or missing declare makes RabbitMQ close the channel it was made
on; asked on the bus's own (robust) channels, it would close them and they
would reopen themselves, losing their consumers' state meanwhile. So each
question gets a channel of its own (``throwaway_channel``): what this
connection may declare (the shared topology, or only its own queues), how
many tasks wait in a queue, and whether an agent's exclusive control queue
still exists (its connection lives).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from .declarations import Declarations
from .errors import BusConnectionError
from .rabbitmq_consume import close_for_good
from .rabbitmq_declare import Declarer, PermissionRefused
from .rabbitmq_link import CHANNEL_GONE

log = logging.getLogger(__name__)

DeclareMode = Literal["all", "own", "none"]


async def declare_mode(
    connection: AbstractRobustConnection,
    fixed: Declarations,
    mode: DeclareMode | None,
    address: str,
) -> DeclareMode:
    """What this connection declares (``mode``, or when None, "all" if the
    broker user may declare the ``fixed`` topology, else "own"); for "own",
    the fixed topology is checked to exist."""
    if mode is None:
        try:
            await _on_probe(connection, address, lambda d: d.declare(fixed))
            return "all"
        except PermissionRefused as exc:
            log.info(
                "declaring only this connection's own queues: the broker user may not"
                " declare the shared topology (%s)",
                exc,
            )
            mode = "own"
    if mode == "own":
        await _on_probe(connection, address, lambda d: d.check(fixed))
    return mode


@contextlib.asynccontextmanager
async def throwaway_channel(connection: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    """A channel for one question or one deletion, closed for good afterwards
    (a reconnect does not bring it back)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        yield channel
    finally:
        await close_for_good(channel, "a throwaway channel")


async def _on_probe(
    connection: AbstractRobustConnection,
    address: str,
    use: Callable[[Declarer], Awaitable[None]],
) -> None:
    async with throwaway_channel(connection) as channel:
        await use(Declarer(channel, address))


async def queue_depth(connection: AbstractRobustConnection, queue: str) -> int:
    """How many messages wait in ``queue`` (0 if it does not exist)."""
    async with throwaway_channel(connection) as channel:
        try:
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(queue, passive=True)
            return declared.message_count or 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        except CHANNEL_GONE as exc:
            raise BusConnectionError(f"cannot read the depth of {queue!r}: {exc}") from None


async def control_queue_lives(
    connection: AbstractRobustConnection, queue: str, agent_id: str
) -> bool:
    """Whether an agent's exclusive control queue exists: it goes with the
    agent's connection, so a False means that connection ended."""
    transport = connection.transport
    what = f"cannot ask the broker about agent {agent_id!r}"
    if transport is None or not connection.connected.is_set():
        raise BusConnectionError(f"{what}: the link is down")
    try:
        # A bare channel: the broker closes it on a 404 or 405, and a robust
        # one would reopen itself.
        channel = await transport.connection.channel()
    except CHANNEL_GONE as exc:
        raise BusConnectionError(f"{what}: {exc}") from None
    try:
        await channel.queue_declare(queue, passive=True)
        return True  # (a declare on the agent's own connection: an in-process agent)
    except aiormq.exceptions.ChannelLockedResource:
        return True  # exclusive to another connection, which lives: the agent's
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    except CHANNEL_GONE as exc:
        raise BusConnectionError(f"{what}: {exc}") from None
    finally:
        await close_for_good(channel, "a probe channel")
