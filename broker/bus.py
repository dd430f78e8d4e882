"""The ``CommunicationBus`` interface: what the orchestrator and agents need of a bus.

Two implementations share it and its delivery semantics: ``RabbitMQBus``
(aio-pika) and ``MemoryBus`` (in-process, for embedded use and fast tests).
The semantics both must keep:

- Task queues are priority queues, one per capability key. A message goes to
  the waiting consumer with the highest consumer priority whose channel has a
  free prefetch slot; equal consumers take turns.
- A task consumer's prefetch is shared by all the queues it consumes, so an
  agent never holds more unacknowledged tasks than its limit.
- Unacknowledged tasks go back to their queue when their consumer goes away.
- Events are routed by topic; each subscription sees them in publish order,
  one at a time. A subscription with no patterns is the orchestrator's shared
  durable queue (announcements); each registered agent's own events go to a
  durable queue of that agent's (``subscribe_agent_events``). Both keep
  events while the orchestrator is down; both are bounded, and a publish a
  full one refuses is a ``PublishRefused``.
- Requests of other services wait in the durable request queue until a
  server takes them, but no longer than their client waits for the reply.
  The server handles them one at a time, in order, and answers each with one
  ``Reply`` (an unparseable request or a failing handler gets an error reply;
  neither stops the server).
- Every publish carries the bus's user (AMQP ``user_id``, which RabbitMQ
  checks against the connection's login); a handler learns who sent the
  message it was called for from ``current_sender()``, a task delivery from
  its ``sender``, a dead letter from its ``sender`` and ``by_broker``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

# (re-exported: where they always were)
from .bus_identity import _settings_from as _settings_from
from .bus_identity import default_broker_url as default_broker_url
from .bus_identity import login_user as login_user
from .bus_identity import settings_user as settings_user
from .envelope import DeadLetter
from .errors import MessageTooLarge
from .messages import Control, Event, TaskMessage, WireMessage
from .rpc import Reply, RequestHandler
from .settings import BusSettings
from .topology import Topology, retry_tier_ms

CLOSE_WAIT = 5.0
"""Seconds a subscription's ``close`` lets the message being handled finish
(a handler cut half-way leaves in memory what it has not written yet); past
them it is cancelled, and what was not acknowledged comes again."""

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "BeforeAck",
    "CommunicationBus",
    "ControlHandler",
    "DeadLetter",
    "DeadLetterHandler",
    "EventHandler",
    "Lease",
    "RequestHandler",
    "Subscription",
    "TaskConsumer",
    "TaskDelivery",
    "TaskHandler",
    "default_broker_url",
    "login_user",
    "settings_user",
]

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds a client waits for a reply (and a request waits for a server)."""


class TaskDelivery(abc.ABC):
    """One task message handed to a consumer; settle it exactly once.

    ``redelivered`` is the broker's flag: the message may have been handed to
    a consumer before (requeued, or brought back by a broker that crashed).
    """

    body: bytes
    queue_key: str
    redelivered: bool
    sender: str | None = None
    """The user that published it (checked by the broker); None: it set none."""

    @property
    def lost(self) -> bool:
        """The link it came on is gone: the broker has put it back in its queue
        by itself (it comes again, marked redelivered), and settling it now
        does nothing."""
        return False

    async def wait_lost(self) -> None:
        """Return once ``lost`` (never, for one whose link holds)."""
        await asyncio.get_running_loop().create_future()

    @abc.abstractmethod
    async def ack(self) -> None:
        """The task is done with: remove it from the queue."""

    @abc.abstractmethod
    async def requeue(self) -> None:
        """Give the task back to its queue, for this or another consumer."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Move the message to the dead-letter queue with ``reason`` and settle it."""


