"""Requests of other services on RabbitMQ: the client's side and the server's.

A request goes through ``<prefix>.requests`` to ``<prefix>.rpc`` with
``reply_to`` and ``correlation_id``; the reply comes back through the default
exchange to ``reply_to``. Not the other way round: a client allowed to write
to the default exchange could put a message into any queue by its name
(forged tasks, events into the orchestrator's queue), so clients may write to
the requests exchange only (``broker.permissions``). The client uses RabbitMQ's direct reply-to, so it
declares no queue of its own; the request expires when the client stops
waiting, so that a server that starts later does not act on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from . import tracing
from .envelope import Envelope
from .errors import BusConnectionError, BusError, NoReply
from .rabbitmq_consume import DeadLetterPublish
from .rabbitmq_link import TRANSIENT
from .rabbitmq_publish import Publisher, publish_on
from .rpc import Reply, RequestHandler, answer
from .topology import DIRECT_REPLY_TO

log = logging.getLogger(__name__)


def request_server(
    handler: RequestHandler,
    *,
    publisher: Publisher,
    reply_body: Callable[[Reply], bytes],
    dead: DeadLetterPublish,
    source: str,
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """What a server does with one request message: answer it to its ``reply_to``."""

    async def handle(message: AbstractIncomingMessage) -> None:
        # A submit made here joins the trace of the client that sent the request.
        with tracing.process_span(
            message.headers,
            message.exchange or "",
            message.routing_key or "",
            message_id=message.message_id,
        ):
            reply = await answer(handler, message.body, message.message_id)
        if not message.reply_to:
            if reply.error is not None:  # nobody to tell: keep it for people to see
                await dead(message.body, reply.error.message, source, None)
            return
        envelope = Envelope.reply(
            reply_body(reply), kind=reply.kind, correlation_id=message.correlation_id
        )
        try:
            # Not mandatory: a client that gave up is no error of ours.
            await publisher.publish("", message.reply_to, envelope)
        except BusError as exc:
            log.warning("could not reply to %s: %s", message.reply_to, exc)

    return handle


class RpcClient:
    """Sends requests and matches their replies, on one channel of its own."""

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        *,
        rpc_queue: str,
        requests_exchange: str,
        address: str,
        prefix: str,
    ) -> None:
        self._connection = connection
        self._rpc_queue = rpc_queue
        self._exchange_name = requests_exchange
        self._exchange: AbstractExchange | None = None
        self._address = address
        self._prefix = prefix
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        """Requests waiting for their reply, by correlation id."""

    async def _open(self) -> AbstractChannel:
        """The channel requests go out on; it consumes their direct replies.

        RabbitMQ sends a reply addressed to ``amq.rabbitmq.reply-to`` to the
        channel that published the request, if that channel consumes the
        pseudo-queue (no-ack): so consume first, then publish on the same one.
        """
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                channel = await self._connection().channel(
                    publisher_confirms=True, on_return_raises=True
                )
                # Declared (passively) so that the robust channel consumes it again
                # after a reconnect.
                replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
                await replies.consume(self._on_reply, no_ack=True)
                # Not declared: the orchestrator does; a missing one is reported below.
                self._exchange = await channel.get_exchange(self._exchange_name, ensure=False)
                self._channel = channel
            return self._channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._pending.pop(message.correlation_id or "", None)
        if waiting is not None and not waiting.done():
            waiting.set_result(message.body)

    async def request(
        self, body: bytes, *, kind: str | None, timeout: float, no_reply: str
    ) -> bytes:
        """The reply's body; ``NoReply`` with ``no_reply`` when none comes in time."""
        try:
            await self._open()
        except aiormq.exceptions.AMQPError as exc:
            raise BusConnectionError(f"cannot open a channel for requests: {exc}") from None
        correlation_id = uuid.uuid4().hex
        envelope = Envelope.request(
            body,
            kind=kind,
            reply_to=DIRECT_REPLY_TO,
            correlation_id=correlation_id,
            timeout=timeout,
        )
        # Its message_id is what a submit takes as its idempotency key by default:
        # delivered again after a server died mid-way, it maps to the task it made.
        envelope = dataclasses.replace(envelope, message_id=correlation_id)
        # When tracing: one span around the publish and the wait for its reply,
        # whose context the request carries to the orchestrator.
        with tracing.send_span({}, self._exchange_name, self._rpc_queue, message_id=correlation_id):
            envelope = dataclasses.replace(
                envelope, headers=tracing.with_current_context(envelope.headers)
            )
            return await self._send(envelope, correlation_id, timeout, no_reply)

    async def _send(
        self, envelope: Envelope, correlation_id: str, timeout: float, no_reply: str
    ) -> bytes:
        waiting = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = waiting
        try:
            async with asyncio.timeout(timeout):
                assert self._exchange is not None
                try:
                    await publish_on(self._exchange, self._rpc_queue, envelope, mandatory=True)
                except (aiormq.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity):
                    # Returned (no queue bound), or no such exchange (it closed the channel).
                    raise NoReply(
                        f"no queue {self._rpc_queue!r} on RabbitMQ at {self._address}: no"
                        f" orchestrator has served prefix {self._prefix!r} there"
                    ) from None
                except TRANSIENT as exc:
                    raise BusConnectionError(
                        f"cannot send a request to RabbitMQ at {self._address}: {exc}"
                    ) from None
                except aiormq.exceptions.AMQPError as exc:
                    raise BusError(f"request to {self._rpc_queue!r} failed: {exc}") from None
                return await waiting
        except NoReply:
            raise
        except TimeoutError:
            raise NoReply(no_reply) from None
        finally:
            self._pending.pop(correlation_id, None)

    def close(self) -> None:
        """Forget the channel (the connection closes it) and every waiting request."""
        for waiting in self._pending.values():
            waiting.cancel()
        self._pending.clear()
        self._channel = None
