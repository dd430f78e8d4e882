"""Declaring the topology's value objects on RabbitMQ: one function for all of them.

Every exchange, queue and binding the bus uses comes from ``broker.topology``
and is declared here, with the arguments the definitions document gives it.
A declare that meets a queue or exchange of that name with other arguments is
a ``TopologyMismatch``: we never delete and re-declare, which would lose the
messages in it.

Only the orchestrator declares the shared topology. A declarer that is not
the orchestrator's (``own_only``) declares only its own queues, the exclusive
ones (an agent's control queue, a monitor's queue), and binds only those; it
checks every other queue and exchange with a *passive* declare, which
RabbitMQ allows without any permission, and a missing one is a
``TopologyMissing`` that says to start the orchestrator first. A declare the
user's permissions refuse is a ``PermissionRefused`` naming the user's
missing right.
"""

from __future__ import annotations

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from .errors import BusConnectionError, BusError, QueueInUse, TopologyMismatch, TopologyMissing
from .topology import Binding, Declarations, Exchange, Queue

START_ORCHESTRATOR = "start `orchestrator serve` first"


class PermissionRefused(BusError, PermissionError):
    """Raised when RabbitMQ refuses an operation to the connection's user
    (ACCESS_REFUSED): its permissions do not cover that queue or exchange
    (see ``broker.permissions`` for what each role is granted)."""


class QueueUnavailable(BusConnectionError):
    """Raised when a queue exists but its node is down (a cluster): a classic
    queue lives on one node, the one whose connection declared it, and is
    unavailable, not gone, until that node is back. Transient, like a lost link."""


def _unavailable(queue: Queue, exc: BaseException) -> QueueUnavailable | None:
    """RabbitMQ 3.x's NOT_FOUND for a durable queue whose home node is down."""
    text = str(exc)
    if "home node" not in text:
        return None
    return QueueUnavailable(
        f"queue {queue.name!r} is unavailable: {text.split(' - ', 1)[-1].rstrip(chr(39))}"
        " (a classic queue is not replicated: it is back when its node is)"
    )


def missing(kind: str, name: str, address: str) -> TopologyMissing:
    return TopologyMissing(
        f"{kind} {name!r} does not exist on RabbitMQ at {address}: {START_ORCHESTRATOR}"
    )


def refused(what: str, exc: BaseException) -> PermissionRefused:
    return PermissionRefused(f"RabbitMQ refused to {what}: {exc}")


