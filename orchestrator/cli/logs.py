"""Logs on stderr, through one filter that keeps broker passwords out of every record,
and one formatter that keeps every record on its line.

A record's message often holds what agents and other services sent (a task's
name or type, an error, an agent id): a newline there must not start what
reads as a record of its own, nor an escape sequence reach the terminal. So
the message is escaped (``escaping.escape_line``), and the lines of a
traceback or stack, which are a record's own, are indented under it with
their other controls escaped: every line that starts at the margin starts
a real record.
"""

from __future__ import annotations

import logging
import re
import sys
from enum import Enum, StrEnum
from typing import Annotated

import typer

from broker import AGENT_ID_PATTERN
from broker.log_records import ContextFilter, JsonFormatter

from . import redaction
from .escaping import escape_line, escape_lines


class LogFilter(logging.Filter):
    """Blanks out passwords; hides the AMQP libraries' own logs until connected.

    Until then a failed connect is reported once, by ``main``, as one line;
    afterwards their reconnect messages are what an operator wants to see.
    """

    transport_quiet = True

    def filter(self, record: logging.LogRecord) -> bool:
        if self.transport_quiet and record.name.startswith(("aiormq", "aio_pika")):
            return False
        if redaction.known_secrets:
            _scrub_record(record)
        return True


_formatter = logging.Formatter()


def _scrub_record(record: logging.LogRecord) -> None:
    """The record's message, traceback and stack without any password we know of.

    The traceback is formatted here, scrubbed, and kept in ``exc_text``, which
    every ``logging.Formatter`` prints instead of formatting ``exc_info`` again.
    """
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep what there is, as text
        message = f"{record.msg} {record.args}"
    record.msg = redaction.scrub(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = _formatter.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redaction.scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = redaction.scrub(record.stack_info)


class EscapingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose every record starts one line at the margin:
    the message with its control characters escaped, a traceback or stack
    indented beneath it."""

    INDENT = "  "

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_line(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                lines = escape_lines(block.rstrip("\n")).split("\n")
                text += "".join(f"\n{self.INDENT}{line}" for line in lines)
        return text


TASK_ID = re.compile(r"task_[0-9a-f]{32}")
"""A task id as the orchestrator makes them (``task_`` and a uuid4's hex)."""


class TaskIdFilter(logging.Filter):
    """Names the task of a record about one that no context named: the first of
    its arguments that is a task id; and its agent, the argument its format
    names as one.

    The orchestrator's records name their task as an argument (``"submitted
    %s (%s)"``) rather than inside ``log_records.about``, as an agent's do;
    without this their ``task_id`` field is empty, and a log shipper cannot
    find a task's lines by it. An argument must be a whole task id, not text
    holding one, so a task's name cannot pass for another task.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None and isinstance(record.args, tuple):
            ids = (a for a in record.args if isinstance(a, str) and TASK_ID.fullmatch(a))
            record.task_id = next(ids, None)
        if getattr(record, "agent_id", None) is None:
            record.agent_id = _agent_named(record)
        return True


_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrifgex]")


def _agent_named(record: logging.LogRecord) -> str | None:
    """The argument a record's format names as an agent (``"agent %s ..."``,
    the orchestrator's way), if it is an agent id: an agent's name is any of
    the id alphabet, so only its place in the format can say which it is."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple) or "agent %s" not in msg:
        return None
    position = len(_PLACEHOLDER.findall(msg[: msg.index("agent %s")].replace("%%", "")))
    if position < len(args) and isinstance(args[position], str):
        if AGENT_ID_PATTERN.fullmatch(args[position]):
            return args[position]
    return None


log_filter = LogFilter()
"""One filter for the process: a command that has connected lets transport logs through."""


class LogFormat(StrEnum):
    text = "text"
    json = "json"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        help="text, or json: one object per line (time, level, logger, task_id, agent_id, message).",
    ),
]


def setup_logging(level: str | Enum, log_format: str | Enum = LogFormat.text) -> None:
    level = level.value if isinstance(level, Enum) else level
    log_format = log_format.value if isinstance(log_format, Enum) else log_format
    handler = logging.StreamHandler(sys.stderr)
    if log_format == LogFormat.json.value:
        handler.setFormatter(JsonFormatter())  # JSON escapes every control character itself
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())  # a context's task first, then an argument's
    handler.addFilter(TaskIdFilter())
    handler.addFilter(log_filter)  # last: a record it scrubs has its arguments formatted in
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