TaskHandler = Callable[[TaskDelivery], Awaitable[None]]
DeadLetterHandler = Callable[[DeadLetter], Awaitable[None]]
EventHandler = Callable[[Event], Awaitable[None]]
ControlHandler = Callable[[Control], Awaitable[None]]
BeforeAck = Callable[[], Awaitable[None]]


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming. Unsettled deliveries go back to their queue."""

    async def consuming(self) -> bool:
        """False once the broker stopped its consumer (someone deleted its queue)
        and nothing consumes again: the owner closes it and subscribes anew."""
        return True


def priorities_after(
    known: Mapping[str, int],
    queue_keys: Iterable[str],
    consumer_priority: int,
    priorities: Mapping[str, int] | None,
) -> dict[str, int]:
    """Each queue's ``x-priority`` after ``TaskConsumer.consume``: the one given
    for it, else ``consumer_priority``; queues consumed before included."""
    wanted = priorities or {}
    return {key: wanted.get(key, consumer_priority) for key in {*known, *queue_keys}}


class TaskConsumer(Subscription):
    """One agent's consumption of task queues: one prefetch across all of them."""

    cancels_handlers: bool = True
    """Whether a lost link may cancel the handler a delivery is given to (aiormq
    cancels its consumers' work when a channel closes): the agent then shields
    the handling in a task of its own. False where that never happens."""

    @abc.abstractmethod
    async def consume(
        self,
        queue_keys: Iterable[str],
        consumer_priority: int = 0,
        priorities: Mapping[str, int] | None = None,
    ) -> None:
        """Consume these capability queues too (idempotent).

        Afterwards every queue consumed has the ``x-priority``
        ``priorities.get(key, consumer_priority)``. RabbitMQ fixes a
        consumer's priority when it starts, so a queue whose priority changes
        is consumed anew, and only that queue: the others keep their
        consumers (and their place in the broker's turns); what was delivered
        meanwhile stays held and is settled as ever.
        """

    @abc.abstractmethod
    async def step_aside(self, delivery: TaskDelivery, seconds: float) -> None:
        """Give ``delivery`` back and stop consuming its queue for ``seconds``, so
        that another consumer takes it even if this one ranks higher."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Take no new deliveries; those held can still be settled (graceful stop)."""

    @abc.abstractmethod
    async def detach(self, delivery: TaskDelivery) -> None:
        """Acknowledge ``delivery`` now but keep its place in the prefetch until
        ``reattach``: for a task that runs longer than the broker lets a delivery
        stay unacknowledged (RabbitMQ's ``consumer_timeout``), without taking
        one more task than the agent's limit meanwhile."""

    @abc.abstractmethod
    async def reattach(self) -> None:
        """A detached task has ended: its place in the prefetch is free again."""

    @abc.abstractmethod
    async def set_prefetch(self, prefetch: int) -> None:
        """A new limit of unsettled deliveries (detached ones still count); those
        held beyond a lower one stay held until they are settled."""

    @property
    @abc.abstractmethod
    def queue_keys(self) -> frozenset[str]:
        """The capability keys consumed now."""


class Lease(abc.ABC):
    """A lock the broker holds for one of several processes: the orchestrators'
    leadership of a prefix (``Topology.leader_lease``).

    The broker enforces it: it grants it to one connection at a time and
    takes it back by itself when that connection ends, so a killed holder
    loses it at once and a paused one once its heartbeats stop.
    """

    @property
    @abc.abstractmethod
    def held(self) -> bool:
        """Acquired, and not lost or released since."""

    @abc.abstractmethod
    async def acquire(self) -> bool:
        """Try once to take it; True if it is held now, False if another holds it."""

    async def confirm(self) -> bool:
        """Whether it is still held, asked of the broker where it can be (a
        round trip): after a pause, the broker may have taken it back before
        this process has read that news."""
        return self.held

    @abc.abstractmethod
    async def wait_lost(self) -> None:
        """Return once a held lease is gone (its connection ended, or ``release``)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give it up (idempotent); the next ``acquire`` of another may succeed."""


