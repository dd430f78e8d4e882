"""Publishing on RabbitMQ: envelopes as AMQP messages, with confirms, through reconnects.

A publish returns once the broker has confirmed it. aio-pika's robust
connection reconnects, but does not replay a publish that failed meanwhile:
that is retried here, for ``PUBLISH_RETRY_SECONDS`` at most. A mandatory
publish that no queue took comes back from the broker and is an
``UnroutableMessage``: a confirm alone would not tell.

Every message carries the login user as its ``user_id``: RabbitMQ refuses
one that does not match the connection's user, so receivers can trust it
(``broker.envelope.Sender``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import aiormq
from aio_pika.abc import AbstractExchange
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from .envelope import CONTENT_TYPE, REASON_HEADER, Envelope
from .errors import BusConnectionError, BusError, BusNotStarted, PublishRefused, UnroutableMessage
from .rabbitmq_link import TRANSIENT

log = logging.getLogger(__name__)

PERSISTENT, NOT_PERSISTENT = 2, 1
"""AMQP delivery modes."""

PUBLISH_RETRY_SECONDS = 60.0
"""How long a publish keeps trying while the robust connection reconnects."""


def to_properties(envelope: Envelope) -> aiormq.spec.Basic.Properties:
    """The AMQP properties that carry ``envelope`` (its body travels beside them)."""
    return aiormq.spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT if envelope.persistent else NOT_PERSISTENT,
        message_type=envelope.type,
        message_id=envelope.message_id,
        priority=envelope.priority,
        # AMQP's expiration is a string of milliseconds.
        expiration=None if envelope.expiration is None else str(int(envelope.expiration * 1000)),
        headers=dict(envelope.headers) or None,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        user_id=envelope.user_id,
    )


async def publish_on(
    exchange: AbstractExchange,
    routing_key: str,
    envelope: Envelope,
    *,
    mandatory: bool,
    timeout: float | None = None,
) -> None:
    """Publish ``envelope`` on ``exchange``'s channel and wait for its confirm.

    This is aio-pika's ``Exchange.publish`` without its ``Message``: every
    message the bus sends would otherwise be built field by field into one
    (two dozen guarded attribute writes) only to be read back into these
    same properties, which cost the orchestrator and the agents a few per
    cent of their time at full load (``./run.sh bench peers``).
    """
    if exchange.channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{exchange.channel!r} closed")
    channel = await exchange.channel.get_underlay_channel()
    await channel.basic_publish(
        envelope.body,
        exchange=exchange.name,
        routing_key=routing_key,
        properties=to_properties(envelope),
        mandatory=mandatory,
        timeout=timeout,
    )


class Publisher:
    """Publishes to the exchanges declared on the bus's confirming channel.

    ``exchanges`` is looked up at each try, because the bus replaces it when
    it reconnects from scratch; None means the bus was closed.
    """

    def __init__(
        self,
        exchanges: Callable[[], Mapping[str, AbstractExchange] | None],
        check_size: Callable[[bytes], bytes],
        address: str,
        user: str | None,
    ) -> None:
        self._exchanges = exchanges
        self._check_size = check_size
        self._address = address
        self.user = user
        """Stamped on every message: the bus's login (``settings_user``)."""

    async def publish(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = False
    ) -> None:
        if self._exchanges() is None:
            raise BusNotStarted("the bus is not connected: call connect() first")
        self._check_size(envelope.body)
        envelope = envelope.stamped(self.user)

        async def publish_once() -> None:
            exchanges = self._exchanges()
            if exchanges is None:
                raise BusNotStarted("the bus was closed")
            await publish_on(
                exchanges[exchange], routing_key, envelope, mandatory=mandatory, timeout=10
            )

        try:
            try:
                await publish_once()  # the common case, without the retry machinery's cost
            except TRANSIENT:
                # The robust connection is reconnecting: publish again until it is back.
                async for attempt in AsyncRetrying(
                    stop=stop_after_delay(PUBLISH_RETRY_SECONDS),
                    wait=wait_exponential(multiplier=0.1, max=2),
                    retry=retry_if_exception_type(TRANSIENT),
                    reraise=True,
                ):
                    with attempt:
                        await publish_once()
        except aiormq.exceptions.PublishError:
            raise UnroutableMessage(
                f"no queue took the message for {exchange!r} / {routing_key!r}"
            ) from None
        except aiormq.exceptions.DeliveryError as exc:  # a nack: a full queue refused it
            raise PublishRefused(
                f"the broker refused the message for {exchange!r} / {routing_key!r}"
                f" (a full queue, reject-publish): {exc}"
            ) from None
        except BusError:
            raise
        except TRANSIENT as exc:
            raise BusConnectionError(
                f"cannot publish to RabbitMQ at {self._address}: {exc}"
            ) from None
        except aiormq.exceptions.AMQPError as exc:
            raise BusError(f"publish to {exchange!r} failed: {exc}") from None

    async def dead_letter(self, dead_exchange: str, envelope: Envelope, source: str) -> None:
        """Publish a dead letter; a failure is logged, never raised: it is
        published from consumers, which must go on."""
        log.warning(
            "dead-lettering a message from %s: %s", source, envelope.headers.get(REASON_HEADER)
        )
        try:
            await self.publish(dead_exchange, "", envelope)
        except BusError as exc:
            log.error("could not dead-letter a message from %s: %s", source, exc)
