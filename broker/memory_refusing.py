"""A queue of the in-process bus bounded as RabbitMQ's ``reject-publish`` bounds one.

Beside ``broker.memory_queues`` (whose ``MessageQueue`` drops the oldest,
``drop-head``): the orchestrator's announcements and each agent's events
queue refuse a publish past their length, and keep what they hold.
"""

from __future__ import annotations

from .envelope import Envelope
from .errors import PublishRefused
from .memory_queues import MessageQueue
from .topology import Queue


class RefusingQueue(MessageQueue):
    """A durable queue bounded with ``x-overflow`` ``reject-publish``: past its
    length a publish is refused (``PublishRefused``, RabbitMQ's nack) and
    nothing already in it is dropped (an agent's events queue, the announcements)."""

    @classmethod
    def of(cls, queue: Queue) -> RefusingQueue:
        return cls(queue.name, queue.max_length)

    def deliver(self, envelope: Envelope, routing_key: str) -> None:
        if self.max_length is not None and self.items.qsize() >= self.max_length:
            self.dropped += 1  # (refused, here)
            raise PublishRefused(f"queue {self.name!r} is full ({self.max_length}): reject-publish")
        self.items.put_nowait(envelope)
