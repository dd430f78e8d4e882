"""Validation of ``submit_task`` arguments: one ``ValueError`` naming the bad field.

A rejected submit must leave no trace, so everything that can be checked is
checked here, before the orchestrator records anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.routing import AGENT_ID_PATTERN, CAPABILITY_PATTERN

from .models import TaskPriority

PositiveSeconds = Annotated[float, Field(gt=0, strict=True)]


class SubmitRequest(BaseModel):
    """The arguments of ``submit_task``, checked."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: Annotated[str, Field(strict=True, min_length=1, max_length=500)]
    description: Annotated[str, Field(strict=True, max_length=10_000)] = ""
    task_type: Annotated[str, Field(strict=True, min_length=1, max_length=200)]
    payload: dict[str, Any]
    priority: TaskPriority = TaskPriority.MEDIUM
    dependencies: list[Annotated[str, Field(strict=True)]] = []
    required_capabilities: list[Annotated[str, Field(strict=True)]] = []
    estimated_duration: PositiveSeconds = 300
    timeout: PositiveSeconds = 600
    max_retries: Annotated[int, Field(ge=0, le=100, strict=True)] = 3

    @field_validator("name", "task_type")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> TaskPriority:
        if isinstance(value, TaskPriority):
            return value
        if isinstance(value, str):
            try:
                return TaskPriority(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(p.value for p in TaskPriority)
        raise ValueError(f"must be a TaskPriority or one of {allowed}, got {value!r}")

    @field_validator("required_capabilities")
    @classmethod
    def _capabilities(cls, value: list[str]) -> list[str]:
        for cap in value:
            if not CAPABILITY_PATTERN.match(cap):
                raise ValueError(f"{cap!r} is not a capability name: use 1-64 of A-Z a-z 0-9 _ -")
        return sorted(set(value))

    @field_validator("dependencies")
    @classmethod
    def _dependencies(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # de-duplicated, order kept

    @field_validator("estimated_duration", "timeout")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value


_PAYLOAD_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
"""``json.dumps`` with these options, made once (``dumps`` makes one per call)."""


def validate_submit(max_payload_bytes: int, **arguments: Any) -> SubmitRequest:
    """Check the arguments; raise ``ValueError("<field>: <why>")`` on the first bad one."""
    try:
        request = SubmitRequest(**arguments)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "arguments"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}") from None
    try:
        encoded = _PAYLOAD_ENCODER.encode(request.payload)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload: must be JSON-serialisable: {exc}") from None
    if len(encoded.encode()) > max_payload_bytes:
        raise ValueError(
            f"payload: {len(encoded.encode())} bytes exceeds max_payload_bytes={max_payload_bytes}"
        )
    return request


# --- agents -----------------------------------------------------------------

MAX_TASK_TYPES = 1000
"""Task types an announcement may name."""


def validate_agent(agent_id: object, capabilities: object, max_concurrent_tasks: object) -> None:
    """``ValueError`` naming the first bad argument of ``register_agent``."""
    if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.match(agent_id):
        raise ValueError(f"agent_id: {agent_id!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
    if (
        isinstance(capabilities, str)
        or not isinstance(capabilities, Iterable)
        or not all(isinstance(c, str) and CAPABILITY_PATTERN.match(c) for c in capabilities)
    ):
        raise ValueError(
            f"capabilities: {capabilities!r} must be a list of names of 1-64 of A-Z a-z 0-9 _ -"
        )
    if (
        not isinstance(max_concurrent_tasks, int)
        or isinstance(max_concurrent_tasks, bool)
        or max_concurrent_tasks < 1
    ):
        raise ValueError(
            f"max_concurrent_tasks: must be a whole number >= 1, got {max_concurrent_tasks!r}"
        )


def validate_task_types(task_types: object) -> None:
    """``ValueError`` naming a bad ``task_types`` of an announcement."""
    if (
        not isinstance(task_types, list)
        or len(task_types) > MAX_TASK_TYPES
        or not all(isinstance(t, str) and 0 < len(t) <= 255 and t.isprintable() for t in task_types)
    ):
        raise ValueError(
            f"task_types: {str(task_types)[:200]!r} must be a list of at most {MAX_TASK_TYPES}"
            " printable names of 1-255 characters"
        )
