"""Acknowledgements coalesced per channel: one ack (``multiple``) for many deliveries.

Every task costs the broker an ack from the agent that ran it and one from
the orchestrator for its final event; each is a frame the broker parses and a
settle it makes, as much as a publish. A channel's handled deliveries are
acknowledged together instead: ``ACK_DELAY`` after the first one, the oldest
of the channel, as far as they are all handled, go in one ack with
``multiple`` (which settles every delivery of the channel up to its tag).

An ack with ``multiple`` would also settle a delivery not handled yet, or one
being handed back (nack): so the channel's deliveries are kept in tag order
(``received`` in delivery order, before anyone handles them), each marked once
handled (``ready``); those handled behind one that is not are acknowledged
each by itself at the flush (a slow consumer, or one whose before-ack hook
fails, holds up nobody's acks); a hand back (``hand_back``) and the acks of
a channel go one at a time under the channel's lock, in tag order, and a
handed-back delivery leaves the channel's list only once its nack went: the
ack or nack of a tag settled already is a channel error, which closes every
consumer of the channel.

Nothing is acknowledged earlier than before (a delivery is marked handled
where it was acknowledged), only up to ``ACK_DELAY`` later, and ``eager``
channels (an agent's, whose prefetch is its few task slots) flush at once
when every delivery they hold is handled: no slot waits for the delay.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from .rabbitmq_link import CHANNEL_GONE

log = logging.getLogger(__name__)

ACK_DELAY = 0.005
"""Seconds a channel's handled deliveries wait to be acknowledged together."""
ACKS_AT_ONCE = 256
"""Handled deliveries of a channel acknowledged at once, without the delay."""


async def quietly(operation: Callable[[], Awaitable[object]], what: str) -> None:
    """Settle or cancel on a channel that may have died meanwhile.

    If it did, the broker requeues the message by itself and it comes again;
    every handler is idempotent by (task, attempt).
    """
    try:
        await operation()
    except CHANNEL_GONE as exc:
        log.info("could not %s (%s)", what, exc)


class ChannelAcks:
    """The acknowledgements of one or more channels, coalesced per channel."""

    def __init__(self, *, eager: bool = False) -> None:
        self._eager = eager
        self._pending: weakref.WeakKeyDictionary[Any, dict[int, AbstractIncomingMessage | None]]
        self._pending = weakref.WeakKeyDictionary()
        """Per (aiormq) channel, its deliveries not settled yet by tag, in tag
        order: None until handled, then the message to acknowledge."""
        self._ready: dict[Any, int] = {}
        """Per channel with a flush due, how many of its deliveries are handled."""
        self._locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._next: dict[Any, asyncio.Future[None]] = {}
        """Per channel, what its next flush resolves once it is sent (``ack``)."""
        self._flushes: set[asyncio.Task[None]] = set()

    @staticmethod
    def _key(message: AbstractIncomingMessage) -> tuple[Any, int] | None:
        try:
            return message.channel, message.delivery_tag or 0
        except ChannelInvalidStateError:  # (its channel died: the broker requeued it)
            return None

    def received(self, message: AbstractIncomingMessage) -> None:
        """A delivery came (in delivery order, before anyone handles it)."""
        if (key := self._key(message)) is not None:
            self._pending.setdefault(key[0], {})[key[1]] = None

    def ready(self, messages: list[AbstractIncomingMessage]) -> None:
        """These deliveries are handled: acknowledge them, soon."""
        for message in messages:
            key = self._key(message)
            if key is None or not self._unsettled(*key):
                continue  # (settled already, or its channel is gone)
            channel, tag = key
            pending = self._pending[channel]
            pending[tag] = message
            count = self._ready.get(channel)
            if count is None:
                asyncio.get_running_loop().call_later(ACK_DELAY, self._flush_later, channel)
            count = self._ready[channel] = (count or 0) + 1
            if count >= ACKS_AT_ONCE or (self._eager and count == len(pending)):
                self._flush_later(channel)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge one delivery with the channel's next flush, and return once sent."""
        key = self._key(message)
        if key is None or not self._unsettled(*key):
            return  # (no flush would come for it)
        done = self._next.get(key[0])
        if done is None:
            done = self._next[key[0]] = asyncio.get_running_loop().create_future()
        self.ready([message])
        await asyncio.shield(done)

    async def hand_back(self, messages: list[AbstractIncomingMessage], source: str) -> None:
        """Hand these deliveries back to their queue (nack, requeue), not acknowledged."""
        by_channel: dict[Any, list[AbstractIncomingMessage]] = {}
        for message in messages:
            if (key := self._key(message)) is not None:
                by_channel.setdefault(key[0], []).append(message)
        for channel, returned in by_channel.items():
            async with self._lock(channel):
                pending = self._pending.get(channel, {})
                for message in returned:
                    requeue = partial(message.nack, requeue=True)
                    await quietly(requeue, f"hand back a delivery to {source}")
                    pending.pop(message.delivery_tag or 0, None)

    def _unsettled(self, channel: Any, tag: int) -> bool:
        pending = self._pending.get(channel)
        return pending is not None and tag in pending

    def _lock(self, channel: Any) -> asyncio.Lock:
        lock = self._locks.get(channel)
        if lock is None:
            lock = self._locks[channel] = asyncio.Lock()
        return lock

    def _flush_later(self, channel: Any) -> None:
        if self._ready.pop(channel, None) is None:
            return  # (flushed already)
        flush = asyncio.get_running_loop().create_task(self.flush(channel))
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def flush(self, channel: Any) -> None:
        """Acknowledge what of ``channel`` is handled, now."""
        self._ready.pop(channel, None)
        done = self._next.pop(channel, None)
        try:
            async with self._lock(channel):
                pending = self._pending.get(channel)
                if not pending:
                    return
                oldest = list(itertools.takewhile(lambda m: m is not None, pending.values()))
                rest = itertools.islice(pending.values(), len(oldest), None)
                behind = [m for m in rest if m is not None]
                for message in (*oldest, *behind):
                    del pending[message.delivery_tag or 0]
                if oldest:
                    await quietly(partial(oldest[-1].ack, multiple=True), "acknowledge deliveries")
                for message in behind:
                    await quietly(message.ack, "acknowledge a delivery")
        finally:
            if done is not None and not done.done():
                done.set_result(None)

    async def flush_all(self) -> None:
        """Acknowledge everything handled, on every channel (a consumer closes)."""
        for channel in list(self._pending):
            await self.flush(channel)
