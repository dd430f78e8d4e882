"""Consuming tasks on RabbitMQ: task deliveries and task consumers (the
ordered subscriptions are ``rabbitmq_subscription``).

Each task consumer has a channel of its own, so that closing it hands back exactly
its unacknowledged deliveries. A task consumer's prefetch is channel-wide
(``global_``): one limit across every queue the agent consumes.

A channel that closes (the broker restarts, the connection drops) cancels the
tasks it started for its consumers (aiormq). A task delivery's handling must
outlive that (an agent's handler goes on through a reconnect and reports
once the link is back), so the task consumer runs each handling in a task of
its own. The delivery is then ``lost``: the broker has requeued it, and it
comes again, marked redelivered, once the robust channel consumes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelInvalidStateError

from .bus import (
    DeadLetter,
    Subscription,
    TaskConsumer,
    TaskDelivery,
    TaskHandler,
    priorities_after,
)
from .errors import BusConnectionError
from .rabbitmq_acks import ChannelAcks, quietly
from .rabbitmq_declare import Declarer
from .rabbitmq_link import CHANNEL_GONE
from .topology import Topology
from .tracing import trace_headers

log = logging.getLogger(__name__)

DeadLetterPublish = Callable[[bytes, str, str, "str | None"], Awaitable[None]]
"""(body, reason, source queue, message id): publish a dead letter, never raise."""

ACK_BATCH = 64
"""Events handled before one cumulative ack (the prefetch is larger)."""
CLOSE_TIMEOUT = 5.0
"""Seconds a channel's close may take before it is left to the connection."""
ACK_RETRY_MIN = 0.5
ACK_RETRY_MAX = 10.0
"""A subscription whose before-ack hook failed (a store outage past its own
retry) tries hook and ack again after this long, doubling up to the maximum,
until it succeeds or another message comes: nothing may be acknowledged before
its effects are durable, and a prefetch full of unacknowledged messages would
bring nothing else."""


def dead_letter_of(message: AbstractIncomingMessage) -> DeadLetter:
    """The dead letter a message of a dead-letter queue carries."""
    return DeadLetter.of(message.body, message.headers, message.message_id, message.user_id)


async def close_for_good(channel: AbstractChannel, what: str) -> None:
    """Close ``channel`` so that no reconnect brings it back, even while the
    link is down: a robust channel restores, with its consumers, every channel
    not closed through it, and one left alone "because it is closed already"
    came back as a ghost consumer that took messages nobody read."""
    try:
        await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)
    except Exception as exc:
        log.debug("closing %s: %s", what, exc)


class RabbitDelivery(TaskDelivery):
    def __init__(
        self,
        message: AbstractIncomingMessage,
        queue: str,
        queue_key: str,
        dead: DeadLetterPublish,
        acks: ChannelAcks,
    ) -> None:
        self._message = message
        self._acks = acks
        self._queue = queue
        self._dead = dead
        self.body = message.body
        self.queue_key = queue_key
        self.redelivered = bool(message.redelivered)
        self.sender = message.user_id
        self.trace = trace_headers(message.headers)

    @property
    def lost(self) -> bool:
        try:
            self._message.channel  # noqa: B018 - raises once that channel is closed
        except ChannelInvalidStateError:
            return True
        return False

    async def wait_lost(self) -> None:
        try:
            closing = self._message.channel.closing
        except ChannelInvalidStateError:
            return
        try:
            await asyncio.wait([closing])
        finally:
            if closing.done():
                if not closing.cancelled():
                    closing.exception()  # seen: how it closed does not matter here
            else:
                closing.cancel()  # only this observer

    async def ack(self) -> None:
        await self._acks.ack(self._message)  # with the channel's others (broker.rabbitmq_acks)

    async def requeue(self) -> None:
        await self._acks.hand_back([self._message], self.queue_key)

    async def dead_letter(self, reason: str) -> None:
        await self._dead(self.body, reason, self._queue, self._message.message_id)
        await self.ack()


