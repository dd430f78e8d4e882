"""Errors raised by the communication bus.

One root, so callers can catch everything the bus raises in one clause; the
transport's own exceptions (aio-pika, aiormq) are converted at the boundary and
never leak out of ``broker``.
"""

from __future__ import annotations


class BusError(Exception):
    """Raised for any failure of the communication bus."""


class BusConnectionError(BusError, ConnectionError):
    """Raised when the broker cannot be reached or the connection is lost.

    It is also a builtin ``ConnectionError`` so that the seed's
    ``except ConnectionError`` clause catches it.
    """


class BusNotStarted(BusError, ConnectionError):
    """Raised when the bus is used before ``connect()`` or after ``close()``."""


class MessageTooLarge(BusError, ValueError):
    """Raised before publishing a message larger than the configured limit."""


class UnroutableMessage(BusError):
    """Raised when the broker returns a mandatory message no queue took."""


class PublishRefused(BusError):
    """Raised when the broker refuses a publish (a nack): a bounded queue it
    routes to is full (``x-overflow`` ``reject-publish``, as an agent's own
    events queue under a flood of its id). Nothing was lost: publish again
    later (agents do, with backoff)."""


class TopologyMismatch(BusError):
    """Raised when a queue or exchange exists with other arguments than ours.

    We never delete and re-declare: that would lose the messages in it.
    """


class TopologyMissing(BusError):
    """Raised when an exchange or queue the bus uses does not exist on the broker.

    A client that declares no topology (``declare_topology=False``) meets it
    before any orchestrator of its prefix has run against that broker.
    """


class QueueInUse(BusError):
    """Raised when a queue is exclusive to another consumer (RabbitMQ's
    RESOURCE_LOCKED): an agent's control queue, held by a live agent of that id."""


class InvalidMessage(BusError, ValueError):
    """Raised when a message body is not a valid wire message."""


class NoReply(BusError, TimeoutError):
    """Raised when a request gets no reply: no orchestrator serves the request
    queue of this prefix, or none answered within the timeout."""
