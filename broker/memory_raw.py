"""What any AMQP client may do to a broker that the bus's models never do,
offered by the in-process bus for tests: publish bytes no model would let
through (a broken or foreign publisher's), and purge a queue (what a broker
may lose). ``MemoryBus`` mixes it in; it uses the bus's routing and queues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .envelope import Envelope
from .errors import BusError


class RawClient:
    if TYPE_CHECKING:  # provided by MemoryBus
        _user: str
        _queues: dict[str, Any]

        def _require(self) -> None: ...
        def _route(self, exchange: str, routing_key: str, envelope: Envelope) -> None: ...
        def _poke(self) -> None: ...

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        priority: int | None = None,
        user_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Put bytes on an exchange as any AMQP client can: for tests of what a
        broken or foreign publisher sends, which no model would let through.

        Like a plain AMQP client it sets no ``user_id`` unless given one, and,
        as RabbitMQ does, refuses one that is not this bus's user."""
        self._require()
        if user_id is not None and user_id != self._user:
            raise BusError(
                f"PRECONDITION_FAILED - user_id property set to {user_id!r} but"
                f" authenticated user was {self._user!r}"
            )
        envelope = Envelope(
            body, message_id=message_id, priority=priority, user_id=user_id, headers=headers or {}
        )
        self._route(exchange, routing_key, envelope)

    async def purge(self, queue: str) -> int:
        """Drop the messages waiting in a queue (by its name, as ``Topology`` gives
        it), as AMQP's queue.purge does; how many there were, 0 for a queue never
        declared. For tests of what a broker may lose, such as a retry tier's
        delayed tasks (``topology.retry_queue(tier)``)."""
        self._require()
        sink = self._queues.get(queue)
        count = sink.purge() if sink is not None else 0
        self._poke()
        return count
