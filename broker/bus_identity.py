"""Who a bus is: its settings from arguments or the environment, and the broker user
it logs in as (and so stamps on every message as ``user_id``).

Beside ``broker.bus`` (which re-exports these), so that the interface module
stays about the interface.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

from .cert_login import certificate_user, external_login
from .settings import BusSettings, first_address
from .tls import tls_files


def _settings_from(
    broker_url: str | None = None, *, settings: BusSettings | None = None, **_: Any
) -> BusSettings:
    if settings is not None:
        if broker_url is not None:
            return settings.model_copy(update={"broker_url": broker_url})
        return settings
    if broker_url is not None:
        return BusSettings(broker_url=broker_url)
    return BusSettings()


def default_broker_url() -> str:
    """The broker tests and tools use when none is given: env, then localhost."""
    return os.environ.get("ORCHESTRATOR_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


def settings_user(settings: BusSettings) -> str | None:
    """The user a bus of ``settings`` logs in as: the URL's (``login_user``); for
    a login by client certificate (``auth=external``), ``broker_user``, else the
    name the broker takes from ``broker_cert_file`` (``broker.cert_login``).

    ``ValueError`` naming ``broker_cert_file`` when that name cannot be read.
    """
    url = settings.broker_url or default_broker_url()
    if not external_login(first_address(url)):
        return login_user(url)
    if settings.broker_user:
        return settings.broker_user
    cert_file = tls_files(settings, url).cert_file
    if not cert_file:
        raise ValueError(
            "broker_cert_file: auth=external logs in by client certificate, and none is set"
            " (or set broker_user to the name the broker takes from it)"
        )
    try:
        return certificate_user(cert_file, settings.broker_cert_login_from)
    except ValueError as exc:
        raise ValueError(f"broker_cert_file: {exc}") from None


def login_user(broker_url: str) -> str | None:
    """The user a broker URL logs in as (aiormq's rule: ``guest`` when it names
    none); None for a login by certificate (``auth=external``), whose user the
    broker takes from the certificate."""
    parts = urlsplit(first_address(broker_url))
    if external_login(first_address(broker_url)):
        return None
    return unquote(parts.username) if parts.username else "guest"
