"""The broker passwords this process has seen, and text without them.

A password reaches the command line in a URL (an option, the environment), or
beside it (``ORCHESTRATOR_BROKER_PASSWORD``, a password file), and
may come back in any text: an error, a log record, a task's result. Errors and
logs lose it wherever it is (``scrub``); data loses it only as a URL's
``user:password@`` (``scrub_urls``), so that user data and JSON are never
altered.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

known_secrets: set[tuple[str, str]] = set()
"""(username, password) of every broker URL seen, to blank out of messages."""


def remember_secret(url: str | None) -> None:
    """Learn ``url``'s password, if it has one, before anything can print it."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return
    if password:
        known_secrets.add((parts.username or "", password))


def remember_password(username: str, password: str) -> None:
    """Learn a password given beside the URL (a file, the environment)."""
    if password:
        known_secrets.add((username, password))


def scrub(text: str) -> str:
    """``text`` without any broker password we know of: for errors and logs."""
    for username, password in known_secrets:
        text = text.replace(f":{password}@", ":***@")
        if password != username:  # a password equal to the user name is shown anyway
            text = text.replace(password, "***")
    return text


_URL_USER = r"(?:amqps?|https?)://[^\s/?#@:]*:"
"""The start of a URL up to its password: scheme, ``//``, user name and ``:``."""


def scrub_urls(text: str) -> str:
    """``text`` with a known password blanked out where it is a URL's ``user:password@``.

    For data (task results, ``--json``): anything else, the password as a plain
    word too, stays as it is, so that user data and JSON are never altered.
    """
    for _, password in known_secrets:
        pattern = f"({_URL_USER}){re.escape(password)}@"
        text = re.sub(pattern, lambda match: f"{match.group(1)}***@", text, flags=re.IGNORECASE)
    return text
