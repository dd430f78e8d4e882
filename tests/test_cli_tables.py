"""The table commands piped (no terminal): every id, name and value whole, each row
on one line, however narrow COLUMNS says the screen is and however long the cells.

``tasks`` piped is in test_cli_housekeeping; here ``agents``, ``status``,
``stats`` and ``watch``, with cells at the lengths the protocol allows (a
128-character agent id, a 500-character task name, a 200-character type) and
beyond a fixed width (an agent with a long capability list, a result of
kilobytes).
"""

from __future__ import annotations

import json

import pytest

from broker import route_key
from tests.deployment import Deployment

pytestmark = pytest.mark.rabbitmq

AGENT_ID = "agent-" + "a" * 118 + "-end"
"""128 characters, the most an agent id may have."""
CAPABILITIES = [f"cap{i:02d}-" + "c" * 54 + "-end" for i in range(70)]
"""70 capabilities of 64 characters: 4.6 KB joined, wider than any fixed width."""
TASK_NAME = "name " + "n" * 491 + " end"
TASK_TYPE = "type" + "t" * 192 + "-end"
BLOB = "b" * 6000 + "-end"


def line_with(text: str, *whole: str) -> str:
    """The one line of ``text`` holding the first of ``whole``; it holds all of them."""
    lines = [line for line in text.splitlines() if whole[0] in line]
    assert len(lines) == 1, (whole[0][:40], text[:2000])
    for part in whole:
        assert part in lines[0], (part[:40], lines[0][:2000])
    return lines[0]


async def test_tables_piped_keep_long_ids_names_and_values_whole_on_one_line(
    deployment: Deployment,
) -> None:
    # Given serve, an agent with the longest id and a long list of capabilities, one
    # task it ran with a long name, type and result, and one no agent can run
    await deployment.serve()
    await deployment.agent(AGENT_ID, *CAPABILITIES)
    done = await deployment.run(
        "submit", TASK_TYPE, "--name", TASK_NAME, "-r", CAPABILITIES[0],
        "-p", json.dumps({"blob": BLOB}), "--wait", "--json",
    )  # fmt: skip
    assert done.code == 0, done
    task_id = json.loads(done.out)["task_id"]
    deployment.queue_keys.add(route_key(TASK_TYPE, ["nobody"]))
    waiting = await deployment.run("submit", TASK_TYPE, "-r", "nobody", "--name", TASK_NAME)
    assert waiting.code == 0, waiting

    # When each table command runs piped, with COLUMNS saying the screen is narrow
    async def piped(*args: str) -> str:
        result = await deployment.run(*args, COLUMNS="80")
        assert result.code == 0, result
        return result.out

    # Then agents shows the agent on one line, its id and every capability whole
    line_with(await piped("agents"), AGENT_ID, ", ".join(CAPABILITIES), "0/5")

    # And status shows each field whole on its line, the result too, without padding
    status = await piped("status", task_id)
    line_with(status, TASK_NAME)
    line_with(status, "assigned_agent", AGENT_ID)
    result = line_with(status, BLOB, "result")
    assert json.loads(result.split(None, 1)[1])["echo"] == {"blob": BLOB}
    assert all(line == line.rstrip() for line in status.splitlines())

    # And stats names the agent's utilization with its whole id
    line_with(await piped("stats"), f"utilization of {AGENT_ID}")

    # And tasks shows both tasks' names, type and agent whole
    tasks = await piped("tasks")
    line_with(tasks, task_id, TASK_NAME, TASK_TYPE, AGENT_ID, "completed")
    assert sum(TASK_NAME in line for line in tasks.splitlines()) == 2

    # And watch's tables show the agent and the waiting task's queue whole
    watch = await piped("watch", "--seconds", "0.5")
    line_with(watch, AGENT_ID, ", ".join(CAPABILITIES))
    line_with(watch, route_key(TASK_TYPE, ["nobody"]), TASK_TYPE, "nobody")
