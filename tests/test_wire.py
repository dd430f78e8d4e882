"""Unit tests of what travels and how it is named: wire messages, envelopes, keys,
topology, URLs."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from broker import (
    ANY_CAPABILITY_KEY,
    CAPABILITY_PATTERN,
    MAX_CONSUMER_PRIORITY,
    RETRY_TIERS_MS,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    AgentsRequest,
    BusSettings,
    CancelTask,
    CancelTaskRequest,
    CancelTasks,
    ConsumeQueues,
    DeadLetter,
    Envelope,
    InvalidMessage,
    ProceedTask,
    QueuesRequest,
    Reannounce,
    Reply,
    StatsRequest,
    SubmitTaskRequest,
    SyncReports,
    TaskAssigned,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TasksReported,
    TasksRequest,
    TaskStarted,
    TaskStatusRequest,
    Topology,
    Unregister,
    capability_key,
    parse_control,
    parse_event,
    parse_message_id,
    parse_reply,
    parse_request,
    parse_task,
    redact_url,
    route_key,
    task_message_id,
)
from broker.envelope import MAX_REASON_LENGTH, REASON_HEADER, SOURCE_QUEUE_HEADER
from broker.messages import WireMessage
from broker.rabbitmq_publish import NOT_PERSISTENT, PERSISTENT, to_properties
from broker.topology import Binding, Declarations, Exchange, Queue, topic_matches

Parser = Callable[[bytes], Any]

# --- wire messages -----------------------------------------------------------

SAMPLES: list[tuple[WireMessage, Parser]] = [
    (
        TaskMessage(
            task_id="t-1",
            attempt=2,
            name="Market Sentiment Analysis",
            task_type="sentiment_analysis",
            payload={"symbols": ["BTC", "ETH"], "depth": {"n": 3, "ratio": 0.25}, "x": None},
            priority="high",
            required_capabilities=["sentiment_analysis", "social_media"],
            timeout=30.5,
            estimated_duration=600.0,
            dependency_results={"t-0": {"ok": True}},
        ),
        parse_task,
    ),
    (TaskAssigned(task_id="t-1", attempt=2, agent_id="agent-1", confirm=True), parse_event),
    (TaskStarted(task_id="t-1", attempt=1, agent_id="agent-1", at=1700000000.125), parse_event),
    (TaskProgress(task_id="t-1", attempt=1, agent_id="agent-1", progress=0.5), parse_event),
    (
        TaskFinished(
            task_id="t-1",
            attempt=1,
            agent_id="agent-1",
            outcome="completed",
            result={"answer": [1, 2.5, "three"]},
        ),
        parse_event,
    ),
    (
        TaskFinished(
            task_id="t-1", attempt=3, agent_id="agent-1", outcome="timeout", error="too slow"
        ),
        parse_event,
    ),
    (
        TaskFinished(
            task_id="t-1",
            attempt=1,
            agent_id="agent-1",
            outcome="failed",
            error="ValueError: no",
            traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no',
        ),
        parse_event,
    ),
    (
        AgentAnnounced(
            agent_id="agent-1",
            capabilities=["trading", "order_execution"],
            max_concurrent_tasks=3,
            task_types=["trade"],
            specialization_score={"trade": 0.75},
        ),
        parse_event,
    ),
    (AgentHeartbeat(agent_id="agent-1", running=2), parse_event),
    (AgentLeft(agent_id="agent-1"), parse_event),
    (TasksReported(agent_id="agent-1", round=3), parse_event),
    (ConsumeQueues(queue_keys=["a+b", ANY_CAPABILITY_KEY], consumer_priority=4), parse_control),
    (ConsumeQueues(queue_keys=[], max_concurrent_tasks=2), parse_control),
    (
        ConsumeQueues(
            queue_keys=["t.a+b", "u.@any"], consumer_priority=2, priorities={"t.a+b": 19}
        ),
        parse_control,
    ),
    (ProceedTask(task_id="t-1", attempt=2), parse_control),
    (CancelTask(task_id="t-1"), parse_control),
    (CancelTask(task_id="t-1", attempt=2), parse_control),
    (CancelTasks(task_ids=["t-1", "t-2"]), parse_control),
    (Unregister(agent_id="agent-1"), parse_control),
    (Reannounce(), parse_control),
    (SyncReports(round=3), parse_control),
    (
        SubmitTaskRequest(
            name="BTC Analysis",
            task_type="analysis",
            payload={"symbol": "BTC"},
            priority="high",
            dependencies=["t-0"],
            required_capabilities=["technical_analysis"],
            timeout=60,
        ),
        parse_request,
    ),
    (CancelTaskRequest(task_id="t-1"), parse_request),
    (TaskStatusRequest(task_id="t-1"), parse_request),
    (StatsRequest(), parse_request),
    (AgentsRequest(), parse_request),
    (QueuesRequest(), parse_request),
    (TasksRequest(status=["running"], task_type="t", agent_id="a-1", limit=5), parse_request),
    (Reply.success({"task_id": "t-1"}), parse_reply),
    (Reply.failure("not_found", "task_id: unknown task 't-9'"), parse_reply),
]


def sample_id(sample: tuple[WireMessage, Parser]) -> str:
    return type(sample[0]).__name__


def all_wire_message_types() -> set[type[WireMessage]]:
    found: set[type[WireMessage]] = set()
    pending = list(WireMessage.__subclasses__())
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_samples_cover_every_wire_message() -> None:
    assert {type(message) for message, _ in SAMPLES} == all_wire_message_types()


@pytest.mark.parametrize(("message", "parse"), SAMPLES, ids=[sample_id(s) for s in SAMPLES])
def test_message_round_trips_through_its_parser(message: WireMessage, parse: Parser) -> None:
    # Given an encoded wire message
    body = message.encode()

    # When its receiver parses it
    parsed = parse(body)

    # Then it gets back an equal message of the same type, with version and kind on the wire
    assert type(parsed) is type(message)
    assert parsed == message
    assert json.loads(body)["v"] == 1
    assert json.loads(body)["kind"] == message.kind  # type: ignore[attr-defined]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@given(payload=st.dictionaries(st.text(), JSON, max_size=5), task_id=st.text(min_size=1))
def test_any_json_payload_round_trips(payload: dict[str, Any], task_id: str) -> None:
    message = TaskMessage(
        task_id=task_id,
        attempt=1,
        name="n",
        task_type="t",
        payload=payload,
        priority="low",
        timeout=1.0,
        estimated_duration=1.0,
    )
    assert parse_task(message.encode()) == message


@pytest.mark.parametrize(("message", "parse"), SAMPLES, ids=[sample_id(s) for s in SAMPLES])
def test_unknown_schema_version_is_rejected_naming_v(message: WireMessage, parse: Parser) -> None:
    # Given a message from a future schema version
    data = json.loads(message.encode())
    data["v"] = 2

    # When it is parsed, then it is rejected, naming the version field
    with pytest.raises(InvalidMessage, match=r"(^|[ .])v: "):
        parse(json.dumps(data).encode())


MISSING_FIELD_CASES = [
    pytest.param(message, parse, name, id=f"{type(message).__name__}-{name}")
    for message, parse in SAMPLES
    for name, info in type(message).model_fields.items()
    if info.is_required()
]


def test_missing_field_cases_exist() -> None:
    assert len(MISSING_FIELD_CASES) > 10


@pytest.mark.parametrize(("message", "parse", "field"), MISSING_FIELD_CASES)
def test_missing_required_field_is_rejected_naming_it(
    message: WireMessage, parse: Parser, field: str
) -> None:
    # Given a message without one of its required fields
    data = json.loads(message.encode())
    del data[field]

    # When it is parsed, then it is rejected, naming that field
    with pytest.raises(InvalidMessage, match=rf"(^|[ .]){re.escape(field)}: "):
        parse(json.dumps(data).encode())


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b"null", b'{"v": 1}', b'{"v": 1, "kind": "task.exploded"}'],
)
@pytest.mark.parametrize(
    "parse", [parse_task, parse_event, parse_control, parse_request, parse_reply]
)
def test_garbage_is_rejected_as_invalid_message(body: bytes, parse: Parser) -> None:
    with pytest.raises(InvalidMessage) as raised:
        parse(body)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("message", "parse"),
    [
        (SAMPLES[0][0], parse_event),
        (SAMPLES[0][0], parse_control),
        (AgentLeft(agent_id="a"), parse_control),
        (Reannounce(), parse_event),
        (SAMPLES[0][0], parse_request),
        (StatsRequest(), parse_event),
    ],
)
def test_message_of_another_channel_is_rejected_naming_its_kind(
    message: WireMessage, parse: Parser
) -> None:
    with pytest.raises(InvalidMessage, match="kind"):
        parse(message.encode())


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    # Given a heartbeat with a field this version does not know
    data = json.loads(AgentHeartbeat(agent_id="a", running=1, at=5.0).encode())
    data["load_average"] = 0.7

    # When it is parsed, then it is the known message
    assert parse_event(json.dumps(data).encode()) == AgentHeartbeat(agent_id="a", running=1, at=5.0)


def test_per_queue_priorities_and_the_default_for_the_others() -> None:
    # Given a consume command with a priority for one of its two queues
    command = ConsumeQueues(queue_keys=["t.a", "u.a"], consumer_priority=2, priorities={"t.a": 7})

    # Then that queue has its own, the other the default
    assert (command.priority_of("t.a"), command.priority_of("u.a")) == (7, 2)


def test_a_consume_command_of_an_older_orchestrator_gives_every_queue_its_priority() -> None:
    # Given the command as an orchestrator that predates per-queue priorities sends it
    body = json.dumps(
        {"v": 1, "kind": "control.consume", "queue_keys": ["t.a"], "consumer_priority": 3}
    )

    # When it is parsed, then every queue is consumed at that priority
    assert parse_control(body.encode()).priority_of("t.a") == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"queue_keys": ["t.a"], "priorities": {"t.b": 1}}, "not in queue_keys"),
        ({"queue_keys": ["t.a"], "priorities": {"t.a": -1}}, "greater than or equal"),
        ({"queue_keys": ["t.a"], "priorities": {"t.a": MAX_CONSUMER_PRIORITY + 1}}, "less than"),
        ({"queue_keys": ["t.a"], "consumer_priority": MAX_CONSUMER_PRIORITY + 1}, "less than"),
    ],
)
def test_a_consume_command_with_stray_or_unbounded_priorities_is_rejected(
    fields: dict[str, Any], why: str
) -> None:
    body = json.dumps({"v": 1, "kind": "control.consume", **fields}).encode()
    with pytest.raises(InvalidMessage, match=why):
        parse_control(body)


# --- envelopes: what travels around a body -------------------------------------------

TASK = SAMPLES[0][0]


def test_a_task_travels_persistent_with_its_attempt_as_message_id() -> None:
    assert isinstance(TASK, TaskMessage)
    envelope = Envelope.task(TASK, priority=7)
    properties = to_properties(envelope)
    assert envelope.body == TASK.encode()
    assert properties.message_id == "t-1:2"
    assert properties.message_type == "task"
    assert properties.priority == 7
    assert properties.delivery_mode == PERSISTENT
    assert properties.content_type == "application/json"
    assert properties.expiration is None
    assert to_properties(envelope.expiring(1.5)).expiration == "1500"


def test_superseded_events_and_commands_are_not_persistent() -> None:
    progress = TaskProgress(task_id="t", attempt=1, agent_id="a", progress=0.5)
    heartbeat = AgentHeartbeat(agent_id="a", running=0)
    finished = TaskFinished(task_id="t", attempt=1, agent_id="a", outcome="completed")
    assert not Envelope.event(progress).persistent
    assert not Envelope.event(heartbeat).persistent
    assert Envelope.event(finished).persistent
    assert Envelope.event(finished).type == "task.finished"
    assert not Envelope.control(Reannounce()).persistent
    assert to_properties(Envelope.control(Reannounce())).delivery_mode == NOT_PERSISTENT


def test_a_dead_letter_carries_its_reason_and_source_cut_to_size() -> None:
    envelope = Envelope.dead(
        b"x" * 100, "r" * 5000, source="p.tasks.k", message_id="t:3", max_bytes=10
    )
    assert envelope.body == b"x" * 10
    assert envelope.headers[REASON_HEADER] == "r" * MAX_REASON_LENGTH
    assert envelope.headers[SOURCE_QUEUE_HEADER] == "p.tasks.k"
    letter = DeadLetter.of(envelope.body, envelope.headers, envelope.message_id)
    assert (letter.task_id, letter.attempt) == ("t", 3)
    # Another client's headers carry strings as bytes
    assert DeadLetter.of(b"", {REASON_HEADER: b"bytes"}, None).reason == "bytes"
    assert DeadLetter.of(b"", {}, None).reason == "unknown"


@given(task_id=st.text(min_size=1, max_size=40), attempt=st.integers(1, 10**9))
def test_task_message_id_round_trips(task_id: str, attempt: int) -> None:
    assert parse_message_id(task_message_id(task_id, attempt)) == (task_id, attempt)


@pytest.mark.parametrize(
    ("message_id", "identity"),
    [(None, None), ("", None), ("no-attempt", None), ("t:x", ("t", None)), ("a:b:3", ("a:b", 3))],
)
def test_message_ids_that_are_not_a_task_attempt(message_id: str | None, identity: Any) -> None:
    assert parse_message_id(message_id) == identity


@pytest.mark.parametrize(
    ("letter", "task_id", "attempt"),
    [
        (DeadLetter(b"garbage", "r", "t:1:3"), "t:1", 3),
        (DeadLetter(b'{"task_id": "from-body"}', "r"), "from-body", None),
        (DeadLetter(b'{"task_id": 5}', "r"), None, None),
        (DeadLetter(b"[" * 100_000, "r"), None, None),  # too deep to parse
    ],
)
def test_a_dead_letter_names_its_task_by_message_id_or_body(
    letter: DeadLetter, task_id: str | None, attempt: int | None
) -> None:
    assert (letter.task_id, letter.attempt) == (task_id, attempt)


# --- capability keys -----------------------------------------------------------

CAPABILITY = st.from_regex(CAPABILITY_PATTERN, fullmatch=True)
LONGEST_PREFIX = "p" * 64


def test_capability_key_sorts_and_deduplicates() -> None:
    assert capability_key(["social_media", "sentiment_analysis", "social_media"]) == (
        "sentiment_analysis+social_media"
    )


def test_no_capabilities_give_the_any_key() -> None:
    assert capability_key([]) == ANY_CAPABILITY_KEY
    assert capability_key(set()) == ANY_CAPABILITY_KEY


def test_long_capability_set_is_shortened_and_stays_distinct() -> None:
    # Given two large capability sets that differ in one name
    many = [f"capability_number_{i:03d}" for i in range(40)]
    other = [*many[:-1], "capability_number_999"]

    # When their keys are taken
    key, other_key = capability_key(many), capability_key(other)

    # Then both are short, deterministic and different
    assert len(key) < 200 and len(other_key) < 200
    assert key == capability_key(reversed(many))
    assert key != other_key
    assert ANY_CAPABILITY_KEY not in (key, other_key)


@given(caps=st.lists(CAPABILITY, max_size=40), seed=st.randoms())
def test_capability_key_ignores_order_and_duplicates(caps: list[str], seed: Any) -> None:
    shuffled = caps + caps[: len(caps) // 2]
    seed.shuffle(shuffled)
    assert capability_key(shuffled) == capability_key(caps)


@given(caps=st.sets(CAPABILITY, max_size=40))
def test_capability_key_is_short_enough_for_a_queue_name(caps: set[str]) -> None:
    key = capability_key(caps)
    assert len(key) < 200
    assert len(Topology(LONGEST_PREFIX).task_queue(key).encode()) <= 255
    # with the longest task type too: the queue name is what RabbitMQ bounds
    longest = Topology(LONGEST_PREFIX).task_queue(route_key("t" * 64, caps))
    assert len(longest.encode()) <= 255
    if caps and len("+".join(caps)) <= 119:
        assert key == "+".join(sorted(caps))


@given(a=st.sets(CAPABILITY, max_size=40), b=st.sets(CAPABILITY, max_size=40))
def test_different_capability_sets_get_different_keys(a: set[str], b: set[str]) -> None:
    if a != b:
        assert capability_key(a) != capability_key(b)


# --- topic matching --------------------------------------------------------------


def reference_topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ's topic matching as a regex over '.'-prefixed words.

    Words are split on '.', an empty string has no words (as in RabbitMQ),
    '*' is exactly one word and '#' zero or more. Checked against RabbitMQ 3.10
    on a few thousand pattern/key pairs.
    """

    def words(text: str) -> list[str]:
        return text.split(".") if text else []

    regex = ""
    for word in words(pattern):
        if word == "#":
            regex += r"(?:\.[^.]*)*"
        elif word == "*":
            regex += r"\.[^.]*"
        else:
            regex += r"\." + re.escape(word)
    return re.fullmatch(regex, "".join("." + w for w in words(key))) is not None


