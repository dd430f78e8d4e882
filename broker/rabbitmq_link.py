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
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import unquote

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from yarl import URL

from .errors import BusConnectionError
from .settings import BusSettings, check_broker_url
from .tls import client_context, handshake_failure, read_password_file, tls_files

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
    """The broker URL with our heartbeat and reconnect interval, unless it sets its own.

    Raises ``ValueError`` for a URL that is not an AMQP address (settings made
    with ``model_copy`` skip the check ``BusSettings`` makes).
    """
    raw = settings.broker_url or default
    try:
        check_broker_url(raw)
    except ValueError as exc:
        raise ValueError(f"broker_url: {exc}") from None
    url = URL(raw)
    password = broker_password(settings)
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
    exc: BaseException, url: URL, address: str, password_setting: str = "broker_url"
) -> BrokerRefused | None:
    """What the broker refused, when ``exc`` is a refusal rather than a broken link."""
    tls = handshake_failure(exc)
    if tls is not None:
        setting, problem = tls
        return BrokerRefused(f"{setting}: TLS to RabbitMQ at {address}: {problem}", setting)
    user = unquote(url.user or "guest")
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


async def _connect_once(
    url: str, timeout: float, connection_name: str, context: ssl.SSLContext | None
) -> AbstractRobustConnection:
    """One try of ``connect_robust``, closed again unless it succeeds.

    ``connect_robust`` connects in a task of its own that survives a
    cancelled connect and tries again for ever, which kept a process that
    was told to stop from ending: a try that is cancelled or fails closes
    its connection, and that task with it.
    """
    connection = aio_pika.RobustConnection(
        URL(url), ssl_context=context, client_properties={"connection_name": connection_name}
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection


async def open_connection(
    url: str, settings: BusSettings, *, connection_name: str, address: str
) -> AbstractRobustConnection:
    """A robust connection, after ``connect_attempts`` tries at most.

    Raises ``BrokerRefused`` at once when the broker refuses the login or the
    virtual host, else ``BusConnectionError`` naming the broker by ``address``
    (the URL without its password), and without the password that aio-pika
    may have put in its own message. Cancelling it (a signal, a timeout)
    stops it at once, between tries too. A TLS setting that cannot be used
    (``broker.tls.client_context``) is a ``ValueError`` naming it, before any try.
    """
    context = client_context(settings, url)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(settings.connect_attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception(_retryable),
            reraise=True,
        ):
            with attempt:
                return await _connect_once(url, settings.connect_timeout, connection_name, context)
    except Exception as exc:
        refused = _refusal(exc, URL(url), address, _password_setting(settings))
        if refused is not None:
            raise refused from None
        detail = str(exc)
        password = URL(url).password
        if password:
            detail = detail.replace(password, "***")
        hint = ""
        if context is not None and not tls_files(settings, url).cert_file and "reset" in detail:
            # TLS 1.3: a broker that requires a client certificate just drops the connection.
            hint = " (over TLS: does the broker require a client certificate, broker_cert_file?)"
        raise BusConnectionError(
            f"cannot reach RabbitMQ at {address}: {type(exc).__name__}: {detail}{hint}"
        ) from None
    raise AssertionError("unreachable: tenacity either returns or reraises")
