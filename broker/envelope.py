"""What the bus puts on each message besides its body, and reads back off it.

The body is a wire message (``broker.messages``); the envelope is the AMQP
properties and headers around it. Both buses build their envelopes here, so
that the in-process bus carries exactly what RabbitMQ would: the identity of
a task attempt (``message_id`` = ``<task_id>:<attempt>``, which lets a dead
letter name its task even when its body cannot be parsed), the kind (AMQP
``type``), persistence, priority, expiration, and the reason and source queue
of a dead letter, and who published it (AMQP ``user_id``).

Who sent a message is what the broker enforces, never what its body says:
RabbitMQ refuses a publish whose ``user_id`` is not the login of the
connection it came on, so a ``user_id`` that arrives is that publisher's
user, and one missing means a publisher that chose not to say. Both buses
stamp every publish with their user, and tell a handler the sender of the
message it was called for (``current_sender``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from .messages import Control, Event, TaskMessage
from .tracing import trace_headers, with_current_context

CONTENT_TYPE = "application/json"

REASON_HEADER = "x-reason"
"""Why a dead letter was given up on."""

SOURCE_QUEUE_HEADER = "x-source-queue"
"""The queue a dead letter was taken from."""

DEATH_HEADER = "x-death"
"""Set by RabbitMQ on a message it dead-lettered itself; it keeps the
original publisher's ``user_id``."""
LEADER_HEADER = "x-leader"
"""On a command: ``<lineage>:<epoch>`` of the orchestrator that sent it
(``orchestrator.leadership``). The lineage names the state store the epochs
count in; an agent obeys no command of an older epoch of a lineage than one it
has heard, so a leader that was paused and wakes up after a takeover can
change nothing on the agents."""

MAX_REASON_LENGTH = 1000
"""Headers travel in every frame's header block: a reason is one line, not a dump."""

TRANSIENT_EVENTS = frozenset({"task.progress", "agent.heartbeat"})
"""Events superseded by the next one of their kind: not worth the broker's disk."""

_ID_SEPARATOR = ":"


def task_message_id(task_id: str, attempt: int) -> str:
    """The ``message_id`` of one attempt of a task."""
    return f"{task_id}{_ID_SEPARATOR}{attempt}"


def parse_message_id(message_id: str | None) -> tuple[str, int | None] | None:
    """``(task_id, attempt)`` of a task message id; None when it is not one.

    The attempt is None when the part after the last separator is not a
    number. Task ids may hold the separator themselves: the attempt is what
    follows the last one.
    """
    if not message_id or _ID_SEPARATOR not in message_id:
        return None
    task_id, tail = message_id.rsplit(_ID_SEPARATOR, 1)
    return task_id, int(tail) if tail.isdigit() else None


