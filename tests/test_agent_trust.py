"""An agent consumes only the queues it can run, whoever tells it (agents.trust)."""

from __future__ import annotations

import pytest

from agents.trust import ControlGate, can_run_key
from broker import route_key
from broker.envelope import Sender

LONG = [f"capability-{i:03d}" for i in range(20)]
"""A set whose key is written as a digest (over 119 characters)."""


@pytest.mark.parametrize(
    ("key", "capabilities", "task_types", "runs"),
    [
        (route_key("job", []), [], ["job"], True),
        (route_key("job", ["gpu"]), ["gpu", "cpu"], ["job"], True),
        (route_key("job", ["gpu"]), ["cpu"], ["job"], False),
        (route_key("job", ["gpu", "cpu"]), ["gpu"], ["*"], False),
        (route_key("other", []), [], ["job"], False),
        (route_key("other", []), [], ["*"], True),
        (route_key("a type with spaces", []), [], ["a type with spaces"], True),
        (route_key("job", LONG), LONG, ["job"], True),
        (route_key("job", LONG), LONG[:-1], ["job"], False),
        ("gpu", ["gpu"], [], True),  # a bare capability key: any type
    ],
)
def test_a_queue_key_is_run_only_with_its_type_and_capabilities(
    key: str, capabilities: list[str], task_types: list[str], runs: bool
) -> None:
    assert can_run_key(key, capabilities, task_types) is runs


def test_a_digest_key_of_part_of_its_set_is_run_as_told_and_checked() -> None:
    # A long set's subset is a digest too: the orchestrator says what it stands
    # for, and the agent checks that against the digest and its own set
    subset = route_key("job", LONG[:-1])
    assert can_run_key(subset, LONG, ["job"]) is False  # told nothing
    assert can_run_key(subset, LONG, ["job"], LONG[:-1]) is True
    assert can_run_key(subset, LONG, ["job"], LONG[:-2]) is False  # not what the digest is
    lacking = route_key("job", [*LONG[:-1], "secret"])
    assert can_run_key(lacking, LONG, ["job"], [*LONG[:-1], "secret"]) is False


def test_commands_are_obeyed_from_the_orchestrators_user_only() -> None:
    gate = ControlGate("worker")
    assert gate.from_orchestrator(None, "orch", "control.cancel")  # in-process
    assert gate.from_orchestrator(Sender("orch"), "orch", "control.cancel")
    assert not gate.from_orchestrator(Sender("someone"), "orch", "control.cancel")
    assert not gate.from_orchestrator(Sender(None), "orch", "control.unregister")
    assert not gate.from_orchestrator(Sender("orch"), None, "control.unregister")
    assert gate.refused["not_orchestrator"] == 3


def test_a_consume_command_keeps_only_the_queues_the_agent_can_run() -> None:
    gate = ControlGate("worker")
    keys = [route_key("job", ["work"]), route_key("job", ["secret"]), route_key("job", [])]
    assert gate.runnable(keys, ["work"], ["job"]) == [keys[0], keys[2]]
    assert gate.refused["cannot_run"] == 1
