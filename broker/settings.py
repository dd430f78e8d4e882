"""Bus settings, read from arguments or ``ORCHESTRATOR_*`` environment variables.

A broker URL is checked when the settings are made, before anything connects:
``amqp://`` or ``amqps://`` with a host, and the TLS files it names (aiormq's
``cafile``, ``capath``, ``certfile`` and ``keyfile`` query options, kept as
fallbacks of the ``broker_ca_file``, ``broker_cert_file`` and
``broker_key_file`` settings) present and readable; so are those settings'
files and ``broker_password_file``. A bad one is a ``ValueError``
(pydantic's ``ValidationError``) naming ``broker_url``, its message showing
the URL without its password; the input is kept out of the error's text for
the same reason.

``broker_url`` may list several nodes of one RabbitMQ cluster, separated by
commas (``amqp://u@h1:5672/,amqp://u@h2:5672/``): the bus connects to the
first that answers and, when it loses that one, to the next ones in turn
(``broker.rabbitmq_link``). Every address is checked alike; they must agree on
the scheme, the user and the virtual host (one cluster, one login), and the
password and TLS settings apply to each of them.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .cert_login import LoginFrom, external_login
from .tls import check_file, read_password_file

AMQP_SCHEMES = ("amqp", "amqps")
TLS_FILES = ("cafile", "certfile", "keyfile")
"""URL query options that name a file aiormq reads to set up TLS."""
TLS_FOLDERS = ("capath",)
"""URL query options that name a folder of CA certificates."""
URL_EXAMPLE = "amqp://user:password@host:5672/vhost"
_NEXT_ADDRESS = re.compile(r",\s*(?=amqps?://)", re.IGNORECASE)
"""Where a list of node addresses splits: a comma before the next scheme (a
comma elsewhere, in a query option for instance, stays part of its URL)."""


class BusSettings(BaseSettings):
    """Where the bus connects and how it names things.

    ``broker_url`` unset means the in-process bus; that is what a bare
    ``CommunicationBus()`` gives unless ``ORCHESTRATOR_BROKER_URL`` is set.
    """

    model_config = SettingsConfigDict(
        env_prefix="ORCHESTRATOR_", extra="ignore", hide_input_in_errors=True
    )

    broker_url: str | None = Field(
        default=None,
        description="amqp:// or amqps:// URL of RabbitMQ; unset = in-process bus. Its"
        " password may be left out and given by broker_password(_file) instead. Several"
        " nodes of one cluster: their URLs separated by commas, tried in turn",
    )
    quorum_queues: bool = Field(
        default=False,
        description="declare the orchestrator's own queues (events, requests, its dead"
        " letters) as quorum queues, replicated across a cluster's nodes; task queues stay"
        " classic (priorities). An existing classic queue cannot change type: see the README",
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
    declare: Literal["all", "own"] | None = Field(
        default=None,
        description="what the RabbitMQ bus declares: all = the shared topology (the"
        " orchestrator); own = only its own queues, the rest checked passively (agents,"
        " clients, monitors: see broker.permissions); unset = all where the user may",
    )
    orchestrator_user: str | None = Field(
        default=None,
        description="the broker user whose commands an agent obeys (and whose task messages"
        " the broker's own dead letters carry); unset: the bus's own user, one trust domain",
    )
    # The password and TLS (broker/tls.py): files, so that no secret is on a command line.
    broker_password: SecretStr | None = Field(
        default=None, description="password of the URL's user, for a URL without one"
    )
    broker_password_file: str | None = Field(
        default=None,
        description="file holding the password (a mounted secret), for a URL without one",
    )
    broker_ca_file: str | None = Field(
        default=None,
        description="PEM file of the CA(s) the broker's certificate must chain to; unset = the system's",
    )
    broker_cert_file: str | None = Field(
        default=None, description="PEM file of our client certificate (the key too, if no key file)"
    )
    broker_key_file: str | None = Field(default=None, description="PEM file of our client key")
    broker_key_password: SecretStr | None = Field(
        default=None, description="password of an encrypted client key"
    )
    broker_tls_verify: bool = Field(
        default=True,
        description="check the broker's certificate and that it names the URL's host;"
        " false is logged as a WARNING at each connect",
    )
    # A login by client certificate (auth=external in the URL): broker/cert_login.py
    broker_user: str | None = Field(
        default=None,
        min_length=1,
        description="with auth=external in broker_url: the user the broker takes from the"
        " client certificate (stamped on every message as its user_id); unset: read from"
        " broker_cert_file as broker_cert_login_from says",
    )
    broker_cert_login_from: LoginFrom = Field(
        default="common_name",
        description="with auth=external: how the broker names the certificate's user, as its"
        " ssl_cert_login_from: common_name (the subject's CN) or distinguished_name"
        " (RabbitMQ's default: the whole subject, CN=...,O=...)",
    )

    @field_validator("broker_url")
    @classmethod
    def _a_broker_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # unset: the in-process bus (or the local broker, where one is needed)
        check_broker_url(value.strip())
        return value.strip()

    @field_validator("broker_password")
    @classmethod
    def _one_password(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if _url_password(info.data.get("broker_url")):
            raise ValueError("the broker URL has a password too: give only one")
        return value

    @field_validator("broker_password_file")
    @classmethod
    def _a_password_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        read_password_file(value)
        if _url_password(info.data.get("broker_url")):
            raise ValueError("the broker URL has a password too: give only one")
        if info.data.get("broker_password") is not None:
            raise ValueError("broker_password is set too: give only one")
        return value

    @field_validator("broker_ca_file", "broker_cert_file", "broker_key_file")
    @classmethod
    def _a_tls_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        what = {"broker_ca_file": "CA file", "broker_cert_file": "certificate file"}
        check_file(what.get(info.field_name or "", "key file"), value)
        url = info.data.get("broker_url")
        if url and urlsplit(url).scheme.lower() != "amqps":
            raise ValueError(f"{value!r}: a TLS file, and TLS needs an amqps:// broker_url")
        return value

    @field_validator("broker_user")
    @classmethod
    def _a_certificate_login(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        url = info.data.get("broker_url")
        if url and not external_login(first_address(url)):
            raise ValueError(
                "only for a login by client certificate (auth=external in broker_url);"
                " a password login's user is the URL's"
            )
        return value


def _url_password(url: str | None) -> bool:
    try:
        return bool(url and any(urlsplit(one).password for one in broker_addresses(url)))
    except ValueError:
        return False


def broker_addresses(url: str) -> list[str]:
    """The node addresses of a ``broker_url``: one, or several separated by commas."""
    return [one for one in _NEXT_ADDRESS.split(url.strip()) if one]


def first_address(url: str) -> str:
    """The first node address of a ``broker_url`` (what its user and vhost are read from)."""
    addresses = broker_addresses(url)
    return addresses[0] if addresses else url


def check_broker_url(url: str) -> None:
    """Raise ``ValueError`` saying what is wrong with ``url`` as a RabbitMQ address,
    or with one of its node addresses (they must agree on scheme, user and vhost).

    The message shows the URL without its password. Nothing connects.
    """
    addresses = broker_addresses(url) or [url]
    for one in addresses:
        other = re.search(r",\s*([A-Za-z][\w+.-]*)://", one)
        if other:
            raise ValueError(
                f"scheme {other[1] + '://'!r} of a node address in the list is not AMQP:"
                f" expected URLs such as {URL_EXAMPLE} separated by commas, got {_shown(url)!r}"
            )
        _check_one_url(one)
    if len(addresses) > 1:
        first = urlsplit(addresses[0])
        for one in addresses[1:]:
            other = urlsplit(one)
            for what, mine, theirs in (
                ("scheme", first.scheme.lower(), other.scheme.lower()),
                ("user", first.username, other.username),
                ("virtual host", first.path or "/", other.path or "/"),
            ):
                if mine != theirs:
                    raise ValueError(
                        f"the node addresses of one cluster must have one {what}:"
                        f" {_shown(addresses[0])!r} and {_shown(one)!r} differ"
                    )


def _check_one_url(url: str) -> None:
    shown = _shown(url)
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in AMQP_SCHEMES or not url.strip().lower().startswith(
        tuple(f"{scheme}://" for scheme in AMQP_SCHEMES)
    ):
        if parts.scheme and "://" in url:
            problem = f"scheme {parts.scheme + '://'!r} is not AMQP"
        else:
            problem = "no amqp:// or amqps:// in front"
        raise ValueError(
            f"{problem}: expected a URL such as {URL_EXAMPLE} (amqps:// for TLS), got {shown!r}"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"no host: expected a URL such as {URL_EXAMPLE}, got {shown!r}")
    if any(c.isspace() for c in url.strip()):
        raise ValueError(f"spaces in the URL: expected a URL such as {URL_EXAMPLE}, got {shown!r}")
    try:
        parts.port  # noqa: B018 - it raises for a port that is not a number 0-65535
    except ValueError:
        raise ValueError(f"the port is not a number 1-65535: got {shown!r}") from None
    options = parse_qs(parts.query)
    tls = [name for name in (*TLS_FILES, *TLS_FOLDERS) if name in options]
    if tls and parts.scheme.lower() != "amqps":
        raise ValueError(f"{tls[0]} is a TLS option, and TLS needs amqps://: got {shown!r}")
    for name in tls:
        check_file(name, options[name][-1], folder=name in TLS_FOLDERS)


def _shown(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:
        return url


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs; every
    address's, for a list of cluster nodes."""
    addresses = broker_addresses(url)
    if len(addresses) > 1:
        return ",".join(_redact_one(one) for one in addresses)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: keeps [::1] brackets and port
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
