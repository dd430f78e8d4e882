"""The in-process bus's leader lease: one holder per bus, as one connection
holds RabbitMQ's exclusive queue (``broker/rabbitmq_lease.py``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .bus import Lease

if TYPE_CHECKING:
    from .memory import MemoryBus


class MemoryLease(Lease):
    """The leader lease on the in-process bus: one holder per bus, as one
    connection holds RabbitMQ's exclusive queue; closing the bus ends it."""

    def __init__(self, bus: MemoryBus, holder: str) -> None:
        self._bus = bus
        self.holder = holder
        self._lost = asyncio.Event()

    @property
    def held(self) -> bool:
        return self._bus._lease_holder is self and not self._lost.is_set()

    async def acquire(self) -> bool:
        self._bus._require()
        if self._bus._lease_holder is None:
            self._bus._lease_holder = self
            self._lost = asyncio.Event()
        return self.held

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def release(self) -> None:
        if self._bus._lease_holder is self:
            self._bus._lease_holder = None
        self._lost.set()
