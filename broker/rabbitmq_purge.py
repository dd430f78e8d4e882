"""Finding and deleting a prefix's queues and exchanges on RabbitMQ, by name.

For ``orchestrator purge``: a deployment torn down, or a test's or demo's
prefix left behind. AMQP cannot list queues, so the caller brings the names
(the topology's, and the capability queues it learnt of); each is checked
with a passive declare, on a throwaway channel since a miss closes it, so
that only what exists is listed and deleted. Exclusive queues (agents'
control queues, monitors') belong to live connections and go with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import aiormq

from .errors import BusConnectionError, BusError
from .rabbitmq import RabbitMQBus
from .rabbitmq_link import CHANNEL_GONE
from .rabbitmq_probe import throwaway_channel


@dataclass(frozen=True)
class FoundQueue:
    name: str
    messages: int
    consumers: int


@dataclass
class Found:
    """What exists of the names asked about."""

    queues: list[FoundQueue] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    """Exclusive queues of another connection: in use, not deleted."""


async def find(bus: RabbitMQBus, queues: Iterable[str], exchanges: Iterable[str]) -> Found:
    """Which of these queues and exchanges exist (a connected bus's broker)."""
    found = Found()
    connection = bus._require()
    for name in dict.fromkeys(queues):
        async with throwaway_channel(connection) as channel:
            try:
                underlay = await channel.get_underlay_channel()
                declared = await underlay.queue_declare(name, passive=True)
                found.queues.append(
                    FoundQueue(name, declared.message_count or 0, declared.consumer_count or 0)
                )
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            except aiormq.exceptions.ChannelLockedResource:
                found.locked.append(name)
            except CHANNEL_GONE as exc:
                raise BusConnectionError(f"cannot look up queue {name!r}: {exc}") from None
    for name in dict.fromkeys(exchanges):
        async with throwaway_channel(connection) as channel:
            try:
                underlay = await channel.get_underlay_channel()
                await underlay.exchange_declare(name, passive=True)
                found.exchanges.append(name)
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            except CHANNEL_GONE as exc:
                raise BusConnectionError(f"cannot look up exchange {name!r}: {exc}") from None
    return found


async def delete(bus: RabbitMQBus, found: Found) -> None:
    """Delete the queues (with their messages), then the exchanges."""
    async with throwaway_channel(bus._require()) as channel:
        try:
            underlay = await channel.get_underlay_channel()
            for queue in found.queues:
                await underlay.queue_delete(queue.name)
            for exchange in found.exchanges:
                await underlay.exchange_delete(exchange)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise BusError(f"the broker refused a delete (configure permission): {exc}") from None
        except CHANNEL_GONE as exc:
            raise BusConnectionError(f"delete failed: {exc}") from None
