"""A command's settings: its options, else ``ORCHESTRATOR_*`` variables, else defaults.

The options every command shares are declared once here, so that each command
names, explains and defaults them alike: ``--broker`` and ``--prefix`` in each
command's signature, and the TLS and password options of every command that
takes ``--broker``, added by ``connection_options`` where the commands are
registered. A password in ``--broker`` is kept out of ``ps`` by ``redaction``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import typing
from collections.abc import Callable
from contextvars import ContextVar
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import DEFAULT_REQUEST_TIMEOUT, BusSettings, default_broker_url
from broker.rabbitmq_link import broker_password
from broker.tls import client_context

from .errors import CliError
from .redaction import out_of_ps, remember_password, remember_secret, restore_password

log = logging.getLogger("orchestrator.cli")


class CliSettings(BaseSettings):
    """What the command line reads from ``ORCHESTRATOR_*`` beyond the bus settings."""

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    store: str = Field(
        default="memory",
        description="state store of serve: memory | sqlite:PATH | postgresql://HOST/DATABASE",
    )
    request_timeout: float = Field(
        default=DEFAULT_REQUEST_TIMEOUT, gt=0, description="seconds to wait for a reply"
    )


def read_settings(broker: str | None, prefix: str | None) -> tuple[BusSettings, CliSettings]:
    """Options over ``ORCHESTRATOR_*`` over defaults; the local broker if none is set.

    Read once per command, before anything connects: a bad ``ORCHESTRATOR_*``
    value is an error of every command, whichever setting it uses. So is a TLS
    file that is not a certificate or key, or a password file that cannot be
    read: one line naming the option or variable that gave it.
    """
    given = _given.get() or {}
    overrides: dict[str, Any] = {}
    if broker is not None:  # with its password, if it was moved out of the command line
        overrides["broker_url"] = restore_password(broker)
    if prefix is not None:
        overrides["prefix"] = prefix
    for field in CONNECTION_OPTIONS:
        if field in given:
            overrides[field] = given[field]
    try:
        settings = BusSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        if field not in SECRET_AND_TLS_FIELDS:
            raise
        message = str(first["msg"]).removeprefix("Value error, ")
        raise CliError(f"{_named(field, given)}: {message}") from None
    cli_settings = CliSettings()
    if not settings.broker_url:
        settings = settings.model_copy(update={"broker_url": default_broker_url()})
    remember_secret(settings.broker_url)
    try:
        password = broker_password(settings)
        client_context(settings, settings.broker_url or "", warn=False)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise CliError(f"{_named(field, given)}: {message}") from None
    if password is not None:
        remember_password(urlsplit(settings.broker_url or "").username or "guest", password)
    return settings, cli_settings


def _named(field: str, given: dict[str, Any]) -> str:
    """How the user gave ``field``: its option, its ``ORCHESTRATOR_*`` variable, or its name."""
    if field in given:
        return CONNECTION_OPTIONS[field][0]
    variable = f"ORCHESTRATOR_{field.upper()}"
    return variable if os.environ.get(variable) else field


# --- the password and TLS options of every command that connects -------------------------

CONNECTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "broker_password_file": ("--broker-password-file",),
    "broker_ca_file": ("--broker-ca-file",),
    "broker_cert_file": ("--broker-cert-file",),
    "broker_key_file": ("--broker-key-file",),
    "broker_tls_verify": ("--tls-no-verify",),
}
"""The option that gives each of these ``BusSettings`` fields on every command that connects."""

SECRET_AND_TLS_FIELDS = (*CONNECTION_OPTIONS, "broker_password", "broker_key_password")


def _file_option(option: str, variable: str, what: str) -> Any:
    return Annotated[
        str | None,
        typer.Option(option, metavar="FILE", show_default=False, help=f"{what} Env: {variable}."),
    ]


_OPTION_PARAMETERS: dict[str, Any] = {
    "broker_password_file": _file_option(
        "--broker-password-file",
        "ORCHESTRATOR_BROKER_PASSWORD_FILE",
        "File holding the broker password (for a URL without one), e.g. a mounted secret."
        " Or ORCHESTRATOR_BROKER_PASSWORD.",
    ),
    "broker_ca_file": _file_option(
        "--broker-ca-file",
        "ORCHESTRATOR_BROKER_CA_FILE",
        "amqps: PEM file of the CA the broker's certificate must chain to (default: the"
        " system's CAs).",
    ),
    "broker_cert_file": _file_option(
        "--broker-cert-file",
        "ORCHESTRATOR_BROKER_CERT_FILE",
        "amqps: PEM file of our client certificate (with its key, if no --broker-key-file).",
    ),
    "broker_key_file": _file_option(
        "--broker-key-file",
        "ORCHESTRATOR_BROKER_KEY_FILE",
        "amqps: PEM file of our client key (an encrypted one: ORCHESTRATOR_BROKER_KEY_PASSWORD).",
    ),
    "tls_no_verify": Annotated[
        bool,
        typer.Option(
            "--tls-no-verify",
            help="amqps: do not check the broker's certificate or its host name (logged as a"
            " WARNING at each connect). Env: ORCHESTRATOR_BROKER_TLS_VERIFY=false.",
        ),
    ],
}

_given: ContextVar[dict[str, Any] | None] = ContextVar("connection_options", default=None)
"""The password and TLS options this command was given (read by ``read_settings``)."""


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with the password and TLS options too, if it takes ``--broker``.

    Typer reads a command's options from its signature: the one returned has
    those of ``command`` and these; it calls ``command`` with its own, and
    ``read_settings`` gets these.
    """
    hints = typing.get_type_hints(command, include_extras=True)
    if hints.get("broker") != Broker:
        return command
    signature = inspect.signature(command, eval_str=True)
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=False if name == "tls_no_verify" else None,
            annotation=annotation,
        )
        for name, annotation in _OPTION_PARAMETERS.items()
    ]

    @functools.wraps(command)
    def with_connection_options(*args: Any, **kwargs: Any) -> Any:
        given: dict[str, Any] = {}
        for name in _OPTION_PARAMETERS:
            value = kwargs.pop(name, None)
            if name == "tls_no_verify":
                if value:
                    given["broker_tls_verify"] = False
            elif value is not None:
                given[name] = value
        token = _given.set(given)
        try:
            return command(*args, **kwargs)
        finally:
            _given.reset(token)

    with_connection_options.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    with_connection_options.__annotations__ = {**hints, **_OPTION_PARAMETERS}
    return with_connection_options


# --- options shared by commands -------------------------------------------------------

Broker = Annotated[
    str | None,
    typer.Option(
        "--broker",
        "-b",
        metavar="URL",
        help="amqp:// or amqps:// URL of RabbitMQ, best without its password (see"
        " --broker-password-file). Env: ORCHESTRATOR_BROKER_URL; default: the local broker.",
        show_default=False,
        callback=out_of_ps,
    ),
]
Prefix = Annotated[
    str | None,
    typer.Option(
        "--prefix",
        metavar="PREFIX",
        help="Prefix of every exchange and queue. Env: ORCHESTRATOR_PREFIX; default: orchestrator.",
        show_default=False,
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        metavar="PORT",
        help="Serve /metrics, /healthz and /readyz on this port (all interfaces).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class LogLevelName(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevel = Annotated[LogLevelName, typer.Option("--log-level", help="How much to log on stderr.")]
