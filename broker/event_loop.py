"""The event loop the project's processes run on: uvloop where it is installed.

uvloop (an optional dependency) runs the same asyncio code with a faster loop
and faster sockets; the AMQP client's reads and writes are a good part of each
message's cost (a profile of the peer benchmark). Nothing depends on it: with
it missing, or with ``ORCHESTRATOR_UVLOOP=0`` in the environment, the
standard loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DISABLE = "ORCHESTRATOR_UVLOOP"
"""Set to 0 (or false, no, off) to keep the standard loop where uvloop is installed."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if it is installed and not turned off; else None
    (the standard loop)."""
    if os.environ.get(DISABLE, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind ``run`` uses."""
    factory = loop_factory()
    return factory() if factory is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop where it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def name() -> str:
    """Which loop ``run`` uses: "uvloop" or "asyncio"."""
    return "uvloop" if loop_factory() is not None else "asyncio"
