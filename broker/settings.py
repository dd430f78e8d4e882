"""Bus settings, read from arguments or ``ORCHESTRATOR_*`` environment variables."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    """Where the bus connects and how it names things.

    ``broker_url`` unset means the in-process bus; that is what a bare
    ``CommunicationBus()`` gives unless ``ORCHESTRATOR_BROKER_URL`` is set.
    """

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    broker_url: str | None = Field(
        default=None, description="amqp:// URL of RabbitMQ; unset = in-process bus"
    )
    prefix: str = Field(
        default="orchestrator",
        # No dots: names are joined with dots, so "a" and "a.tasks" could collide.
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="prefix of every exchange and queue name",
    )
    max_message_bytes: int = Field(
        default=1024 * 1024, gt=0, description="largest message body the bus publishes"
    )
    amqp_heartbeat: int = Field(
        default=10, ge=0, description="AMQP heartbeat in seconds (RabbitMQ default is 60)"
    )
    reconnect_interval: float = Field(
        default=1.0, gt=0, description="seconds between reconnect tries after a lost connection"
    )
    connect_attempts: int = Field(default=3, ge=1, description="tries of the first connect")
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds per connect try")


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: keeps [::1] brackets and port
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
