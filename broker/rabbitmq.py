"""``RabbitMQBus``: the communication bus on RabbitMQ, through aio-pika.

Everything the design card lists as a trap is handled here and nowhere else:
durable exchanges and queues, persistent messages, publisher confirms with
``mandatory`` task publishes, a robust connection whose first connect and
whose publishes are retried (tenacity) because aio-pika replays neither,
classic priority queues, a channel-wide prefetch per agent, consumer
priorities, a short AMQP heartbeat, and our own references to channels.
aio-pika and aiormq exceptions are converted here and never leak out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from yarl import URL

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
    default_broker_url,
)
from .errors import (
    BusConnectionError,
    BusError,
    BusNotStarted,
    InvalidMessage,
    MessageTooLarge,
    NoReply,
    TopologyMismatch,
    TopologyMissing,
    UnroutableMessage,
)
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
from .settings import BusSettings, redact_url
from .topology import (
    ANY_CAPABILITY_KEY,
    DIRECT_REPLY_TO,
    RETRY_TIERS_MS,
    Topology,
    retry_tier_ms,
)

log = logging.getLogger(__name__)

_TRANSIENT = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ChannelInvalidStateError,
    RuntimeError,  # aio-pika: "Connection closed" / "channel closed" while reconnecting
)
_TRANSIENT_EVENTS = frozenset({"task.progress", "agent.heartbeat"})

PUBLISH_RETRY_SECONDS = 60.0
"""How long a publish keeps trying while the robust connection reconnects."""


class _RabbitDelivery(TaskDelivery):
    def __init__(self, bus: RabbitMQBus, message: AbstractIncomingMessage, queue_key: str) -> None:
        self._bus = bus
        self._message = message
        self.body = message.body
        self.queue_key = queue_key
        self.redelivered = bool(message.redelivered)

    async def _settle(self, op: Callable[[], Awaitable[Any]]) -> None:
        try:
            await op()
        except (ChannelInvalidStateError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            # The channel died: the broker requeues the message by itself and
            # it comes again; every handler is idempotent by (task, attempt).
            log.info("could not settle a delivery from %s (%s)", self.queue_key, exc)

    async def ack(self) -> None:
        await self._settle(self._message.ack)

    async def requeue(self) -> None:
        await self._settle(lambda: self._message.nack(requeue=True))

    async def dead_letter(self, reason: str) -> None:
        await self._bus._publish_dead(
            self.body,
            reason,
            source=self._bus.topology.task_queue(self.queue_key),
            message_id=self._message.message_id,
        )
        await self.ack()


class _RabbitTaskConsumer(TaskConsumer):
    def __init__(
        self,
        bus: RabbitMQBus,
        consumer_id: str,
        channel: AbstractChannel,
        handler: TaskHandler,
        prefetch: int,
    ) -> None:
        self._bus = bus
        self._id = consumer_id
        self._channel = channel
        self._handler = handler
        self._prefetch = prefetch
        self._detached = 0
        self._priority = 0
        self._queues: dict[str, tuple[AbstractQueue, str]] = {}
        self._parked: set[str] = set()
        """Keys not consumed while every place is held by detached tasks
        (a prefetch of 0 would mean no limit at all)."""
        self._lock = asyncio.Lock()
        self._paused = False
        """Set by ``pause`` (a stop): a step aside that ends then does not resume."""

    @property
    def queue_keys(self) -> frozenset[str]:
        return frozenset(self._queues)

    async def _start(self, key: str) -> None:
        queue = await self._bus._declare_task_queue_on(self._channel, key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._handler(_RabbitDelivery(self._bus, message, key))

        tag = await queue.consume(
            on_message,
            arguments={"x-priority": self._priority},
            consumer_tag=f"{self._id}:{key}:{uuid.uuid4().hex[:8]}",
        )
        self._queues[key] = (queue, tag)

    async def consume(self, queue_keys: Iterable[str], consumer_priority: int = 0) -> None:
        async with self._lock:
            self._paused = False
            try:
                if consumer_priority != self._priority:
                    # x-priority is fixed per consumer: re-consume under the new one.
                    self._priority = consumer_priority
                    for key, (queue, tag) in list(self._queues.items()):
                        await queue.cancel(tag)
                        del self._queues[key]
                        await self._start(key)
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
                try:
                    await entry[0].cancel(entry[1])
                except (aiormq.exceptions.AMQPError, ChannelInvalidStateError, RuntimeError):
                    pass
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
            for key, (queue, tag) in list(self._queues.items()):
                try:
                    await queue.cancel(tag)
                except (aiormq.exceptions.AMQPError, ChannelInvalidStateError, RuntimeError):
                    pass  # the channel is gone, and with it the consumer
                del self._queues[key]
            self._parked.clear()

    async def detach(self, delivery: TaskDelivery) -> None:
        async with self._lock:
            self._detached += 1
            room = self._prefetch - self._detached
            try:
                # Lower the limit before the ack, so that the ack lets nothing new in.
                if room >= 1:
                    await self._channel.set_qos(prefetch_count=room, global_=True)
                else:
                    for key, (queue, tag) in list(self._queues.items()):
                        await queue.cancel(tag)
                        del self._queues[key]
                        self._parked.add(key)
            except (aiormq.exceptions.AMQPError, ChannelInvalidStateError, RuntimeError) as exc:
                log.info("could not lower the prefetch of %s: %s", self._id, exc)
        await delivery.ack()

    async def reattach(self) -> None:
        async with self._lock:
            self._detached = max(0, self._detached - 1)
            room = self._prefetch - self._detached
            try:
                await self._channel.set_qos(prefetch_count=room, global_=True)
                if self._parked:
                    parked, self._parked = self._parked, set()
                    for key in parked:
                        if key not in self._queues:
                            await self._start(key)
            except (aiormq.exceptions.AMQPError, ChannelInvalidStateError, RuntimeError) as exc:
                log.info("could not raise the prefetch of %s: %s", self._id, exc)

    async def close(self) -> None:
        self._bus._subscriptions.discard(self)
        if not self._channel.is_closed:
            try:
                # Closing the channel hands every unacknowledged task back to its queue.
                await self._channel.close()
            except Exception as exc:
                log.debug("closing task channel: %s", exc)


ACK_BATCH = 64
"""Events handled before one cumulative ack (the prefetch is larger)."""


class _RabbitSubscription(Subscription):
    """Deliveries go through a local queue to one worker: in order, one at a time."""

    def __init__(
        self,
        bus: RabbitMQBus,
        channel: AbstractChannel,
        queue: AbstractQueue,
        handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        dead_letter_failures: bool = True,
        before_ack: BeforeAck | None = None,
    ) -> None:
        self._bus = bus
        self._before_ack = before_ack
        self._dead_letter_failures = dead_letter_failures
        self._channel = channel
        self._queue = queue
        self._handle = handle
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def start(self) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self._inbox.put_nowait(message)

        await self._queue.consume(on_message)

    async def _run(self) -> None:
        unacked = 0
        while True:
            message = await self._inbox.get()
            try:
                await self._handle(message)
            except asyncio.CancelledError:
                raise
            except InvalidMessage as exc:
                await self._bus._publish_dead(message.body, str(exc), source=self._queue.name)
            except Exception as exc:  # a handler bug must not stop the subscription
                log.exception("handler of %s failed", self._queue.name)
                if self._dead_letter_failures:  # never for dead letters: that would loop
                    await self._bus._publish_dead(
                        message.body, f"handler error: {exc!r}", source=self._queue.name
                    )
            # Handled in order, so one ack with multiple=True settles all before it:
            # ack when the inbox runs dry or every ACK_BATCH messages.
            unacked += 1
            if self._inbox.empty() or unacked >= ACK_BATCH:
                if self._before_ack is not None:
                    try:
                        await self._before_ack()
                    except Exception:
                        # Unacknowledged, they come back if we die; the next ack covers them.
                        log.exception("before-ack hook of %s failed", self._queue.name)
                        continue
                unacked = 0
                try:
                    await message.ack(multiple=True)
                except (ChannelInvalidStateError, aiormq.exceptions.AMQPError, RuntimeError):
                    pass  # they come again; handlers are idempotent

    async def close(self) -> None:
        self._bus._subscriptions.discard(self)
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as exc:
                log.debug("closing subscription channel: %s", exc)


class RabbitMQBus(CommunicationBus):
    """The bus on a RabbitMQ broker.

    ``broker_url`` (or ``ORCHESTRATOR_BROKER_URL``) defaults to the local
    broker, ``amqp://guest:guest@127.0.0.1:5672/``. ``connection_name`` shows
    in the management UI; the agent runtime sets it to the agent's id.
    ``declare_topology`` False is for clients that only send requests: they
    connect without declaring anything, so a mistyped prefix leaves nothing
    behind on the broker.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        settings: BusSettings | None = None,
        connection_name: str | None = None,
        declare_topology: bool = True,
    ) -> None:
        super().__init__(broker_url, settings=settings)
        self.declare_topology = declare_topology
        if not self.settings.broker_url:
            self.settings = self.settings.model_copy(update={"broker_url": default_broker_url()})
        self.connection_name = connection_name or f"{self.settings.prefix}:client"
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._declared: set[str] = set()
        self._subscriptions: set[Subscription] = set()
        self._rpc_channel: AbstractChannel | None = None
        self._rpc_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        """Requests waiting for their reply, by correlation id."""

    @property
    def address(self) -> str:
        return redact_url(self.settings.broker_url or "")

    def _url(self) -> str:
        url = URL(self.settings.broker_url or default_broker_url())
        if "heartbeat" not in url.query:
            url = url.update_query(heartbeat=self.settings.amqp_heartbeat)
        if "reconnect_interval" not in url.query:
            url = url.update_query(reconnect_interval=self.settings.reconnect_interval)
        return str(url)

    # lifecycle -------------------------------------------------------------
    async def connect(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            return
        url = self._url()
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.connect_attempts),
                wait=wait_exponential(multiplier=0.2, max=2),
                retry=retry_if_exception_type(_TRANSIENT),
                reraise=True,
            ):
                with attempt:
                    self._connection = await aio_pika.connect_robust(
                        url,
                        timeout=self.settings.connect_timeout,
                        client_properties={"connection_name": self.connection_name},
                    )
        except Exception as exc:
            self._connection = None
            detail = str(exc)
            password = URL(url).password
            if password:
                detail = detail.replace(password, "***")
            raise BusConnectionError(
                f"cannot reach RabbitMQ at {self.address}: {type(exc).__name__}: {detail}"
            ) from None
        try:
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._exchanges[""] = self._channel.default_exchange  # replies go to reply_to
            if self.declare_topology:
                await self._declare_fixed(self._channel)
        except BaseException:
            await self._connection.close()
            self._connection = None
            raise

    async def _declare_fixed(self, channel: AbstractChannel) -> None:
        t = self.topology
        kinds = {
            t.tasks_exchange: aio_pika.ExchangeType.DIRECT,
            t.events_exchange: aio_pika.ExchangeType.TOPIC,
            t.control_exchange: aio_pika.ExchangeType.DIRECT,
            t.dead_exchange: aio_pika.ExchangeType.FANOUT,
        }
        try:
            for name, kind in kinds.items():
                self._exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
            events = await channel.declare_queue(
                t.orchestrator_events_queue, durable=True, arguments={"x-queue-type": "classic"}
            )
            await events.bind(t.events_exchange, "task.#")
            await events.bind(t.events_exchange, "agent.#")
            dead = await channel.declare_queue(
                t.dead_queue, durable=True, arguments=t.dead_queue_arguments()
            )
            await dead.bind(t.dead_exchange, "")
            mine = await channel.declare_queue(
                t.orchestrator_dead_queue, durable=True, arguments={"x-queue-type": "classic"}
            )
            await mine.bind(t.dead_exchange, "")
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"RabbitMQ already has '{t.prefix}' names declared differently: {exc}"
            ) from None
        await self.declare_task_queue(ANY_CAPABILITY_KEY)

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        for waiting in self._pending.values():
            waiting.cancel()
        self._pending.clear()
        self._rpc_channel = None
        connection, self._connection = self._connection, None
        self._channel = None
        self._exchanges.clear()
        self._declared.clear()
        if connection is not None and not connection.is_closed:
            await connection.close()

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    @property
    def link_up(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BusNotStarted("the bus is not connected: call connect() first")
        return self._connection

    # publishing ------------------------------------------------------------
    async def _publish(
        self,
        exchange: str,
        body: bytes,
        routing_key: str,
        *,
        mandatory: bool = False,
        persistent: bool = True,
        **properties: Any,
    ) -> None:
        self._require()
        self._check_size(body)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            **properties,
        )

        async def publish_once() -> None:
            if self._connection is None:
                raise BusNotStarted("the bus was closed")
            await self._exchanges[exchange].publish(
                message, routing_key=routing_key, mandatory=mandatory, timeout=10
            )

        try:
            try:
                await publish_once()  # the common case, without the retry machinery's cost
            except _TRANSIENT:
                # The robust connection is reconnecting: publish again until it is back.
                async for attempt in AsyncRetrying(
                    stop=stop_after_delay(PUBLISH_RETRY_SECONDS),
                    wait=wait_exponential(multiplier=0.1, max=2),
                    retry=retry_if_exception_type(_TRANSIENT),
                    reraise=True,
                ):
                    with attempt:
                        await publish_once()
        except aiormq.exceptions.PublishError:
            raise UnroutableMessage(
                f"no queue took the message for {exchange!r} / {routing_key!r}"
            ) from None
        except BusError:
            raise
        except _TRANSIENT as exc:
            raise BusConnectionError(
                f"cannot publish to RabbitMQ at {self.address}: {exc}"
            ) from None
        except aiormq.exceptions.AMQPError as exc:
            raise BusError(f"publish to {exchange!r} failed: {exc}") from None

    async def _publish_dead(
        self, body: bytes, reason: str, *, source: str, message_id: str | None = None
    ) -> None:
        log.warning("dead-lettering a message from %s: %s", source, reason)
        try:
            await self._publish(
                self.topology.dead_exchange,
                body[: self.settings.max_message_bytes],
                "",
                headers={"x-reason": reason[:1000], "x-source-queue": source},
                message_id=message_id,
            )
        except BusError as exc:
            log.error("could not dead-letter a message from %s: %s", source, exc)

    # tasks -----------------------------------------------------------------
    async def _declare_task_queue_on(self, channel: AbstractChannel, key: str) -> AbstractQueue:
        try:
            queue = await channel.declare_queue(
                self.topology.task_queue(key),
                durable=True,
                arguments=Topology.task_queue_arguments(),
            )
            await queue.bind(self.topology.tasks_exchange, key)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"queue {self.topology.task_queue(key)!r} exists with other arguments: {exc}"
            ) from None
        return queue

    async def declare_task_queue(self, queue_key: str) -> None:
        if queue_key in self._declared:
            return
        self._require()
        assert self._channel is not None
        await self._declare_task_queue_on(self._channel, queue_key)
        self._declared.add(queue_key)

    async def publish_task(
        self, message: TaskMessage, *, queue_key: str, priority: int, delay: float = 0.0
    ) -> None:
        await self.declare_task_queue(queue_key)
        exchange, extra = self.topology.tasks_exchange, {}
        if delay > 0:
            # Through a TTL queue that dead-letters to the tasks exchange under
            # the message's own routing key (the capability key).
            tier = retry_tier_ms(delay)
            await self._declare_retry_tier(tier)
            exchange = self.topology.retry_exchange(tier)
            extra["expiration"] = min(delay, tier / 1000)
        await self._publish(
            exchange,
            message.encode(),
            queue_key,
            mandatory=True,
            priority=priority,
            message_id=f"{message.task_id}:{message.attempt}",
            type=message.kind,
            **extra,
        )

    async def _declare_retry_tier(self, tier_ms: int) -> None:
        name = self.topology.retry_exchange(tier_ms)
        if name in self._exchanges:
            return
        assert self._channel is not None
        try:
            exchange = await self._channel.declare_exchange(
                name, aio_pika.ExchangeType.FANOUT, durable=True
            )
            queue = await self._channel.declare_queue(
                self.topology.retry_queue(tier_ms),
                durable=True,
                arguments=self.topology.retry_queue_arguments(tier_ms),
            )
            await queue.bind(exchange, "")
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"retry tier {name!r} exists with other arguments: {exc}"
            ) from None
        self._exchanges[name] = exchange

    async def open_task_consumer(
        self, consumer_id: str, *, prefetch: int, handler: TaskHandler
    ) -> TaskConsumer:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        # global_=True: one limit across all the queues this agent consumes.
        await channel.set_qos(prefetch_count=prefetch, global_=True)
        consumer = _RabbitTaskConsumer(self, consumer_id, channel, handler, prefetch)
        self._subscriptions.add(consumer)
        return consumer

    # events ----------------------------------------------------------------
    async def publish_event(self, event: Event) -> None:
        await self._publish(
            self.topology.events_exchange,
            event.encode(),
            event.kind,
            # Progress and heartbeats are superseded by the next one: not worth the disk.
            persistent=event.kind not in _TRANSIENT_EVENTS,
            type=event.kind,
        )

    async def subscribe_events(
        self,
        handler: EventHandler,
        *,
        patterns: Sequence[str] | None = None,
        before_ack: BeforeAck | None = None,
    ) -> Subscription:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=512)
        if patterns is None:
            queue = await channel.declare_queue(
                self.topology.orchestrator_events_queue,
                durable=True,
                arguments={"x-queue-type": "classic"},
            )
        else:
            queue = await channel.declare_queue(
                f"{self.topology.prefix}.monitor.{uuid.uuid4().hex[:12]}",
                exclusive=True,
                auto_delete=True,
            )
            try:
                for pattern in patterns:
                    await queue.bind(self.topology.events_exchange, pattern)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # The broker closed the channel: nobody declared the events exchange.
                raise TopologyMissing(
                    f"no exchange {self.topology.events_exchange!r} on RabbitMQ at {self.address}"
                ) from None

        async def handle(message: AbstractIncomingMessage) -> None:
            await handler(parse_event(message.body))

        sub = _RabbitSubscription(self, channel, queue, handle, before_ack=before_ack)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    async def subscribe_dead_letters(
        self, handler: DeadLetterHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(
            self.topology.orchestrator_dead_queue,
            durable=True,
            arguments={"x-queue-type": "classic"},
        )

        async def handle(message: AbstractIncomingMessage) -> None:
            reason = (message.headers or {}).get("x-reason", "unknown")
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            await handler(DeadLetter(message.body, str(reason), message.message_id))

        sub = _RabbitSubscription(
            self, channel, queue, handle, dead_letter_failures=False, before_ack=before_ack
        )
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    async def queue_depth(self, queue_key: str) -> int:
        connection = self._require()
        # A passive declare of a missing queue closes its channel: use a throwaway one.
        channel = await connection.channel(publisher_confirms=False)
        try:
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(
                self.topology.task_queue(queue_key), passive=True
            )
            return declared.message_count or 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        except (aiormq.exceptions.AMQPError, ChannelInvalidStateError, RuntimeError) as exc:
            raise BusConnectionError(f"cannot read the depth of {queue_key!r}: {exc}") from None
        finally:
            if not channel.is_closed:
                await channel.close()

    # requests of other services ---------------------------------------------
    async def serve_requests(self, handler: RequestHandler) -> Subscription:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=64)
        try:
            queue = await channel.declare_queue(
                self.topology.rpc_queue, durable=True, arguments=Topology.rpc_queue_arguments()
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"queue {self.topology.rpc_queue!r} exists with other arguments: {exc}"
            ) from None

        async def handle(message: AbstractIncomingMessage) -> None:
            reply = await self._answer(handler, message.body)
            if not message.reply_to:
                if not reply.ok:  # nobody to tell: keep it for people to see
                    await self._publish_dead(message.body, reply.error.message, source=queue.name)
                return
            try:
                body = self._check_size(reply.encode())
            except MessageTooLarge as exc:
                body = Reply.failure("internal", f"reply too large: {exc}").encode()
            try:
                # Not mandatory: a client that gave up is no error of ours.
                await self._publish(
                    "",
                    body,
                    message.reply_to,
                    persistent=False,
                    correlation_id=message.correlation_id,
                    type=reply.kind,
                )
            except BusError as exc:
                log.warning("could not reply to %s: %s", message.reply_to, exc)

        sub = _RabbitSubscription(self, channel, queue, handle)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    async def _rpc(self) -> AbstractChannel:
        """The channel requests go out on; it consumes their direct replies.

        RabbitMQ sends a reply addressed to ``amq.rabbitmq.reply-to`` to the
        channel that published the request, if that channel consumes the
        pseudo-queue (no-ack): so consume first, then publish on the same one.
        """
        async with self._rpc_lock:
            if self._rpc_channel is None or self._rpc_channel.is_closed:
                connection = self._require()
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                # Declared (passively) so that the robust channel consumes it again
                # after a reconnect.
                replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
                await replies.consume(self._on_reply, no_ack=True)
                self._rpc_channel = channel
            return self._rpc_channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._pending.pop(message.correlation_id or "", None)
        if waiting is not None and not waiting.done():
            waiting.set_result(message.body)

    async def request(
        self, message: WireMessage, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Reply:
        body = self._check_size(message.encode())
        rpc_queue = self.topology.rpc_queue
        try:
            channel = await self._rpc()
        except aiormq.exceptions.AMQPError as exc:
            raise BusConnectionError(f"cannot open a channel for requests: {exc}") from None
        correlation_id = uuid.uuid4().hex
        waiting = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = waiting
        try:
            async with asyncio.timeout(timeout):
                try:
                    await channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                            reply_to=DIRECT_REPLY_TO,
                            correlation_id=correlation_id,
                            # Gone when we stop waiting: a later server does not act on it.
                            expiration=timeout,
                            type=getattr(message, "kind", None),
                        ),
                        routing_key=rpc_queue,
                        mandatory=True,
                    )
                except aiormq.exceptions.PublishError:
                    raise NoReply(
                        f"no queue {rpc_queue!r} on RabbitMQ at {self.address}: no orchestrator "
                        f"has served prefix {self.settings.prefix!r} there"
                    ) from None
                except _TRANSIENT as exc:
                    raise BusConnectionError(
                        f"cannot send a request to RabbitMQ at {self.address}: {exc}"
                    ) from None
                except aiormq.exceptions.AMQPError as exc:
                    raise BusError(f"request to {rpc_queue!r} failed: {exc}") from None
                reply = await waiting
        except NoReply:
            raise
        except TimeoutError:
            raise NoReply(self._no_reply(timeout)) from None
        finally:
            self._pending.pop(correlation_id, None)
        return parse_reply(reply)

    # control ---------------------------------------------------------------
    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        await self._publish(
            self.topology.control_exchange,
            command.encode(),
            agent_id or Topology.BROADCAST_KEY,
            persistent=False,
            type=command.kind,
        )

    async def subscribe_control(self, agent_id: str, handler: ControlHandler) -> Subscription:
        connection = self._require()
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(
            self.topology.agent_control_queue(agent_id), durable=False, auto_delete=True
        )
        await queue.bind(self.topology.control_exchange, agent_id)
        await queue.bind(self.topology.control_exchange, Topology.BROADCAST_KEY)

        async def handle(message: AbstractIncomingMessage) -> None:
            await handler(parse_control(message.body))

        sub = _RabbitSubscription(self, channel, queue, handle)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    # maintenance -------------------------------------------------------------
    async def delete_topology(self, queue_keys: Iterable[str] = ()) -> None:
        """Delete this prefix's fixed queues and exchanges and the given task queues.

        For tests and for tearing a deployment down; never called by normal operation.
        """
        connection = self._require()
        t = self.topology
        keys = set(queue_keys) | self._declared | {ANY_CAPABILITY_KEY}
        channel = await connection.channel()
        try:
            for name in [
                t.orchestrator_events_queue,
                t.dead_queue,
                t.orchestrator_dead_queue,
                t.rpc_queue,
                *(t.task_queue(k) for k in keys),
                *(t.retry_queue(tier) for tier in RETRY_TIERS_MS),
            ]:
                await channel.queue_delete(name)
            for name in (
                t.tasks_exchange,
                t.events_exchange,
                t.control_exchange,
                t.dead_exchange,
                *(t.retry_exchange(tier) for tier in RETRY_TIERS_MS),
            ):
                await channel.exchange_delete(name)
        finally:
            await channel.close()
        self._declared.clear()
