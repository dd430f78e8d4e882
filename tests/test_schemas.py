"""The checked-in JSON Schemas and AsyncAPI document match the wire models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

from broker import Topology
from broker.messages import RESULT_TYPES, Outcome, Priority, TaskState, WireMessage
from broker.schemas import (
    REQUESTS,
    WIRE_MESSAGES,
    asyncapi,
    generated,
    kind_of,
    write,
)
from broker.topology import DIRECT_REPLY_TO
from orchestrator import TaskPriority, TaskStatus

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "regenerate them: python -m broker.schemas docs"


def every_wire_message_type() -> set[type[WireMessage]]:
    found: set[type[WireMessage]] = set()
    pending = list(WireMessage.__subclasses__())
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_wire_message_is_documented() -> None:
    assert set(WIRE_MESSAGES) == every_wire_message_type()


def test_checked_in_documents_match_the_models() -> None:
    # Given the documents as the models generate them now
    expected = generated()

    # Then the checked-in files say exactly that, and there is no other schema file
    for relative, text in expected.items():
        path = DOCS / relative
        assert path.exists(), f"{path} is missing; {REGENERATE}"
        assert path.read_text() == text, f"{path} drifted from the models; {REGENERATE}"
    on_disk = {f"schemas/{p.name}" for p in (DOCS / "schemas").glob("*.json")}
    assert on_disk == {r for r in expected if r.startswith("schemas/")}, REGENERATE


def test_generator_writes_what_is_checked_in(tmp_path: Path) -> None:
    # Given a directory with a stale schema in it
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "Gone.json").write_text("{}")

    # When the documents are written there
    write(tmp_path)

    # Then it holds exactly the checked-in files
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json")}
    assert written == set(generated())
    assert (tmp_path / "asyncapi.json").read_text() == (DOCS / "asyncapi.json").read_text()


def test_schemas_require_the_kind_the_parsers_dispatch_on() -> None:
    files = generated()
    for model in WIRE_MESSAGES:
        name = f"schemas/{model.__name__}.json"
        if name in files:
            schema = json.loads(files[name])
            assert "kind" in schema["required"], name
            assert schema["properties"]["kind"]["const"], name


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_asyncapi_document_is_consistent() -> None:
    document = asyncapi()
    assert document["asyncapi"] == "2.6.0"

    # Every reference resolves inside the document
    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]

    # Every message is there under its kind, and every channel names its parameters
    messages = document["components"]["messages"]
    assert {m["name"] for m in messages.values()} == {kind_of(m) for m in WIRE_MESSAGES}
    for channel, item in document["channels"].items():
        assert set(re.findall(r"{(\w+)}", channel)) == set(item.get("parameters", {})), channel

    # And the request queue is the topology's, with requests in and replies out
    rpc = Topology("{prefix}").rpc_queue
    requests = document["channels"][rpc]["publish"]["message"]["oneOf"]
    assert {r["$ref"].rsplit("/", 1)[1] for r in requests} == {
        "SubmitTaskRequest",
        "CancelTaskRequest",
        "TaskStatusRequest",
        "StatsRequest",
        "AgentsRequest",
        "QueuesRequest",
        "TasksRequest",
    }


def test_every_request_has_a_documented_result() -> None:
    # Every request kind has a result type, with a schema file of its own
    files = generated()
    assert set(RESULT_TYPES) == {kind_of(m) for m in REQUESTS}
    for request in REQUESTS:
        name = RESULT_TYPES[kind_of(request)].schema_name
        schema = json.loads(files[f"schemas/{name}.json"])
        assert schema["title"] == name

    # And in the AsyncAPI document each request names its typed reply, which the
    # reply channel lists and whose result is that schema
    document = asyncapi()
    messages = document["components"]["messages"]
    replies = document["channels"][DIRECT_REPLY_TO]["subscribe"]["message"]["oneOf"]
    for request in REQUESTS:
        reply_ref = messages[request.__name__]["x-reply"]["$ref"]
        assert {"$ref": reply_ref} in replies
        reply = messages[reply_ref.rsplit("/", 1)[1]]
        assert reply["name"] == "reply"
        result = reply["payload"]["allOf"][1]["properties"]["result"]["anyOf"][0]["$ref"]
        assert result == f"#/components/schemas/{RESULT_TYPES[kind_of(request)].schema_name}"
    stats = document["components"]["schemas"]["StatsResult"]
    assert {"tasks_created", "overall_utilization"} <= set(stats["required"])
    agents = document["components"]["schemas"]["AgentsResult"]
    assert agents["items"] == {"$ref": "#/components/schemas/AgentRecord"}


def test_wire_enums_are_the_orchestrators() -> None:
    # broker knows nothing of the orchestrator's enums: its Literals copy their
    # values, and a value added or renamed on one side only fails here
    assert list(get_args(Priority)) == [p.value for p in TaskPriority]  # lowest first
    assert set(get_args(TaskState)) == {s.value for s in TaskStatus}
    assert set(get_args(Outcome)) == {s.value for s in TaskStatus if s.is_final}
