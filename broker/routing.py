"""The names that become routing keys and queue names, and the keys made of them.

A task's routing key is ``<task type>.<capability key>``: an agent consumes
the queues of the types it handles whose capability sets it covers. Names are
checked against safe alphabets because they end up in AMQP names; what would
not fit RabbitMQ's 255 bytes is written as a digest. ``broker.topology``
builds the queue names from these keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

CAPABILITY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""The safe alphabet of capability names: they become routing keys and queue names."""

AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

ANY_CAPABILITY_KEY = "@any"
"""Key of the queue for tasks that require nothing; '@' is outside the alphabet."""

DIGEST_PREFIX = "sha1-"
"""How a capability key (or task type) written as a digest begins; outside
the capability alphabet's '+'-joined names, so it reads back unambiguously."""

_MAX_KEY_LENGTH = 119
"""Longest capability key written as it is; longer ones are a digest. A task
queue is ``<prefix>.tasks.<task type>.<capability key>``: with the longest
prefix (64) and task type (64) it stays within RabbitMQ's 255 bytes."""


def capability_key(capabilities: Iterable[str]) -> str:
    """The routing key of a capability set: sorted, de-duplicated, joined by '+'.

    Long sets are shortened to a digest so that queue names stay under
    RabbitMQ's 255-byte limit.
    """
    caps = sorted(set(capabilities))
    if not caps:
        return ANY_CAPABILITY_KEY
    key = "+".join(caps)
    if len(key) > _MAX_KEY_LENGTH:
        key = DIGEST_PREFIX + hashlib.sha1(key.encode()).hexdigest()
    return key


TASK_TYPE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""Task types written as they are in a queue key; any other is written as a digest."""


def route_key(task_type: str, capabilities: Iterable[str]) -> str:
    """The routing key of the tasks of ``task_type`` needing ``capabilities``:
    ``<task type>.<capability key>`` (``trade.@any``, ``report.finance+pdf``).

    The task type is part of the key so that a task reaches only an agent with
    a handler for it, as Celery routes by task name: an agent consumes the
    queues of the types it handles (all of them with a ``*`` handler) whose
    capability sets it covers. A type outside the safe alphabet, or longer
    than 64, is written as a digest; the capability key never holds a '.', so
    the key reads back unambiguously.
    """
    if TASK_TYPE_KEY_PATTERN.match(task_type):
        type_part = task_type
    else:
        type_part = DIGEST_PREFIX + hashlib.sha1(task_type.encode()).hexdigest()[:20]
    return f"{type_part}.{capability_key(capabilities)}"


def covers(agent_capabilities: Iterable[str], required: Iterable[str]) -> bool:
    """Whether an agent with these capabilities may run a task needing ``required``."""
    return set(required) <= set(agent_capabilities)
