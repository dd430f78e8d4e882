"""``RabbitMQBus``: the communication bus on RabbitMQ, through aio-pika.

Everything the design card lists as a trap is handled by this bus and its
modules, and nowhere else: durable exchanges and queues and persistent
messages (``broker.topology``, ``broker.envelope``), publisher confirms with
``mandatory`` task publishes retried across reconnects
(``rabbitmq_publish``), a robust connection whose first connect is retried
and a short AMQP heartbeat (``rabbitmq_link``), classic priority queues
declared from the topology's value objects (``rabbitmq_declare``), a
channel-wide prefetch per agent and consumer priorities
(``rabbitmq_consume``), ordered subscriptions (``rabbitmq_subscription``), the
agents' events queues consumed on a few shared channels
(``rabbitmq_shared``), acks coalesced per channel, never past a delivery not
handled (``rabbitmq_acks``), direct reply-to for requests (``rabbitmq_rpc``), and
our own references to channels. aio-pika and aiormq exceptions are converted
in those modules and never leak out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

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
    default_broker_url,
)
from .envelope import Envelope
from .errors import BusConnectionError, BusNotStarted
from .messages import Control, Event, TaskMessage, WireMessage, parse_control
from .rabbitmq_consume import ACK_BATCH, RabbitTaskConsumer, dead_letter_of
from .rabbitmq_declare import Declarer, QueueUnavailable, delete
from .rabbitmq_lease import RabbitLease
from .rabbitmq_legacy import drain_legacy_events
from .rabbitmq_link import CHANNEL_GONE, amqp_url, close_callbacks_done, open_connection
from .rabbitmq_probe import (
    DeclareMode,
    control_queue_lives,
    declare_mode,
    queue_depth,
    throwaway_channel,
)
from .rabbitmq_publish import PUBLISH_RETRY_SECONDS, Publisher
from .rabbitmq_rpc import RpcClient, request_server
from .rabbitmq_shared import SharedChannels, subscribe_shared
from .rabbitmq_subscription import EVENTS_PREFETCH, RabbitSubscription, events_of
from .routing import ANY_CAPABILITY_KEY
from .rpc import Reply, parse_reply
from .settings import BusSettings, redact_url
from .tls import client_context
from .topology import Declarations, Queue

__all__ = ["ACK_BATCH", "PUBLISH_RETRY_SECONDS", "DeclareMode", "RabbitMQBus"]


log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_SECONDS = 2.0
"""How often a connect tries again while a queue's cluster node is down."""


