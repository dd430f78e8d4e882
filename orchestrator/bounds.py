"""Time bounds for many awaits at once, with one timer per slot of time rather than per await.

Every submit bounds its publish (``submit_timeout``): with ``asyncio.timeout``
that is a timer made, pushed on the event loop's heap and cancelled per
submit, about a fiftieth of a no-op task's whole cost in-process. Here the
bounds that end within the same ``SLOT`` share one timer: when it fires, each
of their tasks still inside is cancelled where it waits, and its bound raises
``TimeoutError`` instead of the ``CancelledError``, exactly as
``asyncio.timeout`` does (a cancel from anyone else goes through as it is). A
bound ends at most one ``SLOT`` late. A slot's timer fires even once its
bounds all left (so at most one timer per slot is ever made): an idle
orchestrator's are gone once their slots passed.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

SLOT = 0.01
"""Seconds of time whose bounds share one timer (how late a bound may end)."""


class Bounds:
    """Hands out ``bound(seconds)`` context managers sharing timers per slot."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[int, tuple[asyncio.TimerHandle, set[Bound]]] = {}

    def bound(self, seconds: float) -> Bound:
        """``async with bounds.bound(s):`` raises ``TimeoutError`` once ``s`` passed."""
        return Bound(self, seconds)

    @property
    def inside(self) -> int:
        """How many bounds are entered and not left (nor expired)."""
        return sum(len(entry[1]) for entry in self._slots.values())

    @property
    def timers(self) -> int:
        """How many timers are pending: one per slot in use, until it passes."""
        return len(self._slots)

    def _join(self, bound: Bound, seconds: float) -> int:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._slots = loop, {}  # a new loop: the old one's timers are dead
        slot = math.ceil((loop.time() + seconds) / SLOT)
        entry = self._slots.get(slot)
        if entry is None:
            entry = self._slots[slot] = (loop.call_at(slot * SLOT, self._expire, slot), set())
        entry[1].add(bound)
        return slot

    def _leave(self, bound: Bound, slot: int) -> None:
        entry = self._slots.get(slot)
        if entry is not None:
            # Its timer stays even if none is left: the next bound of the slot uses it
            # (submits mostly follow one another, each done before the next).
            entry[1].discard(bound)

    def _expire(self, slot: int) -> None:
        entry = self._slots.pop(slot, None)
        if entry is not None:
            for bound in entry[1]:
                bound.expire()


class Bound:
    """One await's bound (see ``Bounds``); not reentrant, used once."""

    __slots__ = ("_bounds", "_cancelling", "_expired", "_seconds", "_slot", "_task")

    def __init__(self, bounds: Bounds, seconds: float) -> None:
        self._bounds = bounds
        self._seconds = seconds
        self._slot = 0
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    async def __aenter__(self) -> Bound:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a bound is entered in a task")
        self._task, self._cancelling = task, task.cancelling()
        self._slot = self._bounds._join(self, self._seconds)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bounds._leave(self, self._slot)
        if self._expired:
            assert self._task is not None
            # Ours was the cancel: taken back; a TimeoutError if it was the only one.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expire(self) -> None:
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()
