"""Who of a task queue's consumers the in-process bus hands the next message to.

RabbitMQ decides this inside the broker, and scheduling depends on it (see
``broker.bus``): a message goes to the consumer of highest ``x-priority``
among those whose channel has credit left (its prefetch, shared across all
the queues the channel consumes, less what it holds unsettled); consumers
of equal priority take turns; a consumer whose priority changes is a new
consumer, at the back of the turns. ``MemoryBus`` keeps those rules here,
apart from the queues themselves (``broker.memory_queues``), so that the
one place that decides who gets a task reads on its own: the channels and
their credit, each queue's consumers with their priorities, the agent's
``TaskConsumer`` that adds, removes and re-prioritises them, and the
deliveries that give the credit back when settled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bus import TaskConsumer, TaskDelivery, TaskHandler, priorities_after
from .errors import BusNotStarted
from .tracing import trace_headers

if TYPE_CHECKING:
    from .memory import MemoryBus
    from .memory_queues import Item, TaskQueue


@dataclass(eq=False)
class ConsumerChannel:
    """One consumer's channel: its credit (prefetch) shared by all its queues."""

    prefetch: int
    unacked: int = 0
    detached: int = 0
    """Acknowledged deliveries whose tasks still run: they keep their place."""
    consumers: list[QueueConsumer] = field(default_factory=list)
    deliveries: set[MemoryDelivery] = field(default_factory=set)

    @property
    def has_room(self) -> bool:
        return self.prefetch <= 0 or self.unacked + self.detached < self.prefetch


@dataclass(eq=False)
class QueueConsumer:
    """A channel's consumer of one queue, under the priority it was started with."""

    queue: TaskQueue
    channel: ConsumerChannel
    priority: int
    handler: TaskHandler


def next_consumer(consumers: deque[QueueConsumer]) -> QueueConsumer | None:
    """The consumer the next message goes to: best priority with room, in turns.

    The chosen one goes to the back of ``consumers``, so that consumers of
    equal priority take turns; None if no consumer has room.
    """
    chosen = None
    for consumer in consumers:
        if consumer.channel.has_room and (chosen is None or consumer.priority > chosen.priority):
            chosen = consumer
    if chosen is not None:
        consumers.remove(chosen)
        consumers.append(chosen)
    return chosen


class MemoryDelivery(TaskDelivery):
    def __init__(
        self, bus: MemoryBus, consumer: QueueConsumer, item: Item, redelivered: bool
    ) -> None:
        self._bus = bus
        self._consumer = consumer
        self._item = item
        self.body = item[2].body
        self.queue_key = consumer.queue.key
        self.redelivered = redelivered
        self.sender = item[2].user_id
        self.trace = trace_headers(item[2].headers)
        self._settled = False
        self._lost = False
        self._lost_event: asyncio.Event | None = None
        """Made only for who waits to hear of the loss (most deliveries are never lost)."""

    @property
    def lost(self) -> bool:
        return self._lost

    async def wait_lost(self) -> None:
        if self._lost:
            return
        if self._lost_event is None:
            self._lost_event = asyncio.Event()
        await self._lost_event.wait()

    def give_back(self) -> None:
        """Its consumer went away: back to its queue, as a closed channel's are."""
        if self._settle():
            self._lost = True
            if self._lost_event is not None:
                self._lost_event.set()
            self._bus._requeue(self._consumer.queue, self._item)
            self._bus._after_settle(self._consumer.channel)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        channel = self._consumer.channel
        channel.unacked -= 1
        channel.deliveries.discard(self)
        return True

    async def ack(self) -> None:
        if self._settle():
            self._bus._after_settle(self._consumer.channel)

    async def requeue(self) -> None:
        if self._settle():
            self._bus._requeue(self._consumer.queue, self._item)
            self._bus._after_settle(self._consumer.channel)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            queue = self._consumer.queue
            self._bus._dead_letter(
                self.body, reason, source=queue.name, message_id=self._item[2].message_id
            )
            self._bus._after_settle(self._consumer.channel)


