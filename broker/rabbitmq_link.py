"""The RabbitMQ bus's connection: robust, with a retried first connect.

``connect_robust`` reconnects by itself once it has connected, but its first
connect fails fast, so that one is retried here (tenacity). Which aio-pika
and aiormq exceptions mean "the link is down, try again" is said once, here,
for every part of the bus; so is what the broker's refusal of a login or of
a virtual host means (``BrokerRefused``: retrying cannot cure it), and what a
failed TLS handshake means (a ``BrokerRefused`` naming the TLS setting to fix).

The URL connected to carries the password of ``broker_password`` or
``broker_password_file`` when it has none of its own; the TLS context comes
from ``broker.tls`` and goes to aio-pika's ``ssl_context`` argument.

Several node addresses (a cluster; ``broker_url`` lists them separated by
commas): the first connect tries them in turn and keeps the first that
answers; after that, ``FailoverConnection`` moves on to the next address at
each reconnect try. aio-pika's robust connection reconnects to its one URL
only (aio-pika issue #141, "Robust connect to multiple hosts", is open), and
everything the bus relies on across a reconnect (channels reopened, queues
and consumers declared again, publisher confirms) lives in that connection,
so the failover is a subclass of it rather than a connection of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from yarl import URL

from .cert_login import external_login
from .errors import BusConnectionError
from .settings import BusSettings, broker_addresses, check_broker_url, redact_url
from .tls import client_context, handshake_failure, read_password_file, tls_files

log = logging.getLogger(__name__)

TRANSIENT = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ChannelInvalidStateError,
    RuntimeError,  # aio-pika: "Connection closed" / "channel closed" while reconnecting
)
"""Failures that a reconnect of the robust connection can cure."""

CHANNEL_GONE = (ChannelInvalidStateError, aiormq.exceptions.AMQPError, RuntimeError)
"""What settling or cancelling on a channel that died raises. The broker has
then requeued its deliveries by itself, and they come again."""


class BrokerRefused(BusConnectionError):
    """Raised when the broker answers but will not open the connection: the
    login is refused (wrong user or password), or the virtual host does not
    exist or the user may not use it; or the TLS handshake failed (a
    certificate the CA did not sign, a host the certificate does not name, a
    client certificate the broker refused). Trying again cannot cure it; the
    message starts with the setting to fix, ``setting``."""

    setting = "broker_url"

    def __init__(self, message: str, setting: str = "broker_url") -> None:
        super().__init__(message)
        self.setting = setting


def amqp_url(settings: BusSettings, default: str) -> str:
    """The broker URL with our heartbeat and reconnect interval, unless it sets its own;
    each node address so, for a list of them (still separated by commas).

    Raises ``ValueError`` for a URL that is not an AMQP address (settings made
    with ``model_copy`` skip the check ``BusSettings`` makes).
    """
    raw = settings.broker_url or default
    try:
        check_broker_url(raw)
    except ValueError as exc:
        raise ValueError(f"broker_url: {exc}") from None
    password = broker_password(settings)
    return ",".join(_one_url(one, settings, password) for one in broker_addresses(raw))


def _one_url(raw: str, settings: BusSettings, password: str | None) -> str:
    url = URL(raw)
    if password is not None and not url.password:
        url = url.with_user(url.user or "guest").with_password(password)
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=settings.amqp_heartbeat)
    if "reconnect_interval" not in url.query:
        url = url.update_query(reconnect_interval=settings.reconnect_interval)
    return str(url)


def broker_password(settings: BusSettings) -> str | None:
    """The password of ``broker_password_file`` or ``broker_password`` (None: neither).

    The file is read at each connect, so that a rotated secret is used from the next one.
    """
    if settings.broker_password_file:
        try:
            return read_password_file(settings.broker_password_file)
        except ValueError as exc:
            raise ValueError(f"broker_password_file: {exc}") from None
    if settings.broker_password is not None:
        return settings.broker_password.get_secret_value() or None
    return None


def _password_setting(settings: BusSettings) -> str:
    """The setting that gave the password: a refused login names it."""
    if settings.broker_password_file:
        return "broker_password_file"
    if settings.broker_password is not None:
        return "broker_password"
    return "broker_url"


def _refusal(
    exc: BaseException,
    url: URL,
    address: str,
    password_setting: str = "broker_url",
    settings: BusSettings | None = None,
) -> BrokerRefused | None:
    """What the broker refused, when ``exc`` is a refusal rather than a broken link."""
    tls = handshake_failure(exc)
    if tls is not None:
        setting, problem = tls
        return BrokerRefused(f"{setting}: TLS to RabbitMQ at {address}: {problem}", setting)
    user = unquote(url.user or "guest")
    external = settings is not None and external_login(str(url))
    if external and isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        from .bus import settings_user  # it imports the buses, which import this module

        setting = "broker_user" if settings and settings.broker_user else "broker_cert_file"
        return BrokerRefused(
            f"{setting}: RabbitMQ at {address} refused the certificate login of user"
            f" {settings_user(settings) if settings else None!r}: it has no such user, or"
            " names the certificate's user otherwise (its ssl_cert_login_from:"
            " broker_cert_login_from)",
            setting,
        )
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefused(
            f"{password_setting}: RabbitMQ at {address} refused the login of user {user!r}:"
            " wrong user name or password",
            password_setting,
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return BrokerRefused(f"broker_url: RabbitMQ at {address} offers no login we can use: {exc}")
    # aiormq reports a Connection.Close in answer to Connection.Open, which is how
    # RabbitMQ refuses a virtual host, as a frame it did not expect.
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        vhost = unquote(url.path[1:]) if url.path not in ("", "/") else "/"
        return BrokerRefused(
            f"broker_url: RabbitMQ at {address} refused virtual host {vhost!r}: it does not"
            f" exist, or user {user!r} has no permission to use it"
        )
    return None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError | aiormq.exceptions.AuthenticationError):
        return False  # a certificate or login problem: the next try meets it again
    if handshake_failure(exc) is not None:
        return False  # aiormq's wrapping of one
    return isinstance(exc, TRANSIENT)


_CONNECT_TRY = getattr(aio_pika.RobustConnection, "_RobustConnection__connect_transport", None)
if _CONNECT_TRY is None:  # pragma: no cover - a check of the aio-pika this was written against
    raise ImportError(
        "aio-pika's RobustConnection has no __connect_transport (aio-pika 10 has):"
        " broker.rabbitmq_link.FailoverConnection must be adapted to this aio-pika"
    )


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several node addresses: each reconnect try goes to the next.

    aio-pika's reconnect loop makes every try through the private
    ``__connect_transport``, which connects to ``self.url``; this class
    overrides that one name to move ``url`` on to the next address before
    each try but the first, and keeps everything else aio-pika does after a
    reconnect (channels reopened, declares, consumers, confirms) as it is.
    The import fails loudly if that name goes away in another aio-pika.
    """

    def __init__(self, urls: Sequence[str], *, start: int = 0, **kwargs: Any) -> None:
        self._urls = [URL(one) for one in urls]
        self._at = start % len(self._urls)
        self._tries = 0
        super().__init__(self._urls[self._at], **kwargs)

    @property  # type: ignore[override]
    def url(self) -> URL:
        """The address connected to, or being tried."""
        return self._urls[self._at]

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika sets it at __init__ and in update_secret
        self._urls[self._at] = URL(value)

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's private name
        if self._tries and len(self._urls) > 1:
            self._at = (self._at + 1) % len(self._urls)
            log.info("reconnecting to the next RabbitMQ node, %s", redact_url(str(self.url)))
        self._tries += 1
        await _CONNECT_TRY(self)
        if self._tries > 1:
            log.warning("reconnected to RabbitMQ at %s", redact_url(str(self.url)))


