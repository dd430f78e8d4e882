"""OpenTelemetry spans and trace context for what crosses the bus.

Only ``opentelemetry-api`` is a dependency: without an SDK configured (the
default) every call here returns at the first check, so a deployment that
does not trace pays nothing per message. With one (``opentelemetry-sdk`` and
an exporter, set up by the application as usual), a task is one trace from
``submit`` through the publish, the agent's handler and the final event back
to the orchestrator: the W3C ``traceparent`` / ``tracestate`` travel in the
AMQP headers, and a task keeps the context it was submitted in, so a retry
published minutes later still joins the submitter's trace.

Spans follow the OpenTelemetry messaging conventions: a PRODUCER span
``send <destination>`` around each publish and a CONSUMER span
``process <destination>`` around handling a message, with
``messaging.system = rabbitmq``, ``messaging.destination.name =
<exchange>:<routing key>``, ``messaging.operation.type`` / ``.name``,
``messaging.message.id`` and ``messaging.rabbitmq.destination.routing_key``.

Which exchange and routing key name a span is the topology's business, so
the spans of the orchestrator's and the agents' own messages are made here
from a ``Topology`` (``task_send_span``, ``task_process_span``,
``event_process_span``): the packages above the bus name a task's queue key
or an event, never an exchange.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import ProxyTracerProvider, SpanKind

if TYPE_CHECKING:
    from .messages import Event
    from .topology import Topology

TRACE_HEADERS = ("traceparent", "tracestate")
"""The headers the W3C propagator reads and writes (the default propagator)."""

_tracer = trace.get_tracer("rabbit-task-orchestrator")
_FROM_ENVIRONMENT = OTEL_PYTHON_TRACER_PROVIDER in os.environ
"""Whether the environment names a provider (the API loads it when first asked)."""
_NOT_TRACING = contextlib.nullcontext()
"""What the span helpers below return when nobody traces (reusable, yields None):
no generator-based context manager made per message."""


_installed = False
_NOT_KNOWN = object()


def active() -> bool:
    """Whether an SDK is installed: else spans are never recorded, so we make none.

    Asked several times per message, so it costs a global read once an SDK is
    installed (a provider is set once and for all) and, until then, a module
    attribute read: ``trace.get_tracer_provider`` would look the environment
    up each time (``OTEL_PYTHON_TRACER_PROVIDER``), which is read here once.
    """
    global _installed
    if _installed:
        return True
    if _FROM_ENVIRONMENT or getattr(trace, "_TRACER_PROVIDER", _NOT_KNOWN) is not None:
        # Set (or an API without that attribute): ask the API itself.
        _installed = not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)
    return _installed


def current_context() -> dict[str, str]:
    """The caller's trace context as headers (to keep with a task); empty when not tracing."""
    if not active():
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_of(headers: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The trace context carried by ``headers`` (strings only: headers are input)."""
    if not headers or not active():
        return None
    carrier = trace_headers(headers)
    if not carrier:
        return None
    return propagate.extract(carrier)


def _attributes(
    operation: str, exchange: str, routing_key: str, message_id: str | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": f"{exchange}:{routing_key}",
        "messaging.rabbitmq.destination.routing_key": routing_key,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


@contextlib.contextmanager
def send_span(
    headers: MutableMapping[str, Any],
    exchange: str,
    routing_key: str,
    *,
    message_id: str | None = None,
    parent: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Around one publish: a PRODUCER span, its context written into ``headers``.

    ``parent`` is a kept trace context (a task's, from ``current_context``);
    without it the span is a child of whatever is current.
    """
    if not active():
        yield
        return
    parent_context = context_of(parent) if parent else None
    with _tracer.start_as_current_span(
        f"send {exchange}:{routing_key}",
        context=parent_context,
        kind=SpanKind.PRODUCER,
        attributes=_attributes("send", exchange, routing_key, message_id),
    ):
        propagate.inject(headers)
        yield


@contextlib.contextmanager
def process_span(
    headers: Mapping[str, Any] | None,
    exchange: str,
    routing_key: str,
    *,
    message_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span | None]:
    """Around handling one message: a CONSUMER span, child of the context in ``headers``.

    Everything published inside (a final event, a retry) joins the same trace.
    """
    if not active():
        yield None
        return
    with _tracer.start_as_current_span(
        f"process {exchange}:{routing_key}",
        context=context_of(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            **_attributes("process", exchange, routing_key, message_id),
            **(attributes or {}),
        },
    ) as span:
        yield span


def task_send_span(
    topology: Topology,
    queue_key: str,
    *,
    message_id: str | None = None,
    parent: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[None]:
    """``send_span`` around publishing a task to ``queue_key`` (the bus stamps the
    span's context on the message)."""
    if not active():
        return _NOT_TRACING
    return send_span({}, topology.tasks_exchange, queue_key, message_id=message_id, parent=parent)


def task_process_span(
    topology: Topology | None,
    headers: Mapping[str, Any] | None,
    queue_key: str,
    *,
    message_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """``process_span`` around running a task delivered from ``queue_key``."""
    if not active():
        return _NOT_TRACING
    exchange = topology.tasks_exchange if topology is not None else ""
    return process_span(headers, exchange, queue_key, message_id=message_id, attributes=attributes)


def event_process_span(
    topology: Topology,
    headers: Mapping[str, Any] | None,
    event: Event,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """``process_span`` around handling an agent's event (named by its routing key)."""
    if not active():
        return _NOT_TRACING
    key = topology.event_key(event.kind, event.agent_id)
    return process_span(headers, topology.events_exchange, key, attributes=attributes)


def trace_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace headers among a received message's headers (strings, bounded: input)."""
    if not headers:
        return {}
    return {k: v for k in TRACE_HEADERS if isinstance(v := headers.get(k), str) and len(v) < 512}


def with_current_context(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """``headers`` with the caller's trace context added (the same object when not tracing)."""
    if not active():
        return headers
    carrier = dict(headers)
    propagate.inject(carrier)
    return carrier
