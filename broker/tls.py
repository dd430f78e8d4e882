"""What a broker connection reads from files: TLS certificates and keys, and the password.

aiormq can set up TLS from the URL's query (``cafile``, ``certfile``,
``keyfile``, ``no_verify_ssl``), which aio-pika mentions in passing and
documents nowhere. The bus has settings for it instead (``BusSettings``:
``broker_ca_file``, ``broker_cert_file``, ``broker_key_file``,
``broker_key_password``, ``broker_tls_verify``) and builds one
``ssl.SSLContext`` from them, which goes to aio-pika's documented
``ssl_context`` argument. The URL's options are still read, as fallbacks,
so that a URL that worked before works the same way.

Verification is on unless a setting turns it off: the broker's certificate
must chain to the CA and name the URL's host. Turning it off is logged at
WARNING each time a connection is opened with it, never silently.

The password may come from a file (``broker_password_file``: a mounted
secret) or the environment (``broker_password``) instead of the URL, where
it would show in ``ps`` when given on a command line.
"""

from __future__ import annotations

import logging
import os
import ssl
from base64 import b64decode
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from .settings import BusSettings

log = logging.getLogger("broker.tls")

TLS_SETTINGS = ("broker_ca_file", "broker_cert_file", "broker_key_file")
"""The settings that name a TLS file; each needs an amqps:// URL."""


def check_file(what: str, path: str, *, folder: bool = False) -> str:
    """``path`` if it is a file (``folder``: a folder) we can read; else ``ValueError``
    saying what is wrong with it, ``what`` first (a setting's or URL option's name).

    The one check of every file the bus reads (TLS files and folders, the
    password file), whether a setting or the URL's query names it, so that
    each is refused with the same words before anything connects.
    """
    if not path.strip():
        raise ValueError(f"{what}: empty path")
    if folder:
        if not os.path.isdir(path):
            raise ValueError(f"{what} {path!r} is not a folder")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"{what} {path!r} cannot be read: permission denied")
        return path
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None
    return path


def read_password_file(path: str) -> str:
    """The password in ``path``: its text without the line break at its end.

    ``ValueError`` naming the path when it cannot be read or holds no password.
    """
    check_file("password file", path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"password file {path!r} cannot be read: {exc}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"password file {path!r} is empty")
    if "\n" in password:
        raise ValueError(f"password file {path!r} holds more than one line")
    return password


@dataclass(frozen=True)
class TlsFiles:
    """Where a connection's TLS comes from: settings first, then the URL's options."""

    ca_file: str | None
    ca_path: str | None
    ca_data: bytes | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    verify_setting: str
    """How verification was turned off, for the warning: the setting or the URL option."""


def tls_files(settings: BusSettings, url: str) -> TlsFiles:
    """The TLS files of ``settings`` and of ``url``'s query (settings win); of its
    first node address's query, for a list of cluster nodes."""
    from .settings import first_address  # it imports this module

    query = {
        name: values[-1] for name, values in parse_qs(urlsplit(first_address(url)).query).items()
    }
    url_verify = query.get("no_verify_ssl", "0") == "0"  # as aiormq reads it
    cadata = query.get("cadata")
    return TlsFiles(
        ca_file=settings.broker_ca_file or query.get("cafile"),
        ca_path=query.get("capath"),
        ca_data=b64decode(cadata) if cadata else None,
        cert_file=settings.broker_cert_file or query.get("certfile"),
        key_file=settings.broker_key_file or query.get("keyfile"),
        verify=settings.broker_tls_verify and url_verify,
        verify_setting="broker_tls_verify" if not settings.broker_tls_verify else "no_verify_ssl",
    )


def client_context(settings: BusSettings, url: str, *, warn: bool = True) -> ssl.SSLContext | None:
    """The ``ssl.SSLContext`` for connecting to ``url`` (None for amqp://).

    Raises ``ValueError`` naming the setting for a TLS setting without
    amqps://, or a file that is not a certificate or key (or a key whose
    password is missing or wrong). ``warn``: log that verification is off
    (each connect does; a check of the settings before connecting does not).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme != "amqps":
        given = [name for name in TLS_SETTINGS if getattr(settings, name)]
        if given:
            raise ValueError(f"{given[0]}: a TLS setting, and TLS needs an amqps:// broker_url")
        return None
    files = tls_files(settings, url)
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=files.ca_file,
            capath=files.ca_path,
            cadata=files.ca_data,
        )
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"broker_ca_file: {files.ca_file!r} holds no CA certificate we can read: {_reason(exc)}"
        ) from None
    if files.key_file and not files.cert_file:
        raise ValueError("broker_key_file: a client key needs its certificate, broker_cert_file")
    if files.cert_file:
        _load_client_certificate(context, files, settings)
    if not files.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if warn:
            log.warning(
                "TLS certificate verification is OFF (%s) for %s: the broker is not"
                " authenticated, and anyone between us can read and change the traffic",
                files.verify_setting,
                urlsplit(url).hostname,
            )
    return context


def _load_client_certificate(
    context: ssl.SSLContext, files: TlsFiles, settings: BusSettings
) -> None:
    secret = settings.broker_key_password
    asked: list[bool] = []

    def password() -> str:
        # Without a password OpenSSL would prompt on the terminal: a service would hang.
        asked.append(True)
        return secret.get_secret_value() if secret is not None else ""

    try:
        context.load_cert_chain(files.cert_file or "", files.key_file, password=password)
    except (ssl.SSLError, OSError) as exc:
        if asked and secret is None:
            problem = f"the key {files.key_file or files.cert_file!r} is encrypted: set its"
            raise ValueError(f"broker_key_password: {problem} password") from None
        if asked:
            raise ValueError(
                f"broker_key_password: it does not open the key"
                f" {files.key_file or files.cert_file!r}: {_reason(exc)}"
            ) from None
        setting = "broker_key_file" if "KEY_VALUES_MISMATCH" in str(exc) else "broker_cert_file"
        raise ValueError(
            f"{setting}: cannot use certificate {files.cert_file!r} with key"
            f" {files.key_file or files.cert_file!r}: {_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return getattr(exc, "strerror", None) or str(exc)


# --- what a failed handshake means ---------------------------------------------------------


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` among ``exc`` and its causes and contexts (they may form a loop)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


_HOST_MISMATCH = (62, 64)
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


def handshake_failure(exc: BaseException) -> tuple[str, str] | None:
    """(setting to fix, what went wrong) when ``exc`` is, or was caused by, a failed TLS handshake.

    aiormq wraps the ``ssl.SSLError`` in its own ``AMQPConnectionError``;
    the cause says what happened.
    """
    seen = _ssl_error(exc)
    if seen is None:
        return None
    if isinstance(seen, ssl.SSLCertVerificationError):
        message = seen.verify_message or _reason(seen)
        if seen.verify_code in _HOST_MISMATCH:
            return "broker_url", f"its certificate does not name the host we connect to: {message}"
        return (
            "broker_ca_file",
            f"its certificate is not signed by a CA we trust: {message}"
            " (broker_ca_file names the CA that signed it)",
        )
    reason = str(seen.reason or seen)
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
        return "broker_url", "it does not speak TLS there: is that port a TLS listener?"
    if any(alert in reason for alert in ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE")):
        return (
            "broker_cert_file",
            f"it refused our client certificate: {_reason(seen)}",
        )
    return "broker_url", f"TLS failed: {_reason(seen)}"
