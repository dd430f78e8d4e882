"""The queues of the in-process bus and their consumers.

What RabbitMQ does inside the broker is done here, for ``MemoryBus``:
priority queues, requeue on consumer loss, TTL queues that dead-letter to
another exchange, a length-limited queue of kept dead letters, and ordered
queues consumed by one handler at a time. Which consumer of a task queue
gets a message (consumer priorities, turn-taking, a prefetch shared across
a consumer's queues) is ``broker.memory_consumers``. Each queue is
made from the ``broker.topology`` value object it stands for, and reads how
to behave from that object's arguments. Messages are the envelopes the bus
publishes, with their bodies encoded exactly as they would travel.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .bus import CLOSE_WAIT, BeforeAck, Subscription
from .declarations import Binding, Declarations, Queue
from .envelope import DeadLetter, Envelope, Sender, handling_from
from .errors import InvalidMessage
from .rpc import RequestHandler, answer

if TYPE_CHECKING:
    from .memory import MemoryBus
    from .memory_consumers import QueueConsumer

log = logging.getLogger(__name__)

_seq = itertools.count()

Item = tuple[int, int, Envelope]
"""(-priority, arrival, envelope): heap order is priority, then arrival."""


class Sink(Protocol):
    """Where a binding takes a message: one queue."""

    def deliver(self, envelope: Envelope, routing_key: str) -> None: ...

    def purge(self) -> int:
        """Drop the messages waiting (not those delivered); how many there were."""
        ...


# --- task queues --------------------------------------------------------------------


class TaskQueue:
    """A priority queue of tasks (``x-max-priority``) for one capability key."""

    def __init__(self, key: str, queue: Queue, on_arrival: Callable[[TaskQueue], None]) -> None:
        self.key = key
        self.name = queue.name
        self.max_priority = queue.max_priority or 0
        self.heap: list[Item] = []
        self.consumers: deque[QueueConsumer] = deque()
        self.redelivered: set[int] = set()
        self._on_arrival = on_arrival

    def push(self, priority: int, body: bytes, message_id: str | None = None) -> None:
        """Put a message in without handing it to anyone yet."""
        self._put(Envelope(body, message_id=message_id, priority=priority))

    def _put(self, envelope: Envelope) -> None:
        priority = max(0, min(envelope.priority or 0, self.max_priority))  # as RabbitMQ does
        heapq.heappush(self.heap, (-priority, next(_seq), envelope))

    def deliver(self, envelope: Envelope, routing_key: str) -> None:
        self._put(envelope)
        self._on_arrival(self)

    def purge(self) -> int:
        count = len(self.heap)
        self.heap.clear()
        self.redelivered.clear()
        return count


# --- TTL queues and kept dead letters -------------------------------------------------


class DelayQueue:
    """A TTL queue (``x-message-ttl``) that dead-letters each message, under its
    own routing key, to ``x-dead-letter-exchange`` once its time is up.

    Each message leaves at its own expiration (or the queue's TTL, if that is
    shorter): RabbitMQ may hold a short one behind a longer one at the head of
    the queue, but never past the queue's TTL, which is what callers rely on.
    """

    def __init__(
        self,
        queue: Queue,
        timers: set[asyncio.TimerHandle],
        route: Callable[[str, str, Envelope], None],
    ) -> None:
        assert queue.message_ttl_ms is not None and queue.dead_letter_exchange is not None
        self._ttl = queue.message_ttl_ms / 1000
        self._to = queue.dead_letter_exchange
        self._timers = timers
        """The bus's: every delayed message on its way, in any tier."""
        self._waiting: set[asyncio.TimerHandle] = set()
        self._route = route

    def deliver(self, envelope: Envelope, routing_key: str) -> None:
        wait = self._ttl if envelope.expiration is None else min(envelope.expiration, self._ttl)

        def expire() -> None:
            self._timers.discard(timer)
            self._waiting.discard(timer)
            self._route(self._to, routing_key, envelope.expiring(None))

        timer = asyncio.get_running_loop().call_later(wait, expire)
        self._timers.add(timer)
        self._waiting.add(timer)

    def purge(self) -> int:
        waiting = [t for t in self._waiting if not t.cancelled()]
        for timer in self._waiting:
            timer.cancel()
            self._timers.discard(timer)
        self._waiting.clear()
        return len(waiting)


class KeptLetters:
    """The dead letters kept for people: a list, newest last, as long as ``x-max-length``."""

    def __init__(self, queue: Queue, letters: list[DeadLetter]) -> None:
        self._max_length = queue.max_length
        self.letters = letters

    def deliver(self, envelope: Envelope, routing_key: str) -> None:
        letter = DeadLetter.of(
            envelope.body, envelope.headers, envelope.message_id, envelope.user_id
        )
        log.warning("dead-lettered a message: %s", letter.reason)
        self.letters.append(letter)
        if self._max_length is not None:
            del self.letters[: -self._max_length]

    def purge(self) -> int:
        count = len(self.letters)
        self.letters.clear()
        return count


# --- ordered queues and their subscriptions --------------------------------------------


class MessageQueue:
    """An ordered queue of messages, consumed by one handler at a time; with
    ``max_length``, the oldest waiting is dropped for a new one (``drop-head``)."""

    def __init__(self, name: str, max_length: int | None = None) -> None:
        self.name = name
        self.max_length = max_length
        self.items: asyncio.Queue[Envelope] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.dropped = 0

    def deliver(self, envelope: Envelope, routing_key: str) -> None:
        if self.max_length is not None and self.items.qsize() >= self.max_length:
            self.items.get_nowait()
            self.dropped += 1
        self.items.put_nowait(envelope)

    def purge(self) -> int:
        count = 0
        while not self.items.empty():
            self.items.get_nowait()
            count += 1
        return count