class Declarer:
    """Declares on one channel, each thing once.

    The cache holds the value objects: equal objects declare the same thing,
    and a robust channel declares again by itself after a reconnect what it
    declared before (passively what it checked passively). ``queues`` keeps
    the declared queues, to consume from. ``own_only``: declare only
    exclusive queues, check the rest (see the module's docstring).
    """

    def __init__(
        self, channel: AbstractChannel, address: str, *, own_only: bool = False, robust: bool = True
    ) -> None:
        self.channel = channel
        self._robust: dict[str, bool] = {} if robust else {"robust": False}
        """``robust`` False: the robust channel does not declare its queues
        again after a reconnect (a channel that only declares, for others)."""
        self._address = address
        self.own_only = own_only
        self.exchanges: dict[str, AbstractExchange] = {"": channel.default_exchange}
        """Declared exchanges by name, to publish to; ``""`` is the default exchange."""
        self.queues: dict[Queue, AbstractQueue] = {}
        self._bound: set[Binding] = set()

    async def declare(self, declarations: Declarations) -> None:
        for exchange in declarations.exchanges:
            if exchange.name not in self.exchanges:
                self.exchanges[exchange.name] = await self._exchange(exchange)
        for queue in declarations.queues:
            if queue not in self.queues:
                self.queues[queue] = await self._queue(queue)
        for binding in declarations.bindings:
            if binding not in self._bound and self._owns(binding.queue):
                await self._bind(binding)
                self._bound.add(binding)

    async def check(self, declarations: Declarations) -> None:
        """Check passively that the exchanges and queues of ``declarations`` exist
        (nothing is created, no permission is needed); ``TopologyMissing`` for the
        first that does not. The broker closes the channel then: use one of its own."""
        for exchange in declarations.exchanges:
            if exchange.name not in self.exchanges:
                self.exchanges[exchange.name] = await self._check_exchange(exchange)
        for queue in declarations.queues:
            if queue not in self.queues:
                self.queues[queue] = await self._check_queue(queue)

    def _owns(self, queue: Queue) -> bool:
        return not self.own_only or queue.exclusive

    async def _check_exchange(self, exchange: Exchange) -> AbstractExchange:
        try:
            return await self.channel.declare_exchange(exchange.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise missing("exchange", exchange.name, self._address) from None

    async def _check_queue(self, queue: Queue) -> AbstractQueue:
        try:
            return await self.channel.declare_queue(queue.name, passive=True, **self._robust)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise _unavailable(queue, exc) or missing("queue", queue.name, self._address) from None
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise QueueInUse(
                f"queue {queue.name!r} is exclusive to another connection: {exc}"
            ) from None

    async def _exchange(self, exchange: Exchange) -> AbstractExchange:
        if self.own_only:
            return await self._check_exchange(exchange)
        try:
            return await self.channel.declare_exchange(
                exchange.name,
                aio_pika.ExchangeType(exchange.type),
                durable=exchange.durable,
                auto_delete=exchange.auto_delete,
                arguments=dict(exchange.arguments) or None,
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"exchange {exchange.name!r} exists with other arguments: {exc}"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(f"declare exchange {exchange.name!r}", exc) from None

    async def _queue(self, queue: Queue) -> AbstractQueue:
        if not self._owns(queue):
            return await self._check_queue(queue)
        try:
            return await self.channel.declare_queue(
                queue.name,
                **self._robust,
                durable=queue.durable,
                exclusive=queue.exclusive,
                auto_delete=queue.auto_delete,
                arguments=dict(queue.arguments) or None,
            )
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise _unavailable(queue, exc) or exc from None
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"queue {queue.name!r} exists with other arguments: {exc}{_type_hint(queue, exc)}"
            ) from None
        except aiormq.exceptions.ChannelLockedResource as exc:
            raise QueueInUse(
                f"queue {queue.name!r} is exclusive to another connection: {exc}"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(f"declare queue {queue.name!r}", exc) from None

    async def _bind(self, binding: Binding) -> None:
        queue = self.queues.get(binding.queue)
        if queue is None:  # declared by someone else: bind it all the same
            queue = self.queues[binding.queue] = await self._queue(binding.queue)
        try:
            await queue.bind(binding.exchange.name, binding.routing_key)
        except aiormq.exceptions.ChannelNotFoundEntity:
            # The broker closed the channel: nobody declared the exchange.
            raise TopologyMissing(
                f"no exchange {binding.exchange.name!r} on RabbitMQ at {self._address}"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(
                f"bind queue {binding.queue.name!r} to {binding.exchange.name!r}"
                f" under {binding.routing_key!r}",
                exc,
            ) from None


def _type_hint(queue: Queue, exc: BaseException) -> str:
    """What to do when the broker's queue is of the other type (classic or quorum):
    a queue cannot change type, and only the setting decides which we declare."""
    if "x-queue-type" not in str(exc):
        return ""
    wanted = queue.arguments.get("x-queue-type", "classic")
    return (
        f"; ORCHESTRATOR_QUORUM_QUEUES={'true' if wanted == 'quorum' else 'false'} declares"
        f" {queue.name!r} as a {wanted} queue and RabbitMQ cannot change a queue's type:"
        " set the setting back, or move to the other type as the README's"
        " 'A RabbitMQ cluster' says (drain the queue, delete it, start again)"
    )


async def delete(channel: AbstractChannel, declarations: Declarations) -> None:
    """Delete the queues, then the exchanges, of ``declarations`` (with their messages)."""
    for queue in declarations.queues:
        await channel.queue_delete(queue.name)
    for exchange in declarations.exchanges:
        await channel.exchange_delete(exchange.name)
