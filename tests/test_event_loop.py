"""The loop the project's processes run on (``broker.event_loop``): the garbage
collector tuned for a message loop, cycles still collected, and a switch to
leave it as Python sets it. In a process of its own: the settings are the
process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.harness import ROOT

PROBE = """
import asyncio, gc, json
from broker import event_loop

class Node:
    pass

async def main():
    node = Node()
    node.me = node  # a cycle, dropped: only the collector can free it
    del node
    return gc.collect()

freed = event_loop.run(main())
print(json.dumps({"threshold": gc.get_threshold(), "freed": freed}))
"""


def probe(**env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_process_run_on_the_loop_collects_its_young_objects_less_often_and_still_frees_cycles():
    tuned = probe()
    assert tuned["threshold"][0] == 10_000
    assert tuned["freed"] >= 1  # the node

    plain = probe(ORCHESTRATOR_GC_TUNING="0")
    assert plain["threshold"][0] == 700
    assert plain["freed"] >= 1