async def _connect_once(
    urls: Sequence[str],
    start: int,
    timeout: float,
    connection_name: str,
    context: ssl.SSLContext | None,
) -> AbstractRobustConnection:
    """One try of a robust connection to ``urls[start]``, closed again unless it succeeds.

    ``connect_robust`` connects in a task of its own that survives a
    cancelled connect and tries again for ever, which kept a process that
    was told to stop from ending: a try that is cancelled or fails closes
    its connection, and that task with it.
    """
    connection = FailoverConnection(
        urls,
        start=start,
        ssl_context=context,
        client_properties={"connection_name": connection_name},
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


async def _connect_any(
    urls: Sequence[str], timeout: float, connection_name: str, context: ssl.SSLContext | None
) -> AbstractRobustConnection:
    """The first of ``urls`` that answers, tried in order; a refusal ends the round at once
    (the nodes of one cluster share their users), else the last failure is raised."""
    failure: BaseException | None = None
    for start in range(len(urls)):
        try:
            return await _connect_once(urls, start, timeout, connection_name, context)
        except Exception as exc:
            if not _retryable(exc):
                raise
            failure = exc
            if len(urls) > 1:
                log.info("RabbitMQ at %s does not answer: %s", redact_url(urls[start]), exc)
    assert failure is not None
    raise failure


async def open_connection(
    url: str, settings: BusSettings, *, connection_name: str, address: str
) -> AbstractRobustConnection:
    """A robust connection, after ``connect_attempts`` tries at most (each try
    goes through every node address of ``url`` in turn).

    Raises ``BrokerRefused`` at once when the broker refuses the login or the
    virtual host, else ``BusConnectionError`` naming the broker by ``address``
    (the URL without its password), and without the password that aio-pika
    may have put in its own message. Cancelling it (a signal, a timeout)
    stops it at once, between tries too. A TLS setting that cannot be used
    (``broker.tls.client_context``) is a ``ValueError`` naming it, before any try.
    """
    urls = broker_addresses(url)
    context = client_context(settings, urls[0])
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(settings.connect_attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception(_retryable),
            reraise=True,
        ):
            with attempt:
                return await _connect_any(urls, settings.connect_timeout, connection_name, context)
    except Exception as exc:
        refused = _refusal(exc, URL(urls[0]), address, _password_setting(settings), settings)
        if refused is not None:
            raise refused from None
        detail = str(exc)
        for one in urls:
            password = URL(one).password
            if password:
                detail = detail.replace(password, "***")
        hint = ""
        if context is not None and not tls_files(settings, urls[0]).cert_file and "reset" in detail:
            # TLS 1.3: a broker that requires a client certificate just drops the connection.
            hint = " (over TLS: does the broker require a client certificate, broker_cert_file?)"
        raise BusConnectionError(
            f"cannot reach RabbitMQ at {address}: {type(exc).__name__}: {detail}{hint}"
        ) from None
    raise AssertionError("unreachable: tenacity either returns or reraises")


CLOSE_CALLBACKS_WAIT = 5.0
"""How long ``close`` waits at most for aio-pika's close callbacks to finish
(they take milliseconds; a loaded machine can hold them up for a second or more)."""


async def close_callbacks_done() -> None:
    """Let the close callbacks aio-pika started for the channels and the
    connection finish: it runs each in a task of its own that nobody awaits,
    and one still pending when its event loop ends is destroyed mid-way
    ("Task was destroyed but it is pending"). Those a finishing callback
    starts (a channel's, then its connection's) are waited for too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_CALLBACKS_WAIT
    while (left := deadline - loop.time()) > 0:
        pending = [
            task
            for task in asyncio.all_tasks()
            if not task.done() and "OneShotCallback" in getattr(task.get_coro(), "__qualname__", "")
        ]
        if not pending:
            return
        await asyncio.wait(pending, timeout=left)
