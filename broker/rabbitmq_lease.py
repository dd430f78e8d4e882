"""The leader lease on RabbitMQ: an exclusive queue on a connection of its own.

RabbitMQ lets one connection at a time hold an exclusive queue: a second
connection's declare is refused with RESOURCE_LOCKED (405, which closes that
channel only), and the queue is deleted as soon as its connection ends,
however it ends: a SIGKILLed holder's socket closes at once, a paused one is
dropped when its AMQP heartbeats stop. That is the lease.

It lives on a plain (not robust) connection of its own, so that nothing
declares it again behind our back after a reconnect: a lost connection is a
lost lease (``wait_lost`` returns), and whoever held it must stop acting as
the holder at once. The holder takes it again, if still free, only through a
new ``acquire``. With several node addresses (a cluster), each ``acquire``
connects to the first that answers, in order: an exclusive queue lives on
the node its connection is on, and dies with that node, which is a lost
lease like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from yarl import URL

from .bus import Lease
from .errors import BusConnectionError
from .rabbitmq_link import TRANSIENT
from .settings import broker_addresses
from .topology import Queue

log = logging.getLogger(__name__)


class RabbitLease(Lease):
    """The lease ``queue`` (exclusive) for ``holder``, on its own connection to ``url``
    (to the first of its node addresses that answers)."""

    def __init__(
        self,
        url: str,
        queue: Queue,
        *,
        holder: str,
        address: str,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert queue.exclusive, "a lease is an exclusive queue"
        self._url = url
        self._queue = queue
        self.holder = holder
        self._address = address
        self._timeout = connect_timeout
        self._ssl_context = ssl_context
        """The bus's TLS (broker.tls), for an amqps:// URL."""
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lost = asyncio.Event()
        self._held = False

    @property
    def held(self) -> bool:
        return self._held and not self._lost.is_set()

    async def acquire(self) -> bool:
        if self.held:
            return True
        connection = await self._connect()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(
                self._queue.name, durable=False, exclusive=True, auto_delete=False
            )
        except aiormq.exceptions.ChannelLockedResource:
            return False  # held by another connection; the broker closed this channel
        except TRANSIENT as exc:
            await self._drop()
            raise BusConnectionError(f"cannot take the lease {self._queue.name!r}: {exc}") from None
        self._channel = channel
        self._lost = asyncio.Event()
        self._held = True
        log.info("took the lease %s as %s", self._queue.name, self.holder)
        return True

    async def _connect(self) -> AbstractConnection:
        if self._connection is not None and not self._connection.is_closed:
            return self._connection
        failure: BaseException | None = None
        for url in broker_addresses(self._url):
            connection = aio_pika.Connection(
                URL(url),
                ssl_context=self._ssl_context,
                client_properties={"connection_name": f"{self.holder}:lease"},
            )
            try:
                await connection.connect(timeout=self._timeout)
                break
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                if not isinstance(exc, TRANSIENT):
                    raise
                failure = exc
        else:
            raise BusConnectionError(
                f"cannot reach RabbitMQ at {self._address} for the lease: {failure}"
            ) from None
        connection.close_callbacks.add(functools.partial(self._closed, connection))
        self._connection = connection
        return connection

    async def confirm(self) -> bool:
        """A passive declare of the lease on its own channel: it fails if the
        broker has dropped the connection (and with it the lease)."""
        channel = self._channel
        if not self.held or channel is None:
            return False
        try:
            await asyncio.wait_for(
                channel.declare_queue(self._queue.name, passive=True), self._timeout
            )
        except Exception as exc:  # the link is gone, or the queue with it
            log.warning("the lease %s is not confirmed: %s", self._queue.name, exc)
            await self._drop()
            self._on_close()
            return False
        return True

    def _closed(self, connection: AbstractConnection, *_: Any) -> None:
        """A connection's close: the lease's, unless a newer one holds the lease by now
        (an old connection's close that comes late must not take the new lease)."""
        if connection is self._connection or self._connection is None:
            self._on_close()

    def _on_close(self, *_: Any) -> None:
        if self._held and not self._lost.is_set():
            log.warning("lost the lease %s: its connection closed", self._queue.name)
        self._lost.set()
        self._held = False
        self._connection = None
        self._channel = None

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def release(self) -> None:
        self._held = False
        self._lost.set()
        await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        channel, self._channel = self._channel, None
        # The channel first: aio-pika finishes its close callbacks then, rather than
        # leaving them pending in the loop after the connection is gone.
        for closable in (channel, connection):
            if closable is not None and not closable.is_closed:
                with contextlib.suppress(Exception):
                    await closable.close()
