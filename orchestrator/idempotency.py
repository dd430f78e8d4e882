"""Idempotent submits: one idempotency key, one task.

A client that sends a submit again because it never saw the reply (a
timeout, a lost connection), and a request that the broker redelivers
because the orchestrator that handled it was killed before acknowledging
it, must not make a second task. So a submit may carry a key (over the
request protocol it defaults to the AMQP ``message_id``): while the task
first submitted with that key is kept, a submit with the same key and the
same parameters returns that task's id and creates, stores and publishes
nothing. The key is a field of the task's record, so it outlives a restart
on a durable store, and it is forgotten with the task (``finished_task_ttl``
after the task ended): that is the retention window.

The same key with other parameters is refused (``IdempotencyConflict``, a
``ValueError`` naming the key, the first task and the parameters that
differ), as Stripe refuses it: returning the first task would hand the
caller a task that is not the one it asked for, silently.

A repeat that arrives while the first submit is still under way (publishing,
or waiting for the broker) waits for it: if that submit was refused and left
nothing, the repeat submits afresh instead of returning an id that is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .models import Task
from .records import TaskRecords
from .validation import SubmitRequest

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
"""As long as an AMQP ``message_id`` can be (a short string)."""

PARAMETERS = (
    "name",
    "description",
    "task_type",
    "payload",
    "priority",
    "dependencies",
    "required_capabilities",
    "estimated_duration",
    "timeout",
    "max_retries",
)
"""What a repeated submit must ask for again: every argument of ``submit_task``."""


class IdempotencyConflict(ValueError):
    """Raised when an idempotency key already names a task with other parameters."""


def check_key(value: Any) -> str | None:
    """The key, or None for no key; ``ValueError("idempotency_key: ...")`` if it is not one."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"idempotency_key: must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError("idempotency_key: must not be empty (pass None for no key)")
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(
            f"idempotency_key: {len(value)} characters exceeds the limit of {MAX_KEY_LENGTH}"
        )
    return value


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from a store (tuples are lists, keys are strings)."""
    return json.loads(json.dumps(value, default=str))


def differences(task: Task, request: SubmitRequest) -> list[str]:
    """The parameters of ``request`` that differ from those ``task`` was submitted with."""
    differ = []
    for name in PARAMETERS:
        asked, first = getattr(request, name), getattr(task, name)
        if name == "payload":
            asked, first = _as_json(asked), _as_json(first)
        if asked != first:
            differ.append(name)
    return differ


class IdempotentSubmits:
    """Maps a repeated key to its first task; lets one submit of a key run at a time."""

    def __init__(self, records: TaskRecords) -> None:
        self.records = records
        self._under_way: dict[str, asyncio.Future[None]] = {}
        """Keys whose first submit has not returned yet; done when it has."""

    async def once(
        self, key: str, request: SubmitRequest, submit: Callable[[], Awaitable[str]]
    ) -> str:
        """The id of the task kept for ``key``, or of the one ``submit`` creates."""
        while (under_way := self._under_way.get(key)) is not None:
            await asyncio.shield(under_way)
        # From here to the task's record (inside ``submit``) there is no await:
        # a repeat arriving meanwhile finds the key under way or recorded.
        first = self.records.by_key(key)
        if first is not None:
            differ = differences(first, request)
            if differ:
                raise IdempotencyConflict(
                    f"idempotency_key: {key!r} was used for task {first.task_id} with other"
                    f" {', '.join(differ)}: a new task needs a new key"
                )
            log.info("idempotency key %r repeated: task %s, nothing new", key, first.task_id)
            return first.task_id
        done = asyncio.get_running_loop().create_future()
        self._under_way[key] = done
        try:
            return await submit()
        finally:
            del self._under_way[key]
            done.set_result(None)
