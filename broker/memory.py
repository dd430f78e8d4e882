"""``MemoryBus``: the in-process twin of the RabbitMQ bus.

It keeps the semantics that scheduling depends on (see ``broker.bus``):
priority queues, a prefetch shared across a consumer's queues, consumer
priorities with turn-taking, requeue on consumer loss, ordered topic
subscriptions, and a durable orchestrator queue that buffers events while no
one consumes it. Messages are routed as RabbitMQ routes them, by the
bindings of ``broker.topology`` (the same objects the RabbitMQ bus declares),
through the same retry tiers, and carry the same envelopes, with their
bodies encoded exactly as they would travel: size limits,
(de)serialisation and dead letters behave as on the real broker.

``join()`` waits until everything published has been handled, so that tests
can wait for a state instead of polling for it.

Identity: a bus publishes as its ``user`` (``guest`` unless told), stamped
on every message as RabbitMQ's ``user_id``; ``as_user(name)`` joins the same
in-process broker as another user, as a second connection with another login
would, so that tests of who may say what run on this bus too.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from .bus import (
    DEFAULT_REQUEST_TIMEOUT,
    BeforeAck,
    CommunicationBus,
    ControlHandler,
    DeadLetterHandler,
    EventHandler,
    Lease,
    RequestHandler,
    Subscription,
    TaskConsumer,
    TaskHandler,
)
from .envelope import DeadLetter, Envelope
from .errors import (
    BusNotStarted,
    NoReply,
    PublishRefused,
    QueueInUse,
    TopologyMissing,
    UnroutableMessage,
)
from .memory_consumers import ConsumerChannel, MemoryDelivery, MemoryTaskConsumer, next_consumer
from .memory_lease import MemoryLease
from .memory_queues import (
    DelayQueue,
    Item,
    KeptLetters,
    MemorySubscription,
    MessageQueue,
    PendingRequest,
    RequestServer,
    Router,
    Sink,
    TaskQueue,
)
from .memory_raw import RawClient
from .memory_refusing import RefusingQueue
from .messages import Control, Event, TaskMessage, WireMessage, parse_control, parse_event
from .routing import ANY_CAPABILITY_KEY
from .rpc import Reply, parse_reply
from .settings import BusSettings
from .topology import Declarations, Queue, topic_matches

__all__ = ["MemoryBus", "topic_matches"]

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Sink)

_Consuming = MemoryTaskConsumer | MemorySubscription | RequestServer
"""What consumes from this bus; each says whether it is still handling something."""


class MemoryBus(RawClient, CommunicationBus):
    """An in-process bus. Share one instance between the orchestrator and its agents."""

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        settings: BusSettings | None = None,
        user: str = "guest",
    ):
        super().__init__(broker_url, settings=settings)
        self._user = user
        self._root = self
        """The bus that made the in-process broker; ``as_user`` views share it."""
        self._own: set[_Consuming] = set()
        """What this connection consumes (``close`` ends these; the root's ends all)."""
        self._connected = False
        self._router = Router()
        self._exchanges = {e.name for e in self.topology.exchanges}
        self._queues: dict[str, Sink] = {}
        """The durable queues, by name: they outlive ``close``, as on a broker."""
        self._task_queues: dict[str, TaskQueue] = {}
        """The capability queues among them, by queue key."""
        self._subscriptions: set[_Consuming] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        """Delayed messages on their way out of a retry tier."""
        self._requests: asyncio.Queue[PendingRequest] = asyncio.Queue()
        self._request_server: RequestServer | None = None
        self._activity = asyncio.Event()
        """Set whenever something may have become idle: ``join`` looks again."""
        self._exclusive: set[str] = set()
        """Exclusive queues (agents' control queues) consumed now."""
        self.dead_letters: list[DeadLetter] = []
        """Every dead-lettered message, newest last (the ``<p>.dead`` queue)."""
        self._lease_holder: MemoryLease | None = None

    # identity ----------------------------------------------------------------
    @property
    def user(self) -> str:
        return self._user

    def as_user(self, user: str) -> MemoryBus:
        """Another connection to this in-process broker, logged in as ``user``:
        it shares every exchange, queue and consumer, and stamps its own
        publishes with ``user``. Connect it before use; closing it ends only
        what it consumes."""
        view = copy.copy(self)  # shallow: the broker's containers are shared
        view._user = user
        view._own = set()
        view._connected = False
        return view

    def _add(self, consuming: _Consuming) -> None:
        self._subscriptions.add(consuming)
        self._own.add(consuming)

    # lifecycle -------------------------------------------------------------
    async def connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        t = self.topology
        self._queue(ANY_CAPABILITY_KEY)
        self._declare(t.orchestrator_events(), RefusingQueue.of)
        self._declare(t.orchestrator_heartbeats(), lambda q: MessageQueue(q.name, q.max_length))
        self._declare(t.kept_dead_letters(), lambda q: KeptLetters(q, self.dead_letters))
        self._declare(t.orchestrator_dead_letters(), lambda q: MessageQueue(q.name))

    async def close(self) -> None:
        if self._root is not self:
            for sub in list(self._own):
                await sub.close()
            self._own.clear()
            self._connected = False
            self._poke()
            return
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._lease_holder is not None:
            await self._lease_holder.release()
        self._connected = False
        self._poke()

    @property
    def is_connected(self) -> bool:
        return self._connected

    def _require(self) -> None:
        if not self._connected:
            raise BusNotStarted("the bus is not connected: call connect() first")

    # routing -----------------------------------------------------------------
    def _declare(self, declarations: Declarations, make: Callable[[Queue], S]) -> S:
        """The durable queue of ``declarations``, made and bound on first use."""
        queue = declarations.queue
        sink = self._queues.get(queue.name)
        if sink is None:
            sink = self._queues[queue.name] = make(queue)
            self._exchanges.update(e.name for e in declarations.exchanges)
            self._router.bind(declarations, sink)
        return sink  # type: ignore[return-value]

    def _route(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = False
    ) -> None:
        if exchange not in self._exchanges:
            raise TopologyMissing(f"no exchange {exchange!r} on the in-process bus")
        sinks = self._router.route(exchange, routing_key)
        if not sinks and mandatory:
            raise UnroutableMessage(f"no queue took the message for {exchange!r} / {routing_key!r}")
        refused: PublishRefused | None = None
        for sink in sinks:
            try:
                sink.deliver(envelope, routing_key)
            except PublishRefused as exc:  # the others take it all the same, as on RabbitMQ
                refused = exc
        if refused is not None:
            raise refused

    def _dead_letter(
        self, body: bytes, reason: str, *, source: str, message_id: str | None = None
    ) -> None:
        envelope = Envelope.dead(
            body,
            reason,
            source=source,
            message_id=message_id,
            max_bytes=self.settings.max_message_bytes,
        )
        self._route(self.topology.dead_exchange, "", envelope.stamped(self._user))

    # draining ----------------------------------------------------------------
    async def join(self, *, delayed: bool = False) -> None:
        """Return once every message published so far, and every one their
        handling published in turn, has been handled and settled.

        Handled means: its task delivery acknowledged, requeued or
        dead-lettered and its handler returned; its event, command, dead
        letter or request handled, and ``before_ack`` done. A message waiting
        in a queue that nobody consumes stays there and does not hold ``join``
        up (as the orchestrator's queue keeps events while it is down). A
        detached task (acknowledged early) counts as handled. Delayed tasks
        are waited for only with ``delayed=True``: then ``join`` returns after
        they arrived and were handled. Work that a handler hands to a task of
        its own is not seen. Bound it with ``asyncio.timeout`` if a handler
        may never return.
        """
        while not self._idle(delayed):
            self._activity.clear()
            await self._activity.wait()

    def _idle(self, delayed: bool) -> bool:
        if (delayed and self._timers) or any(not job.done() for job in self._handler_tasks):
            return False  # (one cancelled before it began never let go of itself: done)
        if any(sub.busy for sub in self._subscriptions):
            return False
        return not any(
            isinstance(q, TaskQueue) and q.heap and q.consumers for q in self._queues.values()
        )

    def _poke(self) -> None:
        self._activity.set()

    # tasks -------------------------------------------------------------------
    def _queue(self, key: str) -> TaskQueue:
        # Looked up by key first: every publish asks, and a queue, once
        # declared, stays (the in-process bus deletes none), so its
        # declarations are made once, not per message.
        queue = self._task_queues.get(key)
        if queue is None:
            queue = self._task_queues[key] = self._declare(
                self.topology.capability(key), lambda q: TaskQueue(key, q, self._dispatch)
            )
        return queue

    async def declare_task_queue(self, queue_key: str) -> None:
        self._require()
        self._queue(queue_key)

    async def publish_task(
        self, message: TaskMessage, *, queue_key: str, priority: int, delay: float = 0.0
    ) -> None:
        self._require()
        envelope = Envelope.task(message, priority=priority).stamped(self._user)
        self._check_size(envelope.body)
        self._queue(queue_key)
        exchange = self.topology.tasks_exchange
        if delay > 0:
            tier, expiration = self._delay_tier(delay)
            self._declare(
                self.topology.retry_tier(tier), lambda q: DelayQueue(q, self._timers, self._arrive)
            )
            exchange, envelope = self.topology.retry_exchange(tier), envelope.expiring(expiration)
        self._route(exchange, queue_key, envelope, mandatory=True)

    def _arrive(self, exchange: str, routing_key: str, envelope: Envelope) -> None:
        """A delayed task's time is up: on to its queue (if it still has one)."""
        self._route(exchange, routing_key, envelope)
        self._poke()

    async def open_task_consumer(
        self, consumer_id: str, *, prefetch: int, handler: TaskHandler
    ) -> TaskConsumer:
        self._require()
        consumer = MemoryTaskConsumer(self, prefetch, handler)
        self._add(consumer)
        return consumer

    async def queue_depth(self, queue_key: str) -> int:
        self._require()
        queue = self._queues.get(self.topology.task_queue(queue_key))
        return len(queue.heap) if isinstance(queue, TaskQueue) else 0

    def _requeue(self, queue: TaskQueue, item: Item) -> None:
        heapq.heappush(queue.heap, item)
        queue.redelivered.add(item[1])
        self._dispatch(queue)

    def _after_settle(self, channel: ConsumerChannel) -> None:
        for consumer in list(channel.consumers):
            if not channel.has_room:
                break
            self._dispatch(consumer.queue)
        self._poke()

    def _dispatch(self, queue: TaskQueue) -> None:
        """Hand waiting messages to consumers with room, best priority first, in turns."""
        loop = asyncio.get_running_loop()
        while queue.heap and queue.consumers:
            chosen = next_consumer(queue.consumers)
            if chosen is None:
                break
            item = heapq.heappop(queue.heap)
            was_redelivered = item[1] in queue.redelivered
            queue.redelivered.discard(item[1])
            delivery = MemoryDelivery(self, chosen, item, was_redelivered)
            chosen.channel.unacked += 1
            chosen.channel.deliveries.add(delivery)
            self._handler_tasks.add(loop.create_task(self._handle(chosen.handler, delivery)))
        self._poke()

    async def _handle(self, handler: TaskHandler, delivery: MemoryDelivery) -> None:
        """A delivery's handler, in a task of its own (held in ``_handler_tasks``
        until it returns: ``join`` waits for it). It lets go of its task itself,
        as its last step, rather than in a done callback: one step of the event
        loop less per delivery."""
        try:
            await handler(delivery)
        finally:
            self._handler_tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._poke()

    # events ------------------------------------------------------------------
    async def publish_event(self, event: Event) -> None:
        self._require()
        envelope = Envelope.event(event).stamped(self._user)
        self._check_size(envelope.body)
        self._route(
            self.topology.events_exchange,
            self.topology.event_key(event.kind, event.agent_id),
            envelope,
        )

    async def subscribe_events(
        self,
        handler: EventHandler,
        *,
        patterns: Sequence[str] | None = None,
        before_ack: BeforeAck | None = None,
    ) -> Subscription:
        self._require()
        if patterns is None:
            queue = self._queues[self.topology.orchestrator_events_queue]
            assert isinstance(queue, MessageQueue)
            if queue.worker is not None:
                raise RuntimeError("the orchestrator events queue already has a consumer")
            on_close: Callable[[], None] = lambda: None  # noqa: E731 - durable: it stays bound
        else:
            declarations = self.topology.monitor(patterns, uuid.uuid4().hex[:12])
            queue = MessageQueue(declarations.queue.name, declarations.queue.max_length)
            self._router.bind(declarations, queue)

            def on_close() -> None:
                self._router.unbind(queue)

        sub = MemorySubscription(
            self,
            queue,
            handler,
            lambda envelope: parse_event(envelope.body),
            on_close=on_close,
            before_ack=before_ack,
        )
        self._add(sub)
        return sub

    async def subscribe_agent_events(
        self, agent_id: str, handler: EventHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        self._require()
        queue = self._declare(self.topology.agent_events(agent_id), RefusingQueue.of)
        if queue.worker is not None:
            raise RuntimeError(f"agent {agent_id}'s events queue already has a consumer")
        sub = MemorySubscription(
            self, queue, handler, lambda e: parse_event(e.body), before_ack=before_ack
        )
        self._add(sub)
        return sub

    async def delete_agent_events(self, agent_id: str) -> None:
        self._require()
        queue = self._queues.pop(self.topology.agent_events_queue(agent_id), None)
        if queue is not None:
            self._router.unbind(queue)
            self._poke()

    async def subscribe_heartbeats(self, handler: EventHandler) -> Subscription:
        self._require()
        queue = self._queues[self.topology.orchestrator_heartbeats_queue]
        assert isinstance(queue, MessageQueue)
        if queue.worker is not None:
            raise RuntimeError("the orchestrator heartbeat queue already has a consumer")
        sub = MemorySubscription(self, queue, handler, lambda e: parse_event(e.body))
        self._add(sub)
        return sub

    async def agent_connected(self, agent_id: str) -> bool:
        self._require()
        # Its control queue is consumed exactly while its bus holds the subscription.
        return self.topology.agent_control_queue(agent_id) in self._exclusive

    async def subscribe_dead_letters(
        self, handler: DeadLetterHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        self._require()
        queue = self._queues[self.topology.orchestrator_dead_queue]
        assert isinstance(queue, MessageQueue)
        if queue.worker is not None:
            raise RuntimeError("the orchestrator dead-letter queue already has a consumer")
        sub = MemorySubscription(
            self,
            queue,
            handler,
            lambda e: DeadLetter.of(e.body, e.headers, e.message_id, e.user_id),
            dead_letter_failures=False,
            before_ack=before_ack,
        )
        self._add(sub)
        return sub

    # control -----------------------------------------------------------------
    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        self._require()
        envelope = Envelope.control(command, self.leader).stamped(self._user)
        self._check_size(envelope.body)
        key = self.topology.control_key(agent_id)
        self._route(self.topology.control_exchange, key, envelope)

    async def subscribe_control(self, agent_id: str, handler: ControlHandler) -> Subscription:
        self._require()
        declarations = self.topology.agent_control(agent_id)
        name = declarations.queue.name
        if name in self._exclusive:
            # As RabbitMQ refuses a second connection an exclusive queue (RESOURCE_LOCKED).
            raise QueueInUse(f"queue {name!r} is exclusive to another consumer")
        queue = MessageQueue(name)
        self._router.bind(declarations, queue)
        self._exclusive.add(name)

        def on_close() -> None:
            self._router.unbind(queue)
            self._exclusive.discard(name)

        sub = MemorySubscription(
            self, queue, handler, lambda envelope: parse_control(envelope.body), on_close=on_close
        )
        self._add(sub)
        return sub

    # leadership ----------------------------------------------------------------
    def lease(self, holder: str) -> Lease:
        return MemoryLease(self._root, holder)

    # requests of other services ------------------------------------------------
    async def serve_requests(self, handler: RequestHandler) -> Subscription:
        self._require()
        root = self._root
        if root._request_server is not None:
            raise RuntimeError("the request queue already has a server")
        server = root._request_server = RequestServer(self, handler)
        self._add(server)
        return server

    async def request(
        self, message: WireMessage, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Reply:
        self._require()
        loop = asyncio.get_running_loop()
        body = self._check_size(message.encode())
        request = PendingRequest(body, loop.create_future(), loop.time() + timeout)
        self._requests.put_nowait(request)
        try:
            reply = await asyncio.wait_for(asyncio.shield(request.reply), timeout)
        except TimeoutError:
            request.reply.cancel()
            raise NoReply(self._no_reply(timeout)) from None
        return parse_reply(reply)