def body_field(body: bytes, name: str) -> str | None:
    """A string field of a JSON object body, or None: for bodies nobody could
    parse as a wire message, which may not be JSON, nor an object, nor shallow."""
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Envelope:
    """One message as a bus publishes it: a body and its AMQP properties."""

    body: bytes
    type: str | None = None
    """The wire message's ``kind``, so tools can tell messages apart unparsed."""
    message_id: str | None = None
    priority: int | None = None
    persistent: bool = True
    expiration: float | None = None
    """Seconds the message may wait in a queue (a TTL queue's own may be shorter)."""
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    """The publisher's user: stamped by the bus, checked by the broker."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    def expiring(self, seconds: float | None) -> Envelope:
        return replace(self, expiration=seconds)

    def stamped(self, user: str | None) -> Envelope:
        """As published by ``user`` (the bus's login), with the publisher's trace
        context in its headers when it traces (``broker.tracing``)."""
        headers = with_current_context(self.headers)
        if headers is not self.headers:
            return replace(self, user_id=user, headers=headers)
        # Every message published goes through here: a copy of the fields with
        # the user changed, without ``replace``'s __init__ and __post_init__
        # (the headers are the same read-only mapping, shared as before).
        stamped = object.__new__(type(self))
        stamped.__dict__.update(self.__dict__, user_id=user)
        return stamped

    # what each kind of message travels with -------------------------------------------
    @classmethod
    def task(cls, message: TaskMessage, *, priority: int) -> Envelope:
        return cls(
            message.encode(),
            type=message.kind,
            message_id=task_message_id(message.task_id, message.attempt),
            priority=priority,
        )

    @classmethod
    def event(cls, event: Event) -> Envelope:
        return cls(event.encode(), type=event.kind, persistent=event.kind not in TRANSIENT_EVENTS)

    @classmethod
    def control(cls, command: Control, leader: tuple[str, int] | None = None) -> Envelope:
        """``leader``: the (lineage, epoch) of the orchestrator sending it."""
        # A command matters to the agents listening now: one that restarts hears anew.
        headers = {LEADER_HEADER: f"{leader[0]}:{leader[1]}"} if leader else {}
        return cls(command.encode(), type=command.kind, persistent=False, headers=headers)

    @classmethod
    def dead(
        cls,
        body: bytes,
        reason: str,
        *,
        source: str,
        message_id: str | None = None,
        max_bytes: int | None = None,
    ) -> Envelope:
        """A message given up on, with why and where from; cut to ``max_bytes``
        because it may be the very message that was too large."""
        return cls(
            body if max_bytes is None else body[:max_bytes],
            message_id=message_id,
            headers={REASON_HEADER: reason[:MAX_REASON_LENGTH], SOURCE_QUEUE_HEADER: source},
        )

    @classmethod
    def request(
        cls, body: bytes, *, kind: str | None, reply_to: str, correlation_id: str, timeout: float
    ) -> Envelope:
        # Gone when the client stops waiting: a server that starts later does not act on it.
        return cls(
            body,
            type=kind,
            persistent=False,
            reply_to=reply_to,
            correlation_id=correlation_id,
            expiration=timeout,
        )

    @classmethod
    def reply(cls, body: bytes, *, kind: str, correlation_id: str | None) -> Envelope:
        return cls(body, type=kind, persistent=False, correlation_id=correlation_id)


def header_text(headers: Mapping[str, Any] | None, name: str, default: str) -> str:
    """A header as text: AMQP tables carry strings as bytes when another client wrote them."""
    value = (headers or {}).get(name, default)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value)


@dataclass(frozen=True)
class Sender:
    """Who published the message a bus handler was called for.

    ``user`` is the AMQP ``user_id``: the broker checked it against the
    publishing connection's login, so it cannot be forged; None when the
    publisher set none (anyone can publish so). ``by_broker``: the broker
    dead-lettered the message itself (``x-death``), and ``user`` is then its
    original publisher's.
    """

    user: str | None
    by_broker: bool = False
    trace: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    """The trace context it came with (``broker.tracing``): its handler's span joins it."""
    leader: tuple[str, int] | None = None
    """A command's (lineage, epoch) (``LEADER_HEADER``); None if it carries none."""

    @classmethod
    def of(cls, user_id: object, headers: Mapping[str, Any] | None) -> Sender:
        return cls(
            user_id if isinstance(user_id, str) else None,
            DEATH_HEADER in (headers or {}),
            trace_headers(headers),
            leader_of(headers),
        )


def leader_of(headers: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """``LEADER_HEADER`` read back; None if absent or malformed (anyone may publish)."""
    value = (headers or {}).get(LEADER_HEADER)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, str) or len(value) > 200:
        return None
    lineage, _, epoch = value.rpartition(":")
    if not lineage or not epoch.isdigit() or len(epoch) > 18:
        return None
    return lineage, int(epoch)


_SENDER: ContextVar[Sender | None] = ContextVar("sender", default=None)


def current_sender() -> Sender | None:
    """The sender of the message whose handler runs now, or None outside a
    handler the bus called (an in-process caller, who is the process itself)."""
    return _SENDER.get()


@contextmanager
def handling_from(sender: Sender) -> Iterator[None]:
    """Run a handler with ``current_sender()`` = ``sender`` (for the buses)."""
    token = _SENDER.set(sender)
    try:
        yield
    finally:
        _SENDER.reset(token)


@dataclass(frozen=True)
class DeadLetter:
    """A message nobody could process, with the reason it was given up on."""

    body: bytes
    reason: str
    message_id: str | None = None
    """For task messages: ``<task_id>:<attempt>``, so the task can be found
    even when the body cannot be parsed."""
    sender: str | None = None
    """Who published it (``Sender.user``): the client that dead-lettered it,
    or, if ``by_broker``, the original message's publisher."""
    by_broker: bool = False
    """RabbitMQ dead-lettered it itself (it carries ``x-death``)."""

    @classmethod
    def of(
        cls,
        body: bytes,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        user_id: object = None,
    ) -> DeadLetter:
        """The dead letter a message of the dead-letter exchange carries."""
        sender = Sender.of(user_id, headers)
        reason = header_text(
            headers, REASON_HEADER, "dead-lettered by the broker" if sender.by_broker else "unknown"
        )
        return cls(body, reason, message_id, sender.user, sender.by_broker)

    @property
    def task_id(self) -> str | None:
        identity = parse_message_id(self.message_id)
        if identity is not None:
            return identity[0]
        return body_field(self.body, "task_id")

    @property
    def kind(self) -> str | None:
        """The ``kind`` the body says it is, if it parses and says (``task``, ``task.finished``...)."""
        return body_field(self.body, "kind")

    @property
    def attempt(self) -> int | None:
        identity = parse_message_id(self.message_id)
        return identity[1] if identity is not None else None
