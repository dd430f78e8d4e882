"""``MemoryBus``: the in-process twin of the RabbitMQ bus.

It keeps the semantics that scheduling depends on (see ``broker.bus``):
priority queues, a prefetch shared across a consumer's queues, consumer
priorities with turn-taking, requeue on consumer loss, ordered topic
subscriptions, and a durable orchestrator queue that buffers events while no
one consumes it. Messages are stored as encoded bytes, exactly as they would
travel, so size limits and (de)serialisation behave as on the real broker.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bus import (
    DEFAULT_REQUEST_TIMEOUT,
    BeforeAck,
    CommunicationBus,
    ControlHandler,
    DeadLetter,
    DeadLetterHandler,
    EventHandler,
    RequestHandler,
    Subscription,
    TaskConsumer,
    TaskDelivery,
    TaskHandler,
)
from .errors import BusNotStarted, InvalidMessage, MessageTooLarge, NoReply
from .messages import (
    Control,
    Event,
    Reply,
    TaskMessage,
    WireMessage,
    parse_control,
    parse_event,
    parse_reply,
)
from .topology import DEAD_LETTER_KEEP, MAX_PRIORITY

log = logging.getLogger(__name__)

_seq = itertools.count()

_Item = tuple[int, int, bytes, "str | None"]
"""(-priority, arrival, body, message id): heap order is priority, then arrival."""


# --- task queues ------------------------------------------------------------


@dataclass(eq=False)
class _Channel:
    prefetch: int
    unacked: int = 0
    detached: int = 0
    """Acknowledged deliveries whose tasks still run: they keep their place."""
    consumers: list[_Consumer] = field(default_factory=list)
    deliveries: set[_Delivery] = field(default_factory=set)

    @property
    def has_room(self) -> bool:
        return self.prefetch <= 0 or self.unacked + self.detached < self.prefetch


@dataclass(eq=False)
class _Consumer:
    queue: _TaskQueue
    channel: _Channel
    priority: int
    handler: TaskHandler


@dataclass(eq=False)
class _TaskQueue:
    key: str
    heap: list[_Item] = field(default_factory=list)
    consumers: deque[_Consumer] = field(default_factory=deque)
    redelivered: set[int] = field(default_factory=set)

    def push(self, priority: int, body: bytes, message_id: str | None) -> None:
        heapq.heappush(self.heap, (-priority, next(_seq), body, message_id))


class _Delivery(TaskDelivery):
    def __init__(self, bus: MemoryBus, consumer: _Consumer, item: _Item, redelivered: bool) -> None:
        self._bus = bus
        self._consumer = consumer
        self._item = item
        self.body = item[2]
        self.queue_key = consumer.queue.key
        self.redelivered = redelivered
        self._settled = False

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
            self._bus._dead_letter(DeadLetter(self.body, reason, self._item[3]))
            self._bus._after_settle(self._consumer.channel)


class _MemoryTaskConsumer(TaskConsumer):
    def __init__(self, bus: MemoryBus, prefetch: int, handler: TaskHandler) -> None:
        self._bus = bus
        self._channel = _Channel(prefetch=prefetch)
        self._handler = handler
        self._priority = 0
        self._closed = False
        self._paused = False
        """Set by ``pause`` (a stop): a step aside that ends then does not resume."""

    @property
    def queue_keys(self) -> frozenset[str]:
        return frozenset(c.queue.key for c in self._channel.consumers)

    async def consume(self, queue_keys: Iterable[str], consumer_priority: int = 0) -> None:
        if self._closed:
            raise BusNotStarted("task consumer is closed")
        self._paused = False
        self._priority = consumer_priority
        for consumer in self._channel.consumers:
            consumer.priority = consumer_priority
        have = self.queue_keys
        for key in queue_keys:
            if key in have:
                continue
            queue = self._bus._queue(key)
            consumer = _Consumer(queue, self._channel, consumer_priority, self._handler)
            queue.consumers.append(consumer)
            self._channel.consumers.append(consumer)
        for consumer in self._channel.consumers:
            self._bus._dispatch(consumer.queue)

    async def step_aside(self, delivery: TaskDelivery, seconds: float) -> None:
        key = delivery.queue_key
        mine = [c for c in self._channel.consumers if c.queue.key == key]
        for consumer in mine:
            consumer.queue.consumers.remove(consumer)
            self._channel.consumers.remove(consumer)
        await delivery.requeue()
        await asyncio.sleep(seconds)
        if not (self._closed or self._paused) and mine and key not in self.queue_keys:
            await self.consume([key], self._priority)

    async def pause(self) -> None:
        self._paused = True
        for consumer in self._channel.consumers:
            consumer.queue.consumers.remove(consumer)
        self._channel.consumers.clear()

    async def detach(self, delivery: TaskDelivery) -> None:
        self._channel.detached += 1
        await delivery.ack()

    async def reattach(self) -> None:
        self._channel.detached = max(0, self._channel.detached - 1)
        for consumer in list(self._channel.consumers):
            self._bus._dispatch(consumer.queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        queues = [c.queue for c in self._channel.consumers]
        await self.pause()
        for delivery in list(self._channel.deliveries):
            await delivery.requeue()
        for queue in queues:
            self._bus._dispatch(queue)
        self._bus._subscriptions.discard(self)


# --- events and control -----------------------------------------------------


@functools.lru_cache(maxsize=1024)
def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more words."""

    def match(p: tuple[str, ...], k: tuple[str, ...]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    def words(text: str) -> tuple[str, ...]:
        return tuple(text.split(".")) if text else ()  # "" has no words

    return match(words(pattern), words(key))


class _MessageQueue:
    """An ordered queue of encoded messages consumed by one handler at a time."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def matches(self, key: str) -> bool:
        return any(topic_matches(p, key) for p in self.patterns)


class _Subscription(Subscription):
    def __init__(
        self, bus: MemoryBus, queue: _MessageQueue, handler, parse, transient, before_ack=None
    ) -> None:
        self._bus = bus
        self._before_ack = before_ack
        self._queue = queue
        self._transient = transient
        queue.worker = asyncio.get_running_loop().create_task(self._run(handler, parse))

    async def _run(self, handler, parse) -> None:
        while True:
            body = await self._queue.items.get()
            try:
                message = parse(body)
            except InvalidMessage as exc:
                self._bus._dead_letter(DeadLetter(body, str(exc)))
                continue
            try:
                await handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler bug must not stop the subscription
                log.exception("handler failed on %s", type(message).__name__)
                if not isinstance(message, DeadLetter):
                    self._bus._dead_letter(DeadLetter(body, f"handler error: {exc!r}"))
            # Where RabbitMQ would send its cumulative ack: when the queue runs dry.
            if self._before_ack is not None and self._queue.items.empty():
                try:
                    await self._before_ack()
                except Exception:
                    log.exception("before-ack hook failed")

    async def close(self) -> None:
        worker = self._queue.worker
        self._queue.worker = None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        self._transient()


@dataclass(eq=False)
class _Request:
    body: bytes
    reply: asyncio.Future[bytes]
    expires: float
    """Loop time after which the client has given up: the server skips it."""


class _RequestServer(Subscription):
    """Takes requests from the bus's request queue, one at a time, in order."""

    def __init__(self, bus: MemoryBus, handler: RequestHandler) -> None:
        self._bus = bus
        self._worker = asyncio.get_running_loop().create_task(self._run(handler))

    async def _run(self, handler: RequestHandler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await self._bus._requests.get()
            if request.reply.done() or loop.time() > request.expires:
                continue  # expired while it waited, as on RabbitMQ
            reply = await self._bus._answer(handler, request.body)
            try:
                body = self._bus._check_size(reply.encode())
            except MessageTooLarge as exc:
                body = Reply.failure("internal", f"reply too large: {exc}").encode()
            if not request.reply.done():
                request.reply.set_result(body)

    async def close(self) -> None:
        if self._bus._request_server is self:
            self._bus._request_server = None
        self._bus._subscriptions.discard(self)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)


# --- the bus ----------------------------------------------------------------


class MemoryBus(CommunicationBus):
    """An in-process bus. Share one instance between the orchestrator and its agents."""

    def __init__(self, broker_url: str | None = None, *, settings=None) -> None:
        super().__init__(broker_url, settings=settings)
        self._connected = False
        self._task_queues: dict[str, _TaskQueue] = {}
        self._event_queues: list[_MessageQueue] = []
        self._orchestrator_queue: _MessageQueue | None = None
        self._control: dict[str, list[_MessageQueue]] = {}
        self._subscriptions: set[Subscription] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._orchestrator_dead: _MessageQueue = _MessageQueue([])
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._request_server: _RequestServer | None = None
        self.dead_letters: list[DeadLetter] = []
        """Every dead-lettered message, newest last (the ``<p>.dead`` queue)."""

    async def connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        if self._orchestrator_queue is None:
            self._orchestrator_queue = _MessageQueue(["task.#", "agent.#"])
            self._event_queues.append(self._orchestrator_queue)

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def _require(self) -> None:
        if not self._connected:
            raise BusNotStarted("the bus is not connected: call connect() first")

    # tasks
    def _queue(self, key: str) -> _TaskQueue:
        queue = self._task_queues.get(key)
        if queue is None:
            queue = self._task_queues[key] = _TaskQueue(key)
        return queue

    async def declare_task_queue(self, queue_key: str) -> None:
        self._require()
        self._queue(queue_key)

    async def publish_task(
        self, message: TaskMessage, *, queue_key: str, priority: int, delay: float = 0.0
    ) -> None:
        self._require()
        body = self._check_size(message.encode())
        queue = self._queue(queue_key)
        priority = max(0, min(priority, MAX_PRIORITY))  # as x-max-priority does
        message_id = f"{message.task_id}:{message.attempt}"
        if delay > 0:
            loop = asyncio.get_running_loop()

            def arrive() -> None:
                self._timers.discard(timer)
                queue.push(priority, body, message_id)
                self._dispatch(queue)

            timer = loop.call_later(delay, arrive)
            self._timers.add(timer)
            return
        queue.push(priority, body, message_id)
        self._dispatch(queue)

    def _dead_letter(self, letter: DeadLetter) -> None:
        log.warning("dead-lettered a message: %s", letter.reason)
        self.dead_letters.append(letter)
        del self.dead_letters[:-DEAD_LETTER_KEEP]
        self._orchestrator_dead.items.put_nowait(letter)

    async def subscribe_dead_letters(
        self, handler: DeadLetterHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        self._require()
        queue = self._orchestrator_dead
        if queue.worker is not None:
            raise RuntimeError("the orchestrator dead-letter queue already has a consumer")
        sub = _Subscription(self, queue, handler, lambda letter: letter, lambda: None, before_ack)
        self._subscriptions.add(sub)
        return sub

    async def queue_depth(self, queue_key: str) -> int:
        self._require()
        queue = self._task_queues.get(queue_key)
        return len(queue.heap) if queue else 0

    async def open_task_consumer(
        self, consumer_id: str, *, prefetch: int, handler: TaskHandler
    ) -> TaskConsumer:
        self._require()
        consumer = _MemoryTaskConsumer(self, prefetch, handler)
        self._subscriptions.add(consumer)
        return consumer

    def _requeue(self, queue: _TaskQueue, item: _Item) -> None:
        heapq.heappush(queue.heap, item)
        queue.redelivered.add(item[1])
        self._dispatch(queue)

    def _after_settle(self, channel: _Channel) -> None:
        for consumer in list(channel.consumers):
            if not channel.has_room:
                break
            self._dispatch(consumer.queue)

    def _dispatch(self, queue: _TaskQueue) -> None:
        """Hand waiting messages to consumers with room, best priority first, in turns."""
        loop = asyncio.get_running_loop()
        while queue.heap and queue.consumers:
            chosen = None
            for consumer in queue.consumers:
                if consumer.channel.has_room and (
                    chosen is None or consumer.priority > chosen.priority
                ):
                    chosen = consumer
            if chosen is None:
                return
            # The chosen consumer goes to the back: equal consumers take turns.
            queue.consumers.remove(chosen)
            queue.consumers.append(chosen)
            item = heapq.heappop(queue.heap)
            was_redelivered = item[1] in queue.redelivered
            queue.redelivered.discard(item[1])
            delivery = _Delivery(self, chosen, item, was_redelivered)
            chosen.channel.unacked += 1
            chosen.channel.deliveries.add(delivery)
            job = loop.create_task(chosen.handler(delivery))
            self._handler_tasks.add(job)
            job.add_done_callback(self._handler_tasks.discard)

    # events
    async def publish_event(self, event: Event) -> None:
        self._require()
        body = self._check_size(event.encode())
        for queue in self._event_queues:
            if queue.matches(event.kind):
                queue.items.put_nowait(body)

    async def subscribe_events(
        self,
        handler: EventHandler,
        *,
        patterns: Sequence[str] | None = None,
        before_ack: BeforeAck | None = None,
    ) -> Subscription:
        self._require()
        if patterns is None:
            queue = self._orchestrator_queue
            assert queue is not None
            if queue.worker is not None:
                raise RuntimeError("the orchestrator events queue already has a consumer")

            def transient() -> None:
                return None
        else:
            queue = _MessageQueue(patterns)
            self._event_queues.append(queue)

            def transient() -> None:
                if queue in self._event_queues:
                    self._event_queues.remove(queue)

        sub = _Subscription(self, queue, handler, parse_event, transient, before_ack)
        self._subscriptions.add(sub)
        return sub

    # control
    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        self._require()
        body = self._check_size(command.encode())
        if agent_id is None:
            targets = [q for queues in self._control.values() for q in queues]
        else:
            targets = self._control.get(agent_id, [])
        for queue in targets:
            queue.items.put_nowait(body)

    async def subscribe_control(self, agent_id: str, handler: ControlHandler) -> Subscription:
        self._require()
        queue = _MessageQueue([])
        self._control.setdefault(agent_id, []).append(queue)

        def transient() -> None:
            queues = self._control.get(agent_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._control.pop(agent_id, None)

        sub = _Subscription(self, queue, handler, parse_control, transient)
        self._subscriptions.add(sub)
        return sub

    # requests of other services
    async def serve_requests(self, handler: RequestHandler) -> Subscription:
        self._require()
        if self._request_server is not None:
            raise RuntimeError("the request queue already has a server")
        server = self._request_server = _RequestServer(self, handler)
        self._subscriptions.add(server)
        return server

    async def request(
        self, message: WireMessage, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Reply:
        self._require()
        loop = asyncio.get_running_loop()
        body = self._check_size(message.encode())
        request = _Request(body, loop.create_future(), loop.time() + timeout)
        self._requests.put_nowait(request)
        try:
            reply = await asyncio.wait_for(asyncio.shield(request.reply), timeout)
        except TimeoutError:
            request.reply.cancel()
            raise NoReply(self._no_reply(timeout)) from None
        return parse_reply(reply)