class MemorySubscription(Subscription):
    def __init__(
        self,
        bus: MemoryBus,
        queue: MessageQueue,
        handler: Callable[[Any], Awaitable[None]],
        parse: Callable[[Envelope], Any],
        *,
        on_close: Callable[[], None] = lambda: None,
        dead_letter_failures: bool = True,
        before_ack: BeforeAck | None = None,
    ) -> None:
        self._bus = bus
        self._queue = queue
        self._on_close = on_close
        self._dead_letter_failures = dead_letter_failures
        self._before_ack = before_ack
        self._handling = False
        self._idle = asyncio.Event()
        """Set while no message is being handled (``close`` lets one finish, as on RabbitMQ)."""
        self._idle.set()
        queue.worker = asyncio.get_running_loop().create_task(self._run(handler, parse))

    @property
    def busy(self) -> bool:
        """A message waits for its handler, or the handler runs."""
        return self._handling or not self._queue.items.empty()

    async def _run(self, handler: Callable[[Any], Awaitable[None]], parse) -> None:
        source = self._queue.name
        while True:
            envelope = await self._queue.items.get()
            self._handling = True
            self._idle.clear()
            try:
                with handling_from(Sender.of(envelope.user_id, envelope.headers)):
                    await handler(parse(envelope))
            except asyncio.CancelledError:
                raise
            except InvalidMessage as exc:
                self._bus._dead_letter(envelope.body, str(exc), source=source)
            except Exception as exc:  # a handler bug must not stop the subscription
                log.exception("handler of %s failed", source)
                if self._dead_letter_failures:  # never for dead letters: that would loop
                    self._bus._dead_letter(envelope.body, f"handler error: {exc!r}", source=source)
            # Where RabbitMQ would send its cumulative ack: when the queue runs dry.
            if self._before_ack is not None and self._queue.items.empty():
                try:
                    await self._before_ack()
                except Exception:
                    log.exception("before-ack hook of %s failed", source)
            self._handling = False
            self._idle.set()
            self._bus._poke()

    async def close(self) -> None:
        worker = self._queue.worker
        if worker is not None and worker is not asyncio.current_task():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_WAIT)
        self._queue.worker = None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        self._handling = False
        self._on_close()
        self._bus._subscriptions.discard(self)
        self._bus._poke()


@dataclass(eq=False)
class PendingRequest:
    body: bytes
    reply: asyncio.Future[bytes]
    expires: float
    """Loop time after which the client has given up: the server skips it."""


class RequestServer(Subscription):
    """Takes requests from the bus's request queue, one at a time, in order."""

    def __init__(self, bus: MemoryBus, handler: RequestHandler) -> None:
        self._bus = bus
        self._handling = False
        self._worker = asyncio.get_running_loop().create_task(self._run(handler))

    @property
    def busy(self) -> bool:
        return self._handling or not self._bus._requests.empty()

    async def _run(self, handler: RequestHandler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = await self._bus._requests.get()
            # One that expired while it waited is skipped, as on RabbitMQ.
            if not request.reply.done() and loop.time() <= request.expires:
                self._handling = True
                body = self._bus._reply_body(await answer(handler, request.body))
                if not request.reply.done():
                    request.reply.set_result(body)
                self._handling = False
            self._bus._poke()

    async def close(self) -> None:
        root = self._bus._root
        if root._request_server is self:
            root._request_server = None
        self._bus._subscriptions.discard(self)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._handling = False
        self._bus._poke()


class Router:
    """The exchanges of the in-process bus: which queues each binding feeds.

    Every publish asks where its routing key goes, and the answer changes only
    when a binding does: so each (exchange, routing key) is matched against the
    bindings once, and the answer kept until the next ``bind`` or ``unbind``
    (a topic exchange's patterns would otherwise be matched, word by word, for
    every binding of every event). The keys are bounded by what the bus routes
    (queue keys, event kinds times agent ids, control keys); the cache is
    emptied past ``ROUTE_CACHE`` entries all the same."""

    ROUTE_CACHE = 4096

    def __init__(self) -> None:
        self._routes: dict[str, list[tuple[Binding, Sink]]] = {}
        self._cache: dict[tuple[str, str], tuple[Sink, ...]] = {}

    def bind(self, declarations: Declarations, sink: Sink) -> None:
        for binding in declarations.bindings:
            self._routes.setdefault(binding.exchange.name, []).append((binding, sink))
        self._cache.clear()

    def unbind(self, sink: Sink) -> None:
        for exchange, routes in self._routes.items():
            self._routes[exchange] = [(b, s) for b, s in routes if s is not sink]
        self._cache.clear()

    def route(self, exchange: str, routing_key: str) -> tuple[Sink, ...]:
        """The queues a message reaches, each once, even if several of its bindings match."""
        key = (exchange, routing_key)
        sinks = self._cache.get(key)
        if sinks is None:
            if len(self._cache) >= self.ROUTE_CACHE:
                self._cache.clear()
            sinks = self._cache[key] = self._match(exchange, routing_key)
        return sinks

    def _match(self, exchange: str, routing_key: str) -> tuple[Sink, ...]:
        sinks: list[Sink] = []
        for binding, sink in self._routes.get(exchange, ()):
            if binding.matches(routing_key) and not any(s is sink for s in sinks):
                sinks.append(sink)
        return tuple(sinks)
