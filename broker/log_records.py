"""Structured logs: which task and agent a log record is about, and one JSON object per line.

Log shippers (Loki, Elasticsearch, CloudWatch) index fields, not prose: a
record of ours names its ``task_id`` and ``agent_id`` as fields, whether the
line came from our code or from a user's handler logging in the middle of a
task. They come from context variables set around the work (``about``),
which asyncio copies into every task it starts from there (and
``handlers.py`` into a sync handler's thread), so no call site has to pass
them along; an explicit ``extra={"task_id": ...}`` wins.

Here rather than in the command line because both sides of the bus log this
way, and ``agents`` does not import ``orchestrator``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator

task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
agent_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("agent_id", default=None)


@contextlib.contextmanager
def about(*, task_id: str | None = None, agent_id: str | None = None) -> Iterator[None]:
    """Records logged inside (and in tasks started inside) are about this task / agent."""
    tokens = []
    if task_id is not None:
        tokens.append((task_id_var, task_id_var.set(task_id)))
    if agent_id is not None:
        tokens.append((agent_id_var, agent_id_var.set(agent_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Stamps ``task_id`` and ``agent_id`` on each record (None when not known)."""

    def __init__(self, agent_id: str | None = None) -> None:
        super().__init__()
        self.agent_id = agent_id
        """The process's own agent, for records logged outside any task."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            record.task_id = task_id_var.get()
        if getattr(record, "agent_id", None) is None:
            record.agent_id = agent_id_var.get() or self.agent_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, task_id, agent_id, message.

    ``ensure_ascii``: every control character and every non-ASCII one is
    escaped, so no field a task carries can break the line or reach a
    terminal raw. A traceback is the ``exc_info`` field, not extra lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "task_id": getattr(record, "task_id", None),
            "agent_id": getattr(record, "agent_id", None),
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def _iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
