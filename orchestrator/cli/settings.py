"""A command's settings: its options, else ``ORCHESTRATOR_*`` variables, else defaults.

The options every command shares are declared once here, so that each command
names, explains and defaults them alike.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import DEFAULT_REQUEST_TIMEOUT, BusSettings, default_broker_url

from .redaction import remember_secret


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
    value is an error of every command, whichever setting it uses.
    """
    overrides: dict[str, Any] = {}
    if broker is not None:
        overrides["broker_url"] = broker
    if prefix is not None:
        overrides["prefix"] = prefix
    settings = BusSettings(**overrides)
    cli_settings = CliSettings()
    if not settings.broker_url:
        settings = settings.model_copy(update={"broker_url": default_broker_url()})
    remember_secret(settings.broker_url)
    return settings, cli_settings


# --- options shared by commands -------------------------------------------------------

Broker = Annotated[
    str | None,
    typer.Option(
        "--broker",
        "-b",
        metavar="URL",
        help="amqp:// URL of RabbitMQ. Env: ORCHESTRATOR_BROKER_URL; default: the local broker.",
        show_default=False,
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
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class LogLevelName(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


LogLevel = Annotated[LogLevelName, typer.Option("--log-level", help="How much to log on stderr.")]
