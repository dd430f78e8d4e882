"""Channels that many consumers share: the orchestrator's agents' events queues.

A channel per consumer, as the other subscriptions have, would cap the
agents one orchestrator follows at the connection's ``channel_max`` (2047 by
default), and every channel costs the broker a process and its memory. The
agents' events queues are consumed on a few channels instead,
``CONSUMERS_PER_CHANNEL`` consumers each. Their ``basic.qos`` is per
consumer (``global`` false, set before any consumer starts): each queue
still has at most ``prefetch`` deliveries unacknowledged, whatever its
neighbours do.

What sharing changes for a consumer (``RabbitSubscription`` given a slot):
an ack with ``multiple`` would settle the deliveries of the channel's other
consumers too, before their handlers ran, so its acks go through the
channel's (``broker.rabbitmq_acks``), which acknowledges in one ack what
every consumer of the channel handled in the last few milliseconds, as far
as it is the oldest of the channel, and the rest each by itself; closing it
cancels its consumer and hands back (nack, requeue) what it holds, rather
than closing the channel; and its queue leaves the robust channel's
registry, so that a reconnect does not declare again the queue of an agent
removed since. A channel error would close every consumer of that channel
(the robust channel reopens with them, and what they held comes again, as
after a reconnect): so what may fail (a queue of that name with other
arguments, a refused permission) is declared first on a channel that only
declares (and is not declared again after a reconnect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .bus import BeforeAck, Subscription
from .errors import BusConnectionError
from .rabbitmq_acks import ChannelAcks
from .rabbitmq_consume import close_for_good
from .rabbitmq_declare import Declarer
from .rabbitmq_link import CHANNEL_GONE
from .topology import Declarations

if TYPE_CHECKING:
    from .rabbitmq import RabbitMQBus

CONSUMERS_PER_CHANNEL = 256
"""Consumers a shared channel takes before another is opened: 2,000 agents
are consumed on 8 channels, and a channel error disturbs at most this many."""

if "_queues" not in getattr(aio_pika.RobustChannel, "__annotations__", {}):
    # pragma: no cover - a check of the aio-pika this was written against
    raise ImportError(
        "aio-pika's RobustChannel keeps no _queues registry (aio-pika 10 does):"
        " broker.rabbitmq_shared.forget_queue must be adapted to this aio-pika"
    )


def forget_queue(channel: AbstractChannel, queue: AbstractQueue) -> None:
    """Take ``queue`` out of the robust channel's registry: a reconnect no
    longer declares it again (with its bindings) nor consumes it. aio-pika
    has no public call for it short of deleting the queue on the broker."""
    registry = getattr(channel, "_queues", None)
    if registry is None:
        return
    queues = registry.get(queue.name)
    if queues is not None:
        queues.discard(queue)
        if not queues:
            del registry[queue.name]


class ChannelSlot:
    """One consumer's place on a shared channel; ``release`` gives it back (once)."""

    def __init__(self, pool: SharedChannels, channel: AbstractChannel) -> None:
        self.channel = channel
        self.acks = pool.acks
        self._pool = pool
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool._release(self.channel)


class SharedChannels:
    """The shared channels of one connection, each with its consumer count."""

    def __init__(
        self,
        open_channel: Callable[[], Awaitable[AbstractChannel]],
        prefetch: int,
        per_channel: int = CONSUMERS_PER_CHANNEL,
    ) -> None:
        self._open_channel = open_channel
        self._prefetch = prefetch
        self._per_channel = per_channel
        self._users: dict[AbstractChannel, int] = {}
        self._declaring: AbstractChannel | None = None
        self.acks = ChannelAcks()
        self._lock = asyncio.Lock()
        """Consumers starting at once do not each open a channel."""

    async def declaring(self) -> AbstractChannel:
        """The channel declares are tried on before a shared channel repeats them:
        one the broker closes (a queue of that name with other arguments)
        reopens by itself, and holds no consumer."""
        async with self._lock:
            if self._declaring is not None and self._declaring.is_closed:
                old, self._declaring = self._declaring, None
                await close_for_good(old, "a declaring channel")
            if self._declaring is None:
                self._declaring = await self._open_channel()
            return self._declaring

    @property
    def channels(self) -> int:
        """How many shared channels are open, the declaring one too."""
        return len(self._users) + (self._declaring is not None)

    async def take(self) -> ChannelSlot:
        """A place on the least used channel that has room, else on a new one."""
        async with self._lock:
            for channel, users in list(self._users.items()):
                if users == 0 and channel.is_closed:  # (closed for good: no reopen later)
                    del self._users[channel]
                    await close_for_good(channel, "an unused shared channel")
            open_ones = [
                (users, index, channel)
                for index, (channel, users) in enumerate(self._users.items())
                if users < self._per_channel and not channel.is_closed
            ]
            if open_ones:
                channel = min(open_ones, key=lambda entry: entry[:2])[2]
            else:
                channel = await self._open_channel()
                # Per consumer (global false), before any consumer starts on it.
                await channel.set_qos(prefetch_count=self._prefetch)
                self._users[channel] = 0
            self._users[channel] += 1
            return ChannelSlot(self, channel)

    def _release(self, channel: AbstractChannel) -> None:
        if channel in self._users:
            self._users[channel] = max(0, self._users[channel] - 1)

    def clear(self) -> None:
        """Forget every channel (its connection is being closed with them)."""
        self._users.clear()
        self._declaring = None


async def subscribe_shared(
    bus: RabbitMQBus,
    pool: SharedChannels,
    declarations: Declarations,
    handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
    before_ack: BeforeAck | None,
    whose: str,
) -> Subscription:
    """Declare ``declarations`` and consume its queue on a shared channel of ``pool``."""
    # What may fail with a channel error (a queue of that name with other
    # arguments, a refused permission) fails on the declaring channel first.
    own_only = bus.declares != "all"
    probe = Declarer(await pool.declaring(), bus.address, own_only=own_only, robust=False)
    try:
        await probe.declare(Declarations(queues=declarations.queues))
    except CHANNEL_GONE as exc:
        raise BusConnectionError(f"cannot declare {whose} events queue: {exc}") from None
    slot = await pool.take()
    # Declared and bound again on the shared channel, whose robust queue declares
    # and binds it again after a reconnect, and once the broker cancels its
    # consumer (someone deleted it), before consuming again (aio-pika 10).
    shared = Declarer(slot.channel, bus.address, own_only=own_only)
    try:
        return await bus._subscribe(
            shared,
            Declarations(queues=declarations.queues, bindings=declarations.bindings),
            handle,
            before_ack=before_ack,
            slot=slot,
        )
    except BaseException as exc:
        for queue in shared.queues.values():  # (it leaves nothing on the channel)
            forget_queue(slot.channel, queue)
        slot.release()
        if isinstance(exc, CHANNEL_GONE):
            raise BusConnectionError(f"cannot consume {whose} events queue: {exc}") from None
        raise