class RabbitTaskConsumer(TaskConsumer):
    def __init__(
        self,
        consumer_id: str,
        declarer: Declarer,
        topology: Topology,
        handler: TaskHandler,
        prefetch: int,
        *,
        dead: DeadLetterPublish,
        on_close: Callable[[Subscription], None],
    ) -> None:
        self._id = consumer_id
        self._declarer = declarer
        self._channel: AbstractChannel = declarer.channel
        self._topology = topology
        self._handler = handler
        self._prefetch = prefetch
        self._dead = dead
        self._on_close = on_close
        self._detached = 0
        self._default_priority = 0
        self._priorities: dict[str, int] = {}
        """The x-priority each key is to be consumed with (``consume``)."""
        self._queues: dict[str, tuple[AbstractQueue, str, int]] = {}
        """Per key consumed: its queue, the consumer's tag and the x-priority it started with."""
        self._parked: set[str] = set()
        """Keys not consumed while every place is held by detached tasks
        (a prefetch of 0 would mean no limit at all)."""
        self._lock = asyncio.Lock()
        self._paused = False
        """Set by ``pause`` (a stop): a step aside that ends then does not resume."""
        self._handlings: set[asyncio.Task[None]] = set()
        """Deliveries being handled, in tasks the channel's close does not cancel."""
        self._acks = ChannelAcks(eager=True)
        """Its acks, coalesced (eager: a prefetch of a few slots waits for no delay)."""

    @property
    def queue_keys(self) -> frozenset[str]:
        return frozenset(self._queues)

    async def _start(self, key: str) -> None:
        declarations = self._topology.capability(key)
        await self._declarer.declare(declarations)
        queue = self._declarer.queues[declarations.queue]

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._acks.received(message)
            delivery = RabbitDelivery(message, queue.name, key, self._dead, self._acks)
            handling = asyncio.get_running_loop().create_task(self._handler(delivery))
            self._handlings.add(handling)
            handling.add_done_callback(self._handled)

        priority = self._priorities.get(key, self._default_priority)
        tag = await queue.consume(
            on_message,
            arguments={"x-priority": priority},
            consumer_tag=consumer_tag(self._id, key),
        )
        self._queues[key] = (queue, tag, priority)

    async def _restart(self, key: str) -> None:
        """Consume ``key`` anew under its new priority: the new consumer starts
        before the old one is cancelled, so the queue is never without one of
        this agent's; a message the old one was given meanwhile is held as any."""
        queue, tag, _ = self._queues.pop(key)
        await self._start(key)
        # If the channel is gone, so is the old consumer (and it is not restored).
        await quietly(partial(queue.cancel, tag), f"stop consuming {key} at its old priority")

    def _handled(self, handling: asyncio.Task[None]) -> None:
        self._handlings.discard(handling)
        if not handling.cancelled() and (exc := handling.exception()) is not None:
            log.error("handler of a task delivery of %s failed", self._id, exc_info=exc)

    async def consume(
        self,
        queue_keys: Iterable[str],
        consumer_priority: int = 0,
        priorities: Mapping[str, int] | None = None,
    ) -> None:
        queue_keys = list(queue_keys)
        async with self._lock:
            self._paused = False
            self._default_priority = consumer_priority
            self._priorities = priorities_after(
                self._priorities, queue_keys, consumer_priority, priorities
            )
            try:
                for key, (_, _, priority) in list(self._queues.items()):
                    if priority != self._priorities[key]:
                        # x-priority is fixed per consumer: re-consume under the new one.
                        await self._restart(key)
                for key in queue_keys:
                    if self._detached >= self._prefetch:
                        self._parked.add(key)
                    elif key not in self._queues:
                        await self._start(key)
            except aiormq.exceptions.AMQPError as exc:
                raise BusConnectionError(f"cannot consume task queues: {exc}") from None

    async def step_aside(self, delivery: TaskDelivery, seconds: float) -> None:
        key = delivery.queue_key
        async with self._lock:
            entry = self._queues.pop(key, None)
            if entry is not None:
                queue, tag, _ = entry
                await quietly(partial(queue.cancel, tag), f"stop consuming {key}")
        await delivery.requeue()
        await asyncio.sleep(seconds)
        if entry is not None:
            async with self._lock:
                if self._paused:
                    return
                if self._detached >= self._prefetch:
                    self._parked.add(key)
                elif key not in self._queues and not self._channel.is_closed:
                    await self._start(key)

    async def pause(self) -> None:
        async with self._lock:
            self._paused = True
            for key, (queue, tag, _) in list(self._queues.items()):
                # If the channel is gone, so is the consumer.
                await quietly(partial(queue.cancel, tag), f"stop consuming {key}")
                del self._queues[key]
            self._parked.clear()

    async def detach(self, delivery: TaskDelivery) -> None:
        async with self._lock:
            self._detached += 1
            # Lower the limit before the ack, so that the ack lets nothing new in.
            await self._apply_room("lower")
        await delivery.ack()

    async def reattach(self) -> None:
        async with self._lock:
            self._detached = max(0, self._detached - 1)
            await self._apply_room("raise")

    async def set_prefetch(self, prefetch: int) -> None:
        async with self._lock:
            self._prefetch = prefetch
            await self._apply_room("change")

    async def _apply_room(self, what: str) -> None:
        """The channel's prefetch is what detached tasks leave of the limit;
        with nothing left the queues are parked (a prefetch of 0 is no limit)."""
        room = self._prefetch - self._detached
        try:
            if room >= 1:
                await self._channel.set_qos(prefetch_count=room, global_=True)
                if self._parked and not self._paused:
                    parked, self._parked = self._parked, set()
                    for key in parked:
                        if key not in self._queues:
                            await self._start(key)
            else:
                for key, (queue, tag, _) in list(self._queues.items()):
                    await queue.cancel(tag)
                    del self._queues[key]
                    self._parked.add(key)
        except CHANNEL_GONE as exc:
            log.info("could not %s the prefetch of %s: %s", what, self._id, exc)

    async def close(self) -> None:
        self._on_close(self)
        await self._acks.flush_all()  # what was settled goes before the channel
        # Closing the channel hands every unacknowledged task back to its queue.
        await close_for_good(self._channel, "task channel")


MAX_TAG_BYTES = 255
"""AMQP's limit on a consumer tag (a short string)."""


def consumer_tag(agent_id: str, key: str) -> str:
    """``<agent id>:<queue key>:<random>``, readable in the management UI. A
    long id with a long key would pass AMQP's 255 bytes, and the broker would
    refuse the consume (the agent then never took those tasks): the key is
    then written as a digest."""
    tag = f"{agent_id}:{key}:{uuid.uuid4().hex[:8]}"
    if len(tag.encode()) <= MAX_TAG_BYTES:
        return tag
    return f"{agent_id}:sha1-{hashlib.sha1(key.encode()).hexdigest()}:{uuid.uuid4().hex[:8]}"