class RabbitMQBus(CommunicationBus):
    """The bus on a RabbitMQ broker.

    ``broker_url`` (or ``ORCHESTRATOR_BROKER_URL``) defaults to the local
    broker, ``amqp://guest:guest@127.0.0.1:5672/``. ``connection_name`` shows
    in the management UI; the agent runtime sets it to the agent's id.

    What it declares (``declare``, else ``settings.declare``): only the
    orchestrator declares the shared topology (``all``: the exchanges and
    queues of ``Topology.fixed()`` when it connects, task queues and retry
    tiers as it uses them). Agents, clients and monitors (``own``) declare
    only their own, exclusive, queues (an agent's control queue, a monitor's
    queue) and check the rest with passive declares, which need no
    permission: when it connects, that the fixed topology exists, else a
    ``TopologyMissing`` saying to start the orchestrator first. ``none``
    (``declare_topology`` False, for clients that only send requests) checks
    nothing when it connects, so a mistyped prefix leaves nothing behind.
    Unset: ``all`` if the user may declare it, else ``own`` (so that an agent
    with an agent's permissions starts without being told).
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        settings: BusSettings | None = None,
        connection_name: str | None = None,
        declare_topology: bool = True,
        declare: DeclareMode | None = None,
    ) -> None:
        super().__init__(broker_url, settings=settings)
        self.declare_topology = declare_topology and declare != "none"
        self.declare_mode: DeclareMode | None = (
            declare or (None if declare_topology else "none") or self.settings.declare
        )
        """As asked; ``declares`` is what the bus does once connected."""
        self.declares: DeclareMode = self.declare_mode or "all"
        if not self.settings.broker_url:
            self.settings = self.settings.model_copy(update={"broker_url": default_broker_url()})
        self.connection_name = connection_name or f"{self.settings.prefix}:client"
        self._connection: AbstractRobustConnection | None = None
        self._main: Declarer | None = None
        """What is declared on the confirming channel, which every publish goes out on."""
        self._declared: set[str] = set()
        """Capability keys declared on this connection (``delete_topology`` deletes them)."""
        self._agent_events: set[str] = set()
        """Agent ids whose events queue this bus declared (``delete_topology`` too)."""
        self._subscriptions: set[Subscription] = set()
        self._agent_channels = SharedChannels(
            lambda: self._require().channel(publisher_confirms=False), EVENTS_PREFETCH
        )
        """The channels the agents' events queues are consumed on, many on each."""
        self._publisher = Publisher(
            lambda: self._main.exchanges if self._main is not None else None,
            self._check_size,
            self.address,
            self.user,  # a certificate's user is read now: a bad one fails before connecting
        )
        self._rpc = RpcClient(
            self._require,
            rpc_queue=self.topology.rpc_queue,
            requests_exchange=self.topology.requests_exchange,
            address=self.address,
            prefix=self.settings.prefix,
        )

    @property
    def address(self) -> str:
        return redact_url(self.settings.broker_url or "")

    # lifecycle -------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and declare (or check) the fixed topology.

        In a cluster whose node holding a classic queue of the fixed topology
        (``@any``) is down, that queue is unavailable, not missing: the
        connect tries again every ``UNAVAILABLE_RETRY_SECONDS`` until the node
        is back (a signal or a timeout cancels it), saying so each time.
        """
        while True:
            try:
                return await self._connect_once()
            except QueueUnavailable as exc:
                log.warning("%s: trying again in %s s", exc, UNAVAILABLE_RETRY_SECONDS)
                await asyncio.sleep(UNAVAILABLE_RETRY_SECONDS)

    async def _connect_once(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            return
        self._connection = await open_connection(
            amqp_url(self.settings, default_broker_url()),
            self.settings,
            connection_name=self.connection_name,
            address=self.address,
        )
        self._connection.reconnect_callbacks.add(self._relinked)
        try:
            self.declares = await self._declaring()
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._main = Declarer(channel, self.address, own_only=self.declares != "all")
            if self.declares == "all":
                await self._main.declare(self.topology.fixed())
                self._declared.add(ANY_CAPABILITY_KEY)
            elif self.declares == "own":
                # Passive: registers the exchanges to publish to, and they are
                # checked again (passively) when the robust channel reopens.
                await self._main.check(self.topology.fixed())
        except BaseException:
            await self._connection.close()
            self._connection = None
            self._main = None
            raise

    async def _declaring(self) -> DeclareMode:
        assert self._connection is not None
        return await declare_mode(
            self._connection, self.topology.fixed(), self.declare_mode, self.address
        )

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        self._agent_channels.clear()  # (closed with the connection)
        self._rpc.close()
        connection, self._connection = self._connection, None
        self._main = None
        self._declared.clear()
        if connection is not None and not connection.is_closed:
            await connection.close()
            await close_callbacks_done()

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    @property
    def link_up(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    @property
    def open_channels(self) -> int:
        """Channels open on the connection, as the management UI counts them."""
        transport = self._connection.transport if self._connection is not None else None
        return 0 if transport is None else len(transport.connection.channels)

    def _relinked(self, *_: Any) -> None:
        # aio-pika calls this once every channel, queue, binding and consumer is
        # restored after a reconnect.
        self.links += 1

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BusNotStarted("the bus is not connected: call connect() first")
        return self._connection

    def _main_declarer(self) -> Declarer:
        self._require()
        assert self._main is not None
        return self._main

    async def _own_channel(self, prefetch: int | None = None) -> Declarer:
        """A channel of its own for one consumer, to declare what it consumes on."""
        channel = await self._require().channel(publisher_confirms=False)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return Declarer(channel, self.address, own_only=self.declares != "all")

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def _subscribe(
        self,
        declarer: Declarer,
        declarations: Declarations,
        handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        check: bool = False,
        **options: Any,
    ) -> Subscription:
        """Declare (``check``: check passively) and consume ``declarations.queue``."""
        if check:
            await declarer.check(declarations)
        else:
            await declarer.declare(declarations)
        sub = RabbitSubscription(
            declarer.channel,
            declarer.queues[declarations.queue],
            handle,
            dead=self._publish_dead,
            on_close=self._forget,
            **options,
        )
        try:
            await sub.start()
        except BaseException:
            await sub.close()  # (its worker, and its channel unless shared)
            raise
        self._subscriptions.add(sub)
        return sub

    # publishing ------------------------------------------------------------
    async def _publish_dead(
        self, body: bytes, reason: str, source: str, message_id: str | None = None
    ) -> None:
        envelope = Envelope.dead(
            body,
            reason,
            source=source,
            message_id=message_id,
            max_bytes=self.settings.max_message_bytes,
        )
        await self._publisher.dead_letter(self.topology.dead_exchange, envelope, source)

    # tasks -----------------------------------------------------------------
    async def declare_task_queue(self, queue_key: str) -> None:
        if queue_key in self._declared:
            return
        await self._main_declarer().declare(self.topology.capability(queue_key))
        self._declared.add(queue_key)

    async def publish_task(
        self, message: TaskMessage, *, queue_key: str, priority: int, delay: float = 0.0
    ) -> None:
        await self.declare_task_queue(queue_key)
        exchange, envelope = self.topology.tasks_exchange, Envelope.task(message, priority=priority)
        if delay > 0:
            # Through a TTL queue that dead-letters to the tasks exchange under
            # the message's own routing key (the capability key).
            tier, expiration = self._delay_tier(delay)
            await self._declare_retry_tier(tier)
            exchange, envelope = self.topology.retry_exchange(tier), envelope.expiring(expiration)
        await self._publisher.publish(exchange, queue_key, envelope, mandatory=True)

    async def _declare_retry_tier(self, tier_ms: int) -> None:
        await self._main_declarer().declare(self.topology.retry_tier(tier_ms))

    async def open_task_consumer(
        self, consumer_id: str, *, prefetch: int, handler: TaskHandler
    ) -> TaskConsumer:
        declarer = await self._own_channel()
        # global_=True: one limit across all the queues this agent consumes.
        await declarer.channel.set_qos(prefetch_count=prefetch, global_=True)
        consumer = RabbitTaskConsumer(
            consumer_id,
            declarer,
            self.topology,
            handler,
            prefetch,
            dead=self._publish_dead,
            on_close=self._forget,
        )
        self._subscriptions.add(consumer)
        return consumer

    async def queue_depth(self, queue_key: str) -> int:
        return await queue_depth(self._require(), self.topology.task_queue(queue_key))

    # events ----------------------------------------------------------------
    async def publish_event(self, event: Event) -> None:
        await self._publisher.publish(
            self.topology.events_exchange,
            self.topology.event_key(event.kind, event.agent_id),
            Envelope.event(event),
        )

    async def subscribe_events(
        self,
        handler: EventHandler,
        *,
        patterns: Sequence[str] | None = None,
        before_ack: BeforeAck | None = None,
    ) -> Subscription:
        if patterns is None:
            declarations = self.topology.orchestrator_events()
        else:
            declarations = self.topology.monitor(patterns, uuid.uuid4().hex[:12])

        handle = events_of(handler)
        declarer = await self._own_channel(prefetch=EVENTS_PREFETCH)
        return await self._subscribe(declarer, declarations, handle, before_ack=before_ack)

    async def subscribe_agent_events(
        self, agent_id: str, handler: EventHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        """Consumed on a shared channel (``rabbitmq_shared``): a channel each would
        cap the agents followed at the connection's ``channel_max``."""

        handle = events_of(handler)
        self._agent_events.add(agent_id)
        declarations = self.topology.agent_events(agent_id)
        return await subscribe_shared(
            self, self._agent_channels, declarations, handle, before_ack, f"agent {agent_id!r}"
        )

    async def delete_agent_events(self, agent_id: str) -> None:
        queue = Queue(self.topology.agent_events_queue(agent_id))
        async with throwaway_channel(self._require()) as channel:
            try:
                await delete(channel, Declarations(queues=(queue,)))
            except CHANNEL_GONE as exc:
                what = f"cannot delete agent {agent_id!r}'s events"
                raise BusConnectionError(f"{what}: {exc}") from None
        self._agent_events.discard(agent_id)

    async def drain_legacy_events(
        self, handler: EventHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription | None:
        return await drain_legacy_events(self, handler, before_ack)

    async def subscribe_heartbeats(self, handler: EventHandler) -> Subscription:
        handle = events_of(handler)
        declarer = await self._own_channel(prefetch=EVENTS_PREFETCH)
        return await self._subscribe(declarer, self.topology.orchestrator_heartbeats(), handle)

    async def agent_connected(self, agent_id: str) -> bool:
        return await control_queue_lives(
            self._require(), self.topology.agent_control_queue(agent_id), agent_id
        )

    async def subscribe_dead_letters(
        self, handler: DeadLetterHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        async def handle(message: AbstractIncomingMessage) -> None:
            await handler(dead_letter_of(message))

        declarer = await self._own_channel(prefetch=64)
        return await self._subscribe(
            declarer,
            self.topology.orchestrator_dead_letters(),
            handle,
            dead_letter_failures=False,
            before_ack=before_ack,
        )

    # requests of other services ---------------------------------------------
    async def serve_requests(self, handler: RequestHandler) -> Subscription:
        declarations = self.topology.rpc()
        handle = request_server(
            handler,
            publisher=self._publisher,
            reply_body=self._reply_body,
            dead=self._publish_dead,
            source=declarations.queue.name,
        )
        declarer = await self._own_channel(prefetch=64)
        return await self._subscribe(declarer, declarations, handle)

    async def request(
        self, message: WireMessage, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Reply:
        body = self._check_size(message.encode())
        reply = await self._rpc.request(
            body,
            kind=getattr(message, "kind", None),
            timeout=timeout,
            no_reply=self._no_reply(timeout),
        )
        return parse_reply(reply)

    # leadership ------------------------------------------------------------
    def lease(self, holder: str) -> Lease:
        """The exclusive queue ``<prefix>.orchestrator.leader``, on a connection of its own."""
        url = amqp_url(self.settings, default_broker_url())
        return RabbitLease(
            url,
            self.topology.leader_lease().queue,
            holder=holder,
            address=self.address,
            connect_timeout=self.settings.connect_timeout,
            ssl_context=client_context(self.settings, url, warn=False),
        )

    # control ---------------------------------------------------------------
    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        await self._publisher.publish(
            self.topology.control_exchange,
            self.topology.control_key(agent_id),
            Envelope.control(command, self.leader),
        )

    async def subscribe_control(self, agent_id: str, handler: ControlHandler) -> Subscription:
        async def handle(message: AbstractIncomingMessage) -> None:
            await handler(parse_control(message.body))

        declarer = await self._own_channel()
        return await self._subscribe(declarer, self.topology.agent_control(agent_id), handle)

    # maintenance -------------------------------------------------------------
    async def declare(self, declarations: Declarations) -> None:
        """Declare these parts of ``self.topology`` now rather than on first use.

        For deploy tools and tests: it raises ``TopologyMismatch`` where the
        broker holds a name with other arguments, as the bus's own declares do.
        """
        await self._main_declarer().declare(declarations)

    async def delete_topology(
        self, queue_keys: Iterable[str] = (), agent_ids: Iterable[str] = ()
    ) -> None:
        """Delete this prefix's fixed queues and exchanges, the given task queues
        and agents' events queues, and those this bus declared.

        For tests and for tearing a deployment down; never called by normal operation.
        """
        connection = self._require()
        everything = (
            self.topology.everything(
                set(queue_keys) | self._declared, {*agent_ids, *self._agent_events}
            )
            + self.topology.retired()
        )
        async with throwaway_channel(connection) as channel:
            await delete(channel, everything)
        self._declared.clear()
        self._agent_events.clear()