class CommunicationBus(abc.ABC):
    """Inter-agent messaging. ``CommunicationBus()`` picks an implementation.

    With no arguments it reads ``BusSettings`` (``ORCHESTRATOR_*`` environment
    variables): ``ORCHESTRATOR_BROKER_URL`` set gives a ``RabbitMQBus`` on that
    broker, unset gives an in-process ``MemoryBus``. Pass ``broker_url=`` or
    ``settings=`` to choose explicitly.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> CommunicationBus:
        if cls is CommunicationBus:
            settings = _settings_from(*args, **kwargs)
            if settings.broker_url:
                from .rabbitmq import RabbitMQBus as impl
            else:
                from .memory import MemoryBus as impl
            # Python then runs impl.__init__ with the same arguments.
            return super().__new__(impl)
        return super().__new__(cls)

    def __init__(
        self, broker_url: str | None = None, *, settings: BusSettings | None = None
    ) -> None:
        self.settings = _settings_from(broker_url, settings=settings)
        self.topology = Topology(self.settings.prefix, quorum=self.settings.quorum_queues)
        self.leader: tuple[str, int] | None = None
        """(lineage, epoch), stamped on every command this bus publishes
        (``envelope.LEADER_HEADER``); set by the orchestrator while it leads."""

    # identity ----------------------------------------------------------------
    @property
    def user(self) -> str | None:
        """The user this bus publishes as (every message's ``user_id``): the
        broker login (see ``settings_user``)."""
        return settings_user(self.settings)

    @property
    def orchestrator_user(self) -> str | None:
        """The user whose commands agents obey: ``settings.orchestrator_user``,
        else this bus's own user (one user for everything is one trust domain)."""
        return self.settings.orchestrator_user or self.user

    # lifecycle -------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and declare the fixed topology. Idempotent.

        Raises ``ConnectionError`` (a ``BusConnectionError``) naming the broker
        address, without its password, when it cannot be reached.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every subscription and the connection. Idempotent."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool:
        """``connect`` succeeded and ``close`` has not been called (it may be
        reconnecting: see ``link_up``)."""

    @property
    def link_up(self) -> bool:
        """The broker can be reached right now (False while reconnecting): who
        judges others by their silence must not do so while it cannot hear."""
        return self.is_connected

    links: int = 0
    """How often the link came back after it was lost, once all that was
    declared and consumed is restored. What was sent to this bus's queues
    meanwhile may be lost (a command to an exclusive queue being declared
    again is unroutable), so an agent announces itself again when it grows."""

    # tasks -----------------------------------------------------------------
    @abc.abstractmethod
    async def declare_task_queue(self, queue_key: str) -> None:
        """Declare the priority queue of a capability key and bind it (cached)."""

    @abc.abstractmethod
    async def publish_task(
        self, message: TaskMessage, *, queue_key: str, priority: int, delay: float = 0.0
    ) -> None:
        """Publish a task durably; returns once the broker has confirmed it.

        With ``delay`` (seconds) the task reaches its queue after that long,
        and by ``arrival_bound(delay)``; a delay beyond the longest retry tier
        (an hour) is cut to that tier. The broker holds it meanwhile, so no
        timer is lost if the publisher restarts.
        """

    def arrival_bound(self, delay: float) -> float:
        """Seconds after a ``publish_task`` with ``delay`` by which the task is in
        its queue, at the latest: 0 for no delay, else the retry tier it waits in.

        A delayed task may come later than its delay (a TTL expires only at the
        head of its tier's queue) but never later than its tier. Who watches
        for a delayed task that never came back must not call it lost before.
        """
        if delay <= 0:
            return 0.0
        return retry_tier_ms(delay) / 1000

    @abc.abstractmethod
    async def open_task_consumer(
        self, consumer_id: str, *, prefetch: int, handler: TaskHandler
    ) -> TaskConsumer:
        """A consumer of task queues whose unsettled deliveries never exceed ``prefetch``."""

    # events ----------------------------------------------------------------
    @abc.abstractmethod
    async def publish_event(self, event: Event) -> None:
        """Publish a status event (routing key = its kind); returns once confirmed."""

    @abc.abstractmethod
    async def subscribe_events(
        self,
        handler: EventHandler,
        *,
        patterns: Sequence[str] | None = None,
        before_ack: BeforeAck | None = None,
    ) -> Subscription:
        """Handle events one at a time, in order.

        ``patterns`` None consumes the orchestrator's durable events queue;
        topic patterns (``task.#``) give a private queue that lives as long as
        the subscription, for monitors. ``before_ack`` is awaited before the
        subscription acknowledges what it has handled (a store makes its
        writes durable there); if it raises, nothing is acknowledged yet.
        """

    @abc.abstractmethod
    async def subscribe_agent_events(
        self, agent_id: str, handler: EventHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        """Declare ``agent_id``'s own events queue (``Topology.agent_events``) and
        handle it as ``subscribe_events`` does; closing the subscription keeps
        the queue (and what waits in it) for the next orchestrator."""

    @abc.abstractmethod
    async def delete_agent_events(self, agent_id: str) -> None:
        """Delete ``agent_id``'s events queue, with what waits in it (idempotent)."""

    async def drain_legacy_events(
        self, handler: EventHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription | None:
        """An earlier version's single events queue (``Topology.legacy_events_queue``),
        unbound and handled until it is empty, then deleted; None if there is none."""
        return None

    @abc.abstractmethod
    async def subscribe_heartbeats(self, handler: EventHandler) -> Subscription:
        """Handle the orchestrator's queue of heartbeats, one at a time.

        Heartbeats have a queue of their own beside the durable events queue
        (``Topology.orchestrator_heartbeats``), bounded with drop-head: a flood
        of them cannot delay a result, nor a backlog of results starve
        liveness. Nothing is written for a heartbeat, so there is no ``before_ack``.
        """

    @abc.abstractmethod
    async def agent_connected(self, agent_id: str) -> bool:
        """Whether the broker holds ``agent_id``'s control queue now.

        That queue is exclusive and auto-delete: it exists exactly while the
        agent's connection lives (and keeps its consumer), and the broker
        deletes it the moment that connection dies, a SIGKILL included. So it
        is the broker's word on a silent agent: gone means dead at once (the
        broker has given its unacknowledged tasks back already), there means
        its silence is the bus's (heartbeats delayed or dropped by a flood).
        ``BusConnectionError`` when the broker cannot be asked."""

    @abc.abstractmethod
    async def subscribe_dead_letters(
        self, handler: DeadLetterHandler, *, before_ack: BeforeAck | None = None
    ) -> Subscription:
        """Handle the orchestrator's copy of every dead letter, one at a time."""

    # control ---------------------------------------------------------------
    @abc.abstractmethod
    async def publish_control(self, command: Control, *, agent_id: str | None = None) -> None:
        """Send a command to one agent, or to every agent when ``agent_id`` is None."""

    @abc.abstractmethod
    async def subscribe_control(self, agent_id: str, handler: ControlHandler) -> Subscription:
        """Receive the commands for ``agent_id`` and the broadcast ones."""

    @abc.abstractmethod
    async def queue_depth(self, queue_key: str) -> int:
        """How many tasks wait in a capability queue (not counting those an
        agent holds); 0 for a queue that does not exist."""

    # leadership ------------------------------------------------------------
    def lease(self, holder: str) -> Lease:
        """The leader lease of this prefix, for ``holder`` (a name the broker UI
        shows); not acquired yet. Buses without one raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no leader lease")

    # requests of other services ---------------------------------------------
    @abc.abstractmethod
    async def serve_requests(self, handler: RequestHandler) -> Subscription:
        """Answer the requests sent to ``<prefix>.rpc``, one at a time, in order.

        ``handler`` gets each parsed request and returns its ``Reply``; the bus
        sends it to the request's ``reply_to`` with its ``correlation_id``. A
        body that is not a request is answered with an ``invalid_request``
        error, and a handler that raises with an ``internal`` one.
        """

    @abc.abstractmethod
    async def request(
        self, message: WireMessage, *, timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> Reply:
        """Send a request to the orchestrator serving this prefix; its reply.

        Raises ``NoReply`` (a ``TimeoutError``) naming the request queue when
        no server answers within ``timeout`` seconds; the request expires
        then, so a server that starts later does not act on it.
        """

    # helpers shared by implementations ---------------------------------------
    @staticmethod
    def _delay_tier(delay: float) -> tuple[int, float]:
        """The retry tier (ms) a delayed task waits in, and its own expiration (s)."""
        tier = retry_tier_ms(delay)
        return tier, min(delay, tier / 1000)

    def _reply_body(self, reply: Reply) -> bytes:
        """What a server sends back: the reply, or an error if it is too large to send."""
        try:
            return self._check_size(reply.encode())
        except MessageTooLarge as exc:
            return Reply.failure("internal", f"reply too large: {exc}").encode()

    def _no_reply(self, timeout: float) -> str:
        return (
            f"no reply from {self.topology.rpc_queue!r} within {timeout:g}s: "
            f"is an orchestrator serving prefix {self.settings.prefix!r}?"
        )

    def _check_size(self, body: bytes) -> bytes:
        if len(body) > self.settings.max_message_bytes:
            raise MessageTooLarge(
                f"message of {len(body)} bytes exceeds max_message_bytes="
                f"{self.settings.max_message_bytes}"
            )
        return body

    async def __aenter__(self) -> CommunicationBus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
