"""Task and agent records as JSON text, the one encoding every durable store writes.

Shared by the SQLite and PostgreSQL stores so that a record means the same
in both. The encoding follows the dataclasses' fields, so a field added to
``Task`` or ``AgentCapability`` is stored without a change here; enums are
written as their values. Reading is lenient the way an upgrade needs: a
field missing from an older record takes its default, and an unknown key
(a record written by a newer version) is left out rather than refused (the
stores' schema versions refuse a newer database as a whole).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

from .models import AgentCapability, Delivery, Task, TaskStatus

_AGENT_RUNTIME = frozenset({"current_load", "running"})
"""Not stored: the orchestrator recounts an agent's running tasks from the tasks."""


def _enum_fields(cls: type) -> dict[str, type[enum.Enum]]:
    """The fields of ``cls`` typed as an enum (or an optional one), with their enum."""
    found: dict[str, type[enum.Enum]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        for option in options:
            if isinstance(option, type) and issubclass(option, enum.Enum):
                found[name] = option
    return found


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
_TASK_ENUMS = _enum_fields(Task)
_AGENT_FIELDS = tuple(
    f.name for f in dataclasses.fields(AgentCapability) if f.name not in _AGENT_RUNTIME
)
_AGENT_ENUMS = _enum_fields(AgentCapability)


def _encode(record: object, names: tuple[str, ...], enums: dict[str, type[enum.Enum]]) -> str:
    data = {n: getattr(record, n) for n in names}
    for name in enums:
        if data[name] is not None:
            data[name] = data[name].value
    return json.dumps(data, separators=(",", ":"))


def _decode(text: str, names: tuple[str, ...], enums: dict[str, type[enum.Enum]]) -> dict:
    data: dict[str, Any] = json.loads(text)
    if len(data) != len(names) or not all(n in data for n in names):
        data = {n: data[n] for n in names if n in data}  # older or newer: its known fields
    for name, kind in enums.items():
        if data.get(name) is not None:
            data[name] = kind(data[name])
    return data


def task_to_record(task: Task) -> str:
    return _encode(task, _TASK_FIELDS, _TASK_ENUMS)


def task_from_record(text: str) -> Task:
    data = _decode(text, _TASK_FIELDS, _TASK_ENUMS)
    if "delivery" not in data:
        # Written before the delivery field, when "assigned" meant queued.
        data["delivery"] = Delivery.NONE
        if data["status"] is TaskStatus.ASSIGNED and data.get("assigned_agent") is None:
            data["status"] = TaskStatus.PENDING
    return Task(**data)


def agent_to_record(agent: AgentCapability) -> str:
    return _encode(agent, _AGENT_FIELDS, _AGENT_ENUMS)


def agent_from_record(text: str) -> AgentCapability:
    """An agent as last saved; the orchestrator recounts its running tasks from theirs."""
    return AgentCapability(**_decode(text, _AGENT_FIELDS, _AGENT_ENUMS))
