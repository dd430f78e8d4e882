"""JSON Schemas of every wire message and an AsyncAPI 2.6 document of the bus.

Both are generated from the pydantic models of ``broker.messages`` and
``broker.rpc`` and the exchanges and queues of ``broker.topology``, and checked in under ``docs/``; a test fails
when they drift from the models. Regenerate them with::

    python -m broker.schemas docs        # or: orchestrator schemas --out docs

Channel names carry the deployment's prefix as the parameter ``{prefix}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from .envelope import CONTENT_TYPE
from .messages import (
    SCHEMA_VERSION,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    CancelTask,
    CancelTasks,
    ConsumeQueues,
    ProceedTask,
    Reannounce,
    SyncReports,
    TaskAssigned,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TasksReported,
    TaskStarted,
    Unregister,
    WireMessage,
)
from .rpc import (
    RESULT_TYPES,
    AgentsRequest,
    CancelTaskRequest,
    QueuesRequest,
    Reply,
    ReplyResult,
    StatsRequest,
    SubmitTaskRequest,
    TasksRequest,
    TaskStatusRequest,
)
from .topology import DIRECT_REPLY_TO, MAX_PRIORITY, Exchange, Queue, Topology

TASKS: tuple[type[WireMessage], ...] = (TaskMessage,)
EVENTS: tuple[type[WireMessage], ...] = (
    TaskAssigned,
    TaskStarted,
    TaskProgress,
    TaskFinished,
    TasksReported,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
)
CONTROLS: tuple[type[WireMessage], ...] = (
    ConsumeQueues,
    ProceedTask,
    CancelTask,
    CancelTasks,
    Unregister,
    Reannounce,
    SyncReports,
)
REQUESTS: tuple[type[WireMessage], ...] = (
    SubmitTaskRequest,
    CancelTaskRequest,
    TaskStatusRequest,
    StatsRequest,
    AgentsRequest,
    QueuesRequest,
    TasksRequest,
)
REPLIES: tuple[type[WireMessage], ...] = (Reply,)

WIRE_MESSAGES: tuple[type[WireMessage], ...] = TASKS + EVENTS + CONTROLS + REQUESTS + REPLIES
"""Every message that crosses the bus, in the order the documents list them."""

RESULT_MODELS: tuple[type[ReplyResult], ...] = tuple(
    dict.fromkeys(result.model for result in RESULT_TYPES.values())
)
"""The models of successful replies' results (of their items, for lists), from
``RESULT_TYPES``: the one table of results, by request kind."""


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
AMQP_BINDING_VERSION = "0.2.0"


def kind_of(model: type[WireMessage]) -> str:
    return model.model_fields["kind"].default


def json_schemas() -> dict[str, dict[str, Any]]:
    """``{file name: JSON Schema}``, one self-contained schema per wire message."""
    documents = {}
    for model in WIRE_MESSAGES:
        schema = model.model_json_schema()
        documents[f"{model.__name__}.json"] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": f"{model.__name__}.json",
            **schema,
        }
    for result in RESULT_TYPES.values():
        name = result.schema_name
        if result.list_name is None:
            schema = result.model.model_json_schema()
        else:
            schema = {"title": name, **TypeAdapter(result.annotation).json_schema()}
        documents[f"{name}.json"] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$id": f"{name}.json",
            **schema,
        }
    return documents


def _message(model: type[WireMessage], *, reply: bool = False) -> dict[str, Any]:
    doc = (model.__doc__ or "").strip()
    message: dict[str, Any] = {
        "name": kind_of(model),
        "title": model.__name__,
        "summary": doc.split("\n\n")[0].replace("\n", " ") if doc else kind_of(model),
        "contentType": CONTENT_TYPE,
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        "bindings": {
            "amqp": {"messageType": kind_of(model), "bindingVersion": AMQP_BINDING_VERSION}
        },
    }
    if model in REQUESTS or reply:
        message["correlationId"] = {
            "description": "AMQP property correlation_id: the reply carries the request's",
            "location": "$message.header#/correlation_id",
        }
    if model in REQUESTS:
        message["x-reply"] = {"$ref": f"#/components/messages/{_reply_name(model)}"}
    return message


def _reply_name(request: type[WireMessage]) -> str:
    return request.__name__.removesuffix("Request") + "Reply"


def _reply_message(request: type[WireMessage]) -> dict[str, Any]:
    """The Reply to one kind of request, its result typed."""
    result = RESULT_TYPES[kind_of(request)].schema_name
    return {
        "name": kind_of(Reply),
        "title": _reply_name(request),
        "summary": f"The reply to {kind_of(request)}: when ok, its result is a {result}.",
        "contentType": CONTENT_TYPE,
        "payload": {
            "allOf": [
                {"$ref": "#/components/schemas/Reply"},
                {
                    "properties": {
                        "result": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{result}"},
                                {"type": "null"},
                            ]
                        }
                    }
                },
            ]
        },
        "correlationId": {
            "description": "AMQP property correlation_id: the reply carries the request's",
            "location": "$message.header#/correlation_id",
        },
        "bindings": {
            "amqp": {"messageType": kind_of(Reply), "bindingVersion": AMQP_BINDING_VERSION}
        },
    }


def _refs(models: tuple[type[WireMessage], ...]) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/messages/{m.__name__}"} for m in models]
    return refs[0] if len(refs) == 1 else {"oneOf": refs}


def _exchange(exchange: Exchange) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange.name,
                "type": exchange.type,
                "durable": exchange.durable,
                "autoDelete": exchange.auto_delete,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _queue(queue: Queue) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": queue.name,
                "durable": queue.durable,
                "exclusive": queue.exclusive,
                "autoDelete": queue.auto_delete,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 2.6 document: the orchestrator's channels, seen by a client.

    In AsyncAPI 2, ``publish`` lists what a client sends into a channel and
    ``subscribe`` what a client receives from it.
    """
    t = Topology("{prefix}")
    prefix = {"prefix": {"$ref": "#/components/parameters/prefix"}}
    keyed = {**prefix, "capabilityKey": {"$ref": "#/components/parameters/capabilityKey"}}
    agent = {**prefix, "agentId": {"$ref": "#/components/parameters/agentId"}}
    _, top = models_json_schema(
        [(model, "validation") for model in (*WIRE_MESSAGES, *RESULT_MODELS)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = dict(top["$defs"])
    for result in RESULT_TYPES.values():
        if result.list_name is not None:
            schemas[result.list_name] = {
                "title": result.list_name,
                "type": "array",
                "items": {"$ref": f"#/components/schemas/{result.model.__name__}"},
            }
    channels: dict[str, Any] = {
        t.rpc_queue: {
            "description": (
                "Requests of other services to the orchestrator. Publish to the exchange"
                f" {t.requests_exchange} with this queue's name as routing key, with the AMQP"
                " properties reply_to (a queue of yours, or amq.rabbitmq.reply-to) and"
                " correlation_id; set expiration to how long you wait, so that a request"
                " nobody took in time is dropped. Each request gets one Reply."
            ),
            "parameters": prefix,
            "bindings": _queue(t.rpc().queue),
            "publish": {
                "operationId": "sendRequest",
                "summary": "Submit, cancel, status, stats, agents or queues.",
                "message": _refs(REQUESTS),
            },
        },
        DIRECT_REPLY_TO: {
            "description": (
                "Replies, sent through the default exchange to the request's reply_to with its"
                " correlation_id: RabbitMQ's direct reply-to pseudo-queue (consume it with"
                " no-ack on the channel that publishes the request), or any queue of yours."
            ),
            "subscribe": {
                "operationId": "receiveReply",
                "summary": "The reply to one request; its result's type depends on the request.",
                "message": {
                    "oneOf": [{"$ref": f"#/components/messages/{_reply_name(r)}"} for r in REQUESTS]
                },
            },
        },
        t.tasks_exchange: {
            "description": (
                "Direct exchange of tasks; routing key = capability key (the sorted required"
                f" capabilities joined by '+', '@any' for none); AMQP priority 0-{MAX_PRIORITY}."
            ),
            "parameters": prefix,
            "bindings": _exchange(t.exchanges.tasks),
            "subscribe": {
                "operationId": "receiveTask",
                "summary": "Published by the orchestrator, one message per attempt.",
                "message": _refs(TASKS),
            },
        },
        t.task_queue("{capabilityKey}"): {
            "description": (
                f"Priority queue (x-max-priority {MAX_PRIORITY}) of the tasks needing exactly"
                " one capability set; agents whose capabilities cover it consume it."
            ),
            "parameters": keyed,
            "bindings": _queue(t.capability("{capabilityKey}").queue),
            "subscribe": {
                "operationId": "consumeTask",
                "summary": "Agents take tasks; they ack after the final event is confirmed.",
                "message": _refs(TASKS),
            },
        },
        t.events_exchange: {
            "description": (
                "Topic exchange of status events; routing key = <kind>.<agent id> (for"
                " example task.finished.agent-7). Bind your own queue (task.finished.#,"
                " task.#, agent.#) to watch them."
            ),
            "parameters": prefix,
            "bindings": _exchange(t.exchanges.events),
            "publish": {
                "operationId": "reportEvent",
                "summary": "Agents report progress and results, and announce themselves.",
                "message": _refs(EVENTS),
            },
            "subscribe": {
                "operationId": "watchEvents",
                "summary": "The orchestrator and monitors follow the events.",
                "message": _refs(EVENTS),
            },
        },
        t.control_exchange: {
            "description": (
                "Direct exchange of commands to agents; routing key = agent id, or"
                f" '{Topology.BROADCAST_KEY}' for every agent."
            ),
            "parameters": prefix,
            "bindings": _exchange(t.exchanges.control),
            "subscribe": {
                "operationId": "receiveControl",
                "summary": "Sent by the orchestrator.",
                "message": _refs(CONTROLS),
            },
        },
        t.agent_control_queue("{agentId}"): {
            "description": "One agent's commands (auto-delete).",
            "parameters": agent,
            "bindings": _queue(t.agent_control("{agentId}").queue),
            "subscribe": {"operationId": "consumeControl", "message": _refs(CONTROLS)},
        },
        t.dead_exchange: {
            "description": (
                "Fanout exchange of messages nobody could process, with the header x-reason;"
                f" kept in {t.dead_queue} for people and {t.orchestrator_dead_queue} for the"
                " orchestrator. Bodies are whatever was rejected."
            ),
            "parameters": prefix,
            "bindings": _exchange(t.exchanges.dead),
        },
    }
    return {
        "asyncapi": "2.6.0",
        "id": "urn:rabbit-task-orchestrator:bus",
        "info": {
            "title": "rabbit-task-orchestrator bus",
            "version": str(SCHEMA_VERSION),
            "description": (
                "The RabbitMQ bus of the task orchestrator: its request protocol for other"
                " services, and the tasks, events and commands between orchestrator and"
                " agents. Every message is JSON with v (schema version) and kind."
                " Generated from broker/messages.py and broker/rpc.py by broker/schemas.py."
            ),
        },
        "servers": {
            "local": {
                "url": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ (3.10 or newer)",
            }
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "components": {
            "schemas": schemas,
            "messages": {
                **{m.__name__: _message(m, reply=m in REPLIES) for m in WIRE_MESSAGES},
                **{_reply_name(r): _reply_message(r) for r in REQUESTS},
            },
            "parameters": {
                "prefix": {
                    "description": "The deployment's prefix (ORCHESTRATOR_PREFIX).",
                    "schema": {
                        "type": "string",
                        "default": "orchestrator",
                        "pattern": "^[A-Za-z0-9_-]{1,64}$",
                    },
                },
                "capabilityKey": {
                    "description": "Sorted capability names joined by '+'; '@any' for none.",
                    "schema": {"type": "string"},
                },
                "agentId": {
                    "description": "An agent's id.",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
                },
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    """How the documents are written: stable, so that a diff shows a real change."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[str, str]:
    """``{path under the docs directory: text}`` of every generated file."""
    files = {f"schemas/{name}": render(schema) for name, schema in json_schemas().items()}
    files["asyncapi.json"] = render(asyncapi())
    return files


def write(directory: Path | str) -> list[Path]:
    """Write the generated files under ``directory``; stale schema files are removed."""
    root = Path(directory)
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    files = generated()
    for stale in (root / "schemas").glob("*.json"):
        if f"schemas/{stale.name}" not in files:
            stale.unlink()
    written = []
    for relative, text in files.items():
        path = root / relative
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m broker.schemas DIR   (writes DIR/schemas/*.json and DIR/asyncapi.json)"
        )
        return 2
    for path in write(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
