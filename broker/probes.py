"""The HTTP endpoint a process offers its operators: ``/metrics``, ``/healthz``, ``/readyz``.

Both sides of the bus (``orchestrator serve`` and agents) serve the same
three paths, so it lives here, in the one package both import. It is a few
lines of ``asyncio.start_server`` rather than a web framework or
prometheus-client's own threaded server: it must answer readiness from the
process's event loop (a wedged loop must read unready, which a thread would
hide), and it serves three fixed paths.

- ``/metrics``: the Prometheus text format of a ``CollectorRegistry``,
  refreshed by an optional coroutine first (figures read off the process).
- ``/healthz``: 200 while the event loop answers (liveness).
- ``/readyz``: 200 when ``ready()`` is true (connected; leading or standing
  by), else 503 with the reason, so a probe can take the process out of
  service without killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("broker.probes")

Readiness = Callable[[], tuple[bool, str]]
"""``(ready, reason)``: the reason is shown on ``/readyz`` either way."""

MAX_REQUEST_BYTES = 8192
"""A probe's request is one short line and a few headers; anything longer is not one."""


class ProbeServer:
    """Serves the three paths on ``host:port`` until ``stop``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        ready: Readiness = lambda: (True, "ready"),
        refresh: Callable[[], Awaitable[None]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.refresh = refresh
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> ProbeServer:
        """Listen; ``port`` 0 takes a free port, readable from ``self.port`` afterwards."""
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and probes on http://%s:%d/metrics", self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ProbeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        except ConnectionError:
            return
        if len(head) > MAX_REQUEST_BYTES:
            await self._reply(writer, 431, b"request too large\n")
            return
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            await self._reply(writer, 405, b"only GET\n")
        elif path == "/metrics":
            await self._metrics(writer)
        elif path == "/healthz":
            await self._reply(writer, 200, b"ok\n")
        elif path == "/readyz":
            ok, reason = self.ready()
            await self._reply(writer, 200 if ok else 503, reason.encode() + b"\n")
        else:
            await self._reply(writer, 404, b"try /metrics, /healthz or /readyz\n")

    async def _metrics(self, writer: asyncio.StreamWriter) -> None:
        if self.refresh is not None:
            try:
                await self.refresh()
            except Exception:  # a figure we could not read must not take the endpoint down
                log.exception("refreshing metrics failed")
        await self._reply(writer, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Unavailable"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
