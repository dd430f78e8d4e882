"""Ordered subscriptions on RabbitMQ: events, heartbeats, dead letters, requests, control.

Each has a channel of its own, but for the agents' events queues of the
orchestrator, which share a few (``broker.rabbitmq_shared``). Deliveries go
through a local queue to one worker, in order and one at a time; a batch is
acknowledged once handled and once the before-ack hook (the store's flush)
ran, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .bus import CLOSE_WAIT, BeforeAck, EventHandler, Subscription
from .envelope import Sender, handling_from
from .errors import InvalidMessage
from .messages import parse_event
from .rabbitmq_acks import quietly
from .rabbitmq_consume import (
    ACK_BATCH,
    ACK_RETRY_MAX,
    ACK_RETRY_MIN,
    CLOSE_TIMEOUT,
    DeadLetterPublish,
    close_for_good,
)
from .rabbitmq_link import CHANNEL_GONE
from .rabbitmq_shared import ChannelSlot, forget_queue

log = logging.getLogger(__name__)

EVENTS_PREFETCH = 512
"""Unacknowledged events per events queue (each agent's, the shared one)."""


def events_of(handler: EventHandler) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """What an events subscription hands its deliveries to: ``handler``, given the event."""

    async def handle(message: AbstractIncomingMessage) -> None:
        await handler(parse_event(message.body))

    return handle


class RabbitSubscription(Subscription):
    """Deliveries go through a local queue to one worker: in order, one at a time.

    On a channel of its own, it acknowledges with ``multiple`` (one ack settles
    every delivery before it) and closing the channel hands back what it
    holds. Given a ``slot`` on a shared channel (``broker.rabbitmq_shared``), it
    hands what it handled to the channel's acks (``ChannelAcks``: one ack for
    what all the channel's consumers handled in a few milliseconds) and,
    closing, cancels its consumer and hands back (nack, requeue) what it
    holds: the channel's other consumers go on undisturbed.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        dead: DeadLetterPublish,
        on_close: Callable[[Subscription], None],
        dead_letter_failures: bool = True,
        before_ack: BeforeAck | None = None,
        slot: ChannelSlot | None = None,
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._handle = handle
        self._dead = dead
        self._on_close = on_close
        self._dead_letter_failures = dead_letter_failures
        self._before_ack = before_ack
        self._slot = slot
        self._tag: str | None = None
        self._closed = False
        """Set once ``close`` cancels the consumer: a delivery still on its way is handed back."""
        self._cancelled = False
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._held: list[AbstractIncomingMessage] = []
        """Handled, in order, and not acknowledged yet (the next ack settles them)."""
        self._current: AbstractIncomingMessage | None = None
        """The message being handled."""
        self._settled = asyncio.Event()
        """Cleared while acks are being sent (``close`` lets them finish)."""
        self._settled.set()
        self._idle = asyncio.Event()
        """Set while the worker handles no message (``close`` lets one finish)."""
        self._idle.set()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def start(self) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._slot is not None:
                self._slot.acks.received(message)
            if self._closed:
                # (a consumer that a reconnect under way restored after the close)
                if self._slot is not None:
                    await self._slot.acks.hand_back([message], self._queue.name)
                else:
                    await _requeue(message, self._queue.name)
                await self._cancel()
                return
            self._inbox.put_nowait(message)

        self._tag = await self._queue.consume(on_message)

    async def consuming(self) -> bool:
        """Whether the broker still has its consumer. The broker cancels it when
        its queue is deleted; aio-pika 10's robust queue declares the queue again
        and consumes again by itself, and this says when that did not happen.
        While the link is down, True: the reconnect restores it."""
        if self._closed or self._tag is None:
            return not self._closed
        if self._channel.is_closed or not _restored(self._channel):
            return True  # (a reconnect restores it, or is restoring it now)
        try:  # (the channel is open, so its connection is ready: no waiting)
            underlay = await self._channel.get_underlay_channel()
        except CHANNEL_GONE:
            return True
        return self._tag in underlay.consumers

    async def _run(self) -> None:
        source = self._queue.name
        retry = ACK_RETRY_MIN
        worker = asyncio.current_task()
        while True:
            if worker is not None and worker.cancelling():
                # ``close`` cancelled us while an AMQP call of a handler ran: aiormq
                # may have turned the cancellation into a channel error, caught as
                # a failure; the worker must end all the same.
                raise asyncio.CancelledError()
            if self._held and self._inbox.empty():
                # The hook failed and nothing else comes to retry it (the prefetch
                # may be full of what it left unacknowledged): retry on a timer.
                try:
                    message = await asyncio.wait_for(self._inbox.get(), retry)
                except TimeoutError:
                    if await self._flushed(source):
                        await self._ack(source)
                        retry = ACK_RETRY_MIN
                    else:
                        retry = min(retry * 2, ACK_RETRY_MAX)
                    continue
            else:
                message = await self._inbox.get()
            self._idle.clear()
            self._current = message
            try:
                with handling_from(Sender.of(message.user_id, message.headers)):
                    await self._handle(message)
            except asyncio.CancelledError:
                raise
            except InvalidMessage as exc:
                await self._dead(message.body, str(exc), source, None)
            except Exception as exc:  # a handler bug must not stop the subscription
                log.exception("handler of %s failed", source)
                if self._dead_letter_failures:  # never for dead letters: that would loop
                    await self._dead(message.body, f"handler error: {exc!r}", source, None)
            finally:
                self._idle.set()
            self._held.append(message)
            self._current = None
            # Handled in order: ack when the inbox runs dry or every ACK_BATCH messages.
            if self._inbox.empty() or len(self._held) >= ACK_BATCH:
                if not await self._flushed(source):
                    continue  # unacknowledged: they come back if we die; retried
                retry = ACK_RETRY_MIN
                await self._ack(source)

    async def _ack(self, source: str) -> None:
        """Acknowledge what was handled (its before-ack hook ran). ``close`` lets
        the acks finish before it cancels the worker, and each delivery leaves
        ``_held`` before its ack goes: a delivery settled twice (acked, then
        handed back) is a channel error, which on a shared channel would close
        every consumer of it."""
        held, self._held = self._held, []
        if not held:
            return
        self._settled.clear()
        try:
            if self._slot is not None:  # shared: the channel's acks, with the neighbours'
                self._slot.acks.ready(held)
                return
            await quietly(partial(held[-1].ack, multiple=True), f"acknowledge {source}")
        finally:
            self._settled.set()

    async def _flushed(self, source: str) -> bool:
        """Run the before-ack hook; whether what was handled may be acknowledged."""
        if self._before_ack is None:
            return True
        try:
            await self._before_ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The next ack covers them, after the next message or the retry timer.
            log.exception("before-ack hook of %s failed", source)
            return False
        return True

    async def close(self) -> None:
        self._on_close(self)
        # A message being handled is let finish (a handler cut half-way leaves
        # in memory what it did not write); what is not acknowledged comes again.
        if asyncio.current_task() is not self._worker:  # (not from its own handler)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_WAIT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), CLOSE_TIMEOUT)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        if self._slot is None:
            await close_for_good(self._channel, "subscription channel")
            return
        await self._leave_shared_channel()

    async def _leave_shared_channel(self) -> None:
        """Cancel the consumer, then hand back what it holds, on a channel others use."""
        self._closed = True
        forget_queue(self._channel, self._queue)  # (a reconnect does not restore it)
        if not self._channel.is_closed:  # (else the consumer went with the channel)
            await self._cancel()
        returned = [*self._held, *([self._current] if self._current is not None else [])]
        self._held, self._current = [], None
        while not self._inbox.empty():
            returned.append(self._inbox.get_nowait())
        assert self._slot is not None
        await self._slot.acks.flush_all()  # what it handled, acknowledged before it goes
        await self._slot.acks.hand_back(returned, self._queue.name)
        self._slot.release()

    async def _cancel(self) -> None:
        if self._tag is None or self._cancelled:
            return
        self._cancelled = True
        try:
            await asyncio.wait_for(self._queue.cancel(self._tag), CLOSE_TIMEOUT)
        except (TimeoutError, *CHANNEL_GONE) as exc:
            log.info("could not stop consuming %s (%s)", self._queue.name, exc)


def _restored(channel: AbstractChannel) -> bool:
    """Whether a robust channel has restored its queues and consumers after a
    reconnect (aio-pika 10 restores the channels one after another, with the
    link up): until then a consumer not there yet is not one the broker
    stopped. aio-pika's event is private; without it, restored."""
    restored = getattr(channel, "_RobustChannel__restored", None)
    return restored is None or restored.is_set()


async def _requeue(message: AbstractIncomingMessage, source: str) -> None:
    await quietly(partial(message.nack, requeue=True), f"hand back a delivery to {source}")
