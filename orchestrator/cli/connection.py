"""How a command talks to the broker and how a signal ends it: a client that
declares nothing, requests whose refusal is a ``CliError``, and ``run``, the
``asyncio.run`` of every command, under which SIGINT and SIGTERM end the
command within ``STOP_WITHIN`` seconds at every stage, connecting included.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

from broker import BusSettings, RabbitMQBus, WireMessage, event_loop

from .errors import EXIT_BAD_INPUT, EXIT_UNREACHABLE, CliError

T = TypeVar("T")

STOP_WITHIN = 1.5
"""Seconds a graceful stop may take after a signal before the command is cancelled."""
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def client(settings: BusSettings) -> RabbitMQBus:
    """A connection that only sends requests: it declares nothing on the broker."""
    return RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:cli", declare_topology=False
    )


@contextlib.asynccontextmanager
async def connected(bus: RabbitMQBus) -> AsyncIterator[RabbitMQBus]:
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def call(bus: RabbitMQBus, request: WireMessage, timeout: float) -> Any:
    """The result of a request to the orchestrator; ``CliError`` when it refuses."""
    reply = await bus.request(request, timeout=timeout)
    if reply.ok:
        return reply.result
    assert reply.error is not None
    code = EXIT_UNREACHABLE if reply.error.type == "unavailable" else EXIT_BAD_INPUT
    raise CliError(reply.error.message, code)


# --- signals ----------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised when SIGINT or SIGTERM ended a command before it was done."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def code(self) -> int:
        """The exit code of a process that a signal ended: 128 + its number."""
        return 128 + self.signum


class _Signals:
    """SIGINT and SIGTERM during one command.

    Until the command asks for a graceful stop (``stop_on_signals``) a signal
    cancels it at once: connecting, waiting for a reply, anything. Afterwards
    a signal sets the stop event, and the command is cancelled if it has not
    ended ``STOP_WITHIN`` seconds later, or at a second signal.
    """

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.stop = asyncio.Event()
        self.graceful = False
        self.received: int | None = None
        self._loop = asyncio.get_running_loop()

    def install(self) -> None:
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        first = self.received is None
        self.received = sig if first else self.received
        if self.graceful and first:
            self.stop.set()
            self._loop.call_later(STOP_WITHIN, self._cancel)
        else:
            self._cancel()

    def _cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()
            # Whatever cleans up on the way out (closing a connection) gets as long again.
            self._loop.call_later(STOP_WITHIN, self._cancel_again)

    def _cancel_again(self) -> None:
        if not self.task.done():
            self.task.cancel()


_current: ContextVar[_Signals | None] = ContextVar("signals", default=None)


def run(main: Coroutine[Any, Any, T], *, ends_by_signal: bool = False) -> T | None:
    """``asyncio.run(main)``, ended within about ``STOP_WITHIN`` s by SIGINT or SIGTERM.

    A command that runs until it is told to stop (``ends_by_signal``: serve,
    watch, agent run) then returns None, whatever stage it was at; any other
    raises ``Interrupted``.
    """
    return event_loop.run(_guarded(main, ends_by_signal))  # uvloop where installed


async def _guarded(main: Coroutine[Any, Any, T], ends_by_signal: bool) -> T | None:
    task = asyncio.current_task()
    assert task is not None
    signals = _Signals(task)
    signals.install()
    token = _current.set(signals)
    try:
        return await main
    except asyncio.CancelledError:
        if signals.received is None:
            raise
        if ends_by_signal:
            return None
        raise Interrupted(signals.received) from None
    finally:
        _current.reset(token)
        signals.uninstall()
    # (A graceful stop that ended by itself returns main's result above.)


def stop_on_signals() -> asyncio.Event:
    """From now on a signal asks for a graceful stop: the event it sets.

    Under ``run`` the command is still cancelled if it has not stopped within
    ``STOP_WITHIN`` seconds; outside ``run`` the event is all there is.
    """
    signals = _current.get()
    if signals is not None:
        signals.graceful = True
        if signals.received is not None:
            signals.stop.set()
        return signals.stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