PATTERN = st.lists(st.sampled_from(["a", "b", "ab", "*", "#", ""]), max_size=5).map(".".join)
KEY = (
    st.lists(st.sampled_from(["a", "b", "ab", ""]), min_size=1, max_size=5)
    .map(".".join)
    .filter(bool)
)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("task.#", "task.started", True),
        ("task.#", "task", True),
        ("task.#", "task.a.b.c", True),
        ("task.#", "agent.heartbeat", False),
        ("task.*", "task.started", True),
        ("task.*", "task", False),
        ("task.*", "task.a.b", False),
        ("*.started", "task.started", True),
        ("#", "anything.at.all", True),
        ("#.finished", "task.finished", True),
        ("#.finished", "finished", True),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.*.b", "a.b", False),
        ("task.started", "task.started", True),
        ("task.started", "task.finished", False),
    ],
)
def test_topic_matches_examples(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
    assert reference_topic_matches(pattern, key) is matches


@given(pattern=PATTERN, key=KEY)
@example(pattern="#.#", key="a")
@example(pattern="*.#.*", key="a")
@example(pattern="a.", key="a")
def test_topic_matches_agrees_with_amqp_semantics(pattern: str, key: str) -> None:
    assert key  # every event kind is a non-empty routing key
    assert topic_matches(pattern, key) == reference_topic_matches(pattern, key)


@pytest.mark.parametrize("pattern", ["*", "#.*", "*.#"])
def test_empty_routing_key_has_no_words(pattern: str) -> None:
    # RabbitMQ does not route an empty key to '*' (checked on 3.10)
    assert reference_topic_matches(pattern, "") is False
    assert topic_matches(pattern, "") is False


# --- topology ---------------------------------------------------------------------

PREFIXES = ["orchestrator", "test-0123456789", "a", "my.deploy_1-x", LONGEST_PREFIX]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_definitions_name_only_prefixed_things_and_bind_what_exists(prefix: str) -> None:
    # Given the definitions document of one deployment
    topology = Topology(prefix)
    definitions = topology.definitions(vhost="/tests")
    exchanges = {e["name"] for e in definitions["exchanges"]}
    queues = {q["name"] for q in definitions["queues"]}

    # Then every exchange and queue hangs off the prefix, once, in the vhost
    for name in exchanges | queues:
        assert name.startswith(prefix + "."), name
    assert len(exchanges) == len(definitions["exchanges"])
    assert len(queues) == len(definitions["queues"])
    for thing in definitions["exchanges"] + definitions["queues"] + definitions["bindings"]:
        assert thing["vhost"] == "/tests"
        assert thing.get("durable", True) is True

    # And the fixed names the bus uses are all there
    assert {
        topology.tasks_exchange,
        topology.events_exchange,
        topology.control_exchange,
        topology.dead_exchange,
    } <= exchanges
    assert {
        topology.task_queue(ANY_CAPABILITY_KEY),
        topology.orchestrator_events_queue,
        topology.dead_queue,
    } <= queues

    # And every binding goes from a defined exchange to a defined queue
    assert definitions["bindings"]
    for binding in definitions["bindings"]:
        assert binding["source"] in exchanges, binding
        assert binding["destination_type"] == "queue"
        assert binding["destination"] in queues, binding


def test_definitions_make_the_any_queue_a_priority_queue() -> None:
    topology = Topology("p")
    (any_queue,) = [
        q
        for q in topology.definitions()["queues"]
        if q["name"] == topology.task_queue(ANY_CAPABILITY_KEY)
    ]
    assert any_queue["arguments"] == Topology.task_queue_arguments()


def test_deployments_with_different_prefixes_share_no_fixed_names() -> None:
    left, right = Topology("alpha").definitions(), Topology("beta").definitions()
    for kind in ("exchanges", "queues"):
        assert not {x["name"] for x in left[kind]} & {x["name"] for x in right[kind]}


def test_a_prefix_cannot_extend_another() -> None:
    # "a.tasks" would make deployment a's task queue for capability "dead" equal
    # deployment a.tasks' dead-letter queue: prefixes have no dots.
    assert Topology("a").task_queue(capability_key(["dead"])) == Topology("a.tasks").dead_queue
    with pytest.raises(ValidationError, match="prefix"):
        BusSettings(prefix="a.tasks")
    assert BusSettings(prefix="a_tasks-2").prefix == "a_tasks-2"


def test_topology_objects_are_frozen_values() -> None:
    # Equal objects declare the same thing: a bus caches declarations by value
    assert Topology("p").capability("a+b") == Topology("p").capability("a+b")
    assert len({Topology("p").retry_tier(100), Topology("p").retry_tier(100)}) == 1
    assert Queue("q", arguments={"x-max-length": 1}) != Queue("q", arguments={"x-max-length": 2})
    queue = Topology("p").capability("k").queue
    with pytest.raises(dataclasses.FrozenInstanceError):
        queue.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        queue.arguments["x-max-priority"] = 99  # type: ignore[index]


def test_definitions_are_rendered_from_the_declarations() -> None:
    topology = Topology("p")
    assert topology.definitions("/v") == topology.everything().definitions("/v")
    assert topology.everything() == (
        topology.fixed()
        + topology.rpc()
        + sum((topology.retry_tier(t) for t in RETRY_TIERS_MS), Declarations())
    )


def test_every_binding_binds_a_queue_its_group_declares() -> None:
    topology = Topology("p")
    groups = [
        topology.fixed(),
        topology.everything(["a", "b+c"]),
        topology.agent_control("agent-1"),
        topology.monitor(["task.#", "agent.*"], "m1"),
        *(topology.retry_tier(t) for t in RETRY_TIERS_MS),
    ]
    for group in groups:
        for binding in group.bindings:
            assert binding.queue in group.queues, binding


@pytest.mark.parametrize(
    ("declarations", "routed", "not_routed"),
    [
        (Topology("p").capability("a+b"), ["a+b"], ["a", "b", "@any"]),
        (
            Topology("p").orchestrator_events(),
            ["agent.announce", "agent.announce.a-1"],
            ["task.finished.a-1", "agent.goodbye.a-1", "control", "agent.heartbeat.a-1"],
        ),
        (
            Topology("p").agent_events("a-1"),
            ["task.finished.a-1", "task.started.a-1", "task.reported.a-1", "agent.goodbye.a-1"],
            [
                "task.finished.a-2",
                "task.finished",
                "task.finished.a-1.x",
                "agent.announce.a-1",
                "agent.heartbeat.a-1",
            ],
        ),
        (
            Topology("p").orchestrator_heartbeats(),
            ["agent.heartbeat", "agent.heartbeat.a-1"],
            ["task.finished", "agent.announce"],
        ),
        (Topology("p").agent_control("a"), ["a", Topology.BROADCAST_KEY], ["b", "all"]),
        (Topology("p").kept_dead_letters(), ["", "anything"], []),
        (Topology("p").retry_tier(100), ["a+b", "@any"], []),
        (Topology("p").monitor(["*.started"], "m"), ["task.started"], ["task.finished"]),
    ],
)
def test_bindings_route_as_their_exchange_type_does(
    declarations: Declarations, routed: list[str], not_routed: list[str]
) -> None:
    def reaches(key: str) -> bool:
        return any(b.matches(key) for b in declarations.bindings)

    assert all(reaches(key) for key in routed)
    assert not any(reaches(key) for key in not_routed)


@pytest.mark.parametrize(
    ("kind", "matches"), [("direct", False), ("topic", True), ("fanout", True)]
)
def test_only_a_topic_exchange_reads_patterns(kind: Any, matches: bool) -> None:
    binding = Binding(Exchange("x", kind), Queue("q"), "task.#")
    assert binding.matches("task.started") is matches
    assert binding.matches("task.#")  # a key equal to the binding's reaches it everywhere


# --- URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://user:secret@host:5672/vhost", "amqp://user:***@host:5672/vhost"),
        ("amqps://user:secret@host/", "amqps://user:***@host/"),
        ("amqp://u:secret@h:5672/%2F?heartbeat=10", "amqp://u:***@h:5672/%2F?heartbeat=10"),
        ("amqp://u:p%40ss%3Aword@h/", "amqp://u:***@h/"),
        ("amqp://guest@host:5672/", "amqp://guest@host:5672/"),
        ("amqp://host:5672/", "amqp://host:5672/"),
    ],
)
def test_redact_url_hides_the_password_only(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@given(
    password=st.text(
        alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "S"]), min_size=1
    )
)
def test_redact_url_never_shows_a_password(password: str) -> None:
    from urllib.parse import quote

    url = f"amqp://user:{quote(password, safe='')}@broker.example:5672/vh"
    assert redact_url(url) == "amqp://user:***@broker.example:5672/vh"


def test_redact_url_keeps_an_ipv6_host_valid() -> None:
    assert redact_url("amqp://u:secret@[::1]:5672/") == "amqp://u:***@[::1]:5672/"