class MemoryTaskConsumer(TaskConsumer):
    cancels_handlers = False
    """The handler of a delivery runs in a task of the bus's that nothing
    cancels: a consumer that goes away gives its deliveries back
    (``MemoryDelivery.give_back``) and lets their handlers run on. So an agent
    needs no shield of its own around the handling (``Agent._on_delivery``)."""

    def __init__(self, bus: MemoryBus, prefetch: int, handler: TaskHandler) -> None:
        self._bus = bus
        self._channel = ConsumerChannel(prefetch=prefetch)
        self._handler = handler
        self._default_priority = 0
        self._priorities: dict[str, int] = {}
        """The x-priority each key is to be consumed with (``consume``)."""
        self._closed = False
        self._paused = False
        """Set by ``pause`` (a stop): a step aside that ends then does not resume."""

    @property
    def queue_keys(self) -> frozenset[str]:
        return frozenset(c.queue.key for c in self._channel.consumers)

    @property
    def busy(self) -> bool:
        """It holds deliveries it has not settled."""
        return bool(self._channel.deliveries)

    async def consume(
        self,
        queue_keys: Iterable[str],
        consumer_priority: int = 0,
        priorities: Mapping[str, int] | None = None,
    ) -> None:
        if self._closed:
            raise BusNotStarted("task consumer is closed")
        queue_keys = list(queue_keys)
        self._paused = False
        self._default_priority = consumer_priority
        self._priorities = priorities_after(
            self._priorities, queue_keys, consumer_priority, priorities
        )
        for consumer in list(self._channel.consumers):
            if consumer.priority != self._priorities[consumer.queue.key]:
                # As RabbitMQ: a new consumer under the new priority, at the back of the turns.
                self._remove(consumer)
                self._add(consumer.queue.key)
        have = self.queue_keys
        for key in queue_keys:
            if key not in have:
                self._add(key)
        for consumer in list(self._channel.consumers):
            self._bus._dispatch(consumer.queue)

    def _add(self, key: str) -> None:
        queue = self._bus._queue(key)
        priority = self._priorities.get(key, self._default_priority)
        consumer = QueueConsumer(queue, self._channel, priority, self._handler)
        queue.consumers.append(consumer)
        self._channel.consumers.append(consumer)

    def _remove(self, consumer: QueueConsumer) -> None:
        """Stop a consumer; what it was given stays held (settled through the channel)."""
        consumer.queue.consumers.remove(consumer)
        self._channel.consumers.remove(consumer)

    async def step_aside(self, delivery: TaskDelivery, seconds: float) -> None:
        key = delivery.queue_key
        mine = [c for c in self._channel.consumers if c.queue.key == key]
        for consumer in mine:
            self._remove(consumer)
        await delivery.requeue()
        await asyncio.sleep(seconds)
        if not (self._closed or self._paused) and mine and key not in self.queue_keys:
            self._add(key)
            self._bus._dispatch(self._bus._queue(key))

    async def pause(self) -> None:
        self._paused = True
        for consumer in self._channel.consumers:
            consumer.queue.consumers.remove(consumer)
        self._channel.consumers.clear()
        self._bus._poke()

    async def detach(self, delivery: TaskDelivery) -> None:
        self._channel.detached += 1
        await delivery.ack()

    async def reattach(self) -> None:
        self._channel.detached = max(0, self._channel.detached - 1)
        for consumer in list(self._channel.consumers):
            self._bus._dispatch(consumer.queue)

    async def set_prefetch(self, prefetch: int) -> None:
        self._channel.prefetch = prefetch
        for consumer in list(self._channel.consumers):
            self._bus._dispatch(consumer.queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        queues = [c.queue for c in self._channel.consumers]
        await self.pause()
        for delivery in list(self._channel.deliveries):
            delivery.give_back()
        for queue in queues:
            self._bus._dispatch(queue)
        self._bus._subscriptions.discard(self)
