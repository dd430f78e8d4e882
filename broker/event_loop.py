"""The event loop the project's processes run on: uvloop where it is installed,
and the garbage collector tuned for a message loop.

uvloop (an optional dependency) runs the same asyncio code with a faster loop
and faster sockets; the AMQP client's reads and writes are a good part of each
message's cost (a profile of the peer benchmark). Nothing depends on it: with
it missing, or with ``ORCHESTRATOR_UVLOOP=0`` in the environment, the
standard loop runs.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DISABLE = "ORCHESTRATOR_UVLOOP"
"""Set to 0 (or false, no, off) to keep the standard loop where uvloop is installed."""
GC_TUNING = "ORCHESTRATOR_GC_TUNING"
"""Set to 0 (or false, no, off) to leave the garbage collector as Python sets it."""
YOUNG_COLLECTION_EVERY = 10_000
"""Allocations between two collections of the youngest generation (Python's default: 700)."""


def _off(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in ("0", "false", "no", "off")


def tune_gc() -> None:
    """Set the garbage collector for a long-running message loop.

    Each message makes and drops thousands of small objects, nearly all freed
    by reference counting at once; Python's collector still scans its young
    generation every 700 allocations and, in doing so, walks what lives on (the
    records of tasks). Every 10,000 allocations, and with what start-up made
    (modules, classes, settings) frozen out of its scans, a no-op task costs
    x0.87 of the CPU in process (3 interleaved rounds of 10,000 tasks, the
    threshold; x0.94 the freeze alone). Cycles are still collected; the young
    generation just holds more before it is looked at."""
    if _off(GC_TUNING):
        return
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_COLLECTION_EVERY:
        gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if it is installed and not turned off; else None
    (the standard loop)."""
    if _off(DISABLE):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind ``run`` uses (and the collector tuned as it does)."""
    tune_gc()
    factory = loop_factory()
    return factory() if factory is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop where it is installed, with the garbage
    collector tuned for a message loop (``tune_gc``)."""
    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def name() -> str:
    """Which loop ``run`` uses: "uvloop" or "asyncio"."""
    return "uvloop" if loop_factory() is not None else "asyncio"
