"""The broker passwords this process has seen, and text without them.

A password reaches the command line in a URL (an option, the environment), or
beside it (``ORCHESTRATOR_BROKER_PASSWORD``, a password file), and
may come back in any text: an error, a log record, a task's result. Errors and
logs lose it wherever it is (``scrub``); data loses it only as a URL's
``user:password@`` (``scrub_urls``), so that user data and JSON are never
altered.

A password in ``--broker``'s URL is readable by every user of the machine in
``ps``. It is warned about, and the process runs itself again at once (the same
process id, ``os.execve``) with the password moved into its environment (which
only the same user and root can read) and out of its command line, before
anything connects (``out_of_ps``, the option's callback); there
``restore_password`` puts it back into the URL, so that the command goes on as
it was given. Python cannot rewrite its visible command line in place (that takes a C extension such as
``setproctitle``), and refusing the password would break every command line
that works today; the warning names the settings that keep it off the command
line from the start.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from broker.settings import broker_addresses, check_broker_url

log = logging.getLogger("orchestrator.cli")

known_secrets: set[tuple[str, str]] = set()
"""(username, password) of every broker URL seen, to blank out of messages."""


def remember_secret(url: str | None) -> None:
    """Learn ``url``'s password, if it has one, before anything can print it
    (each node address's, for a list of a cluster's nodes)."""
    if not url:
        return
    for one in broker_addresses(url):
        try:
            parts = urlsplit(one)
            password = parts.password
        except ValueError:
            continue
        if password:
            known_secrets.add((parts.username or "", password))


def remember_password(username: str, password: str) -> None:
    """Learn a password given beside the URL (a file, the environment)."""
    if password:
        known_secrets.add((username, password))


def scrub(text: str) -> str:
    """``text`` without any broker password we know of: for errors and logs.

    Blanked where it stands as a token of its own, not inside a longer word: a
    short password ("y") must not turn "every" into "ever***" (and so give
    itself away), while "password y refused" still loses it."""
    for username, password in known_secrets:
        text = text.replace(f":{password}@", ":***@")
        if password != username:  # a password equal to the user name is shown anyway
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", "***", text)
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


# --- a password on the command line ------------------------------------------------------

MOVED_PASSWORD = "ORCHESTRATOR_BROKER_URL_PASSWORD"
"""Where the password of ``--broker``'s URL waits while the process runs itself again."""


def out_of_ps(url: str | None) -> str | None:
    """``--broker``'s check: warn about a password in it, and move it out of ``ps``.

    Runs while the command line is parsed, before the command reads anything
    (a payload on stdin) or connects; then the process runs itself again
    (``os.execve``: the same process id) with the password in its environment.
    Not where the password is not on this process's command line (``main``
    called from Python), and not for a password that is the user name
    (RabbitMQ's ``guest:guest``): ``ps`` shows it whatever is done.
    """
    try:
        password = urlsplit(url).password if url else None
        if url and password:
            check_broker_url(url)
    except ValueError:
        return url  # not a broker URL: the settings say so, naming --broker
    if not url or not password or password == urlsplit(url).username:
        return url  # guest:guest: ps shows the user name, which says the password
    argv = _argv_without(url)
    log.warning(
        "--broker: a password in the URL on a command line can be read by every user of"
        " this machine (ps); give the URL without it and the password in"
        " ORCHESTRATOR_BROKER_PASSWORD_FILE (or --broker-password-file) or"
        " ORCHESTRATOR_BROKER_PASSWORD%s",
        " (moved out of it now: this process runs again without it on its command line)"
        if argv is not None
        else "",
    )
    if argv is None:
        return url
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, MOVED_PASSWORD: unquote(password)})
    raise AssertionError("unreachable: execve returns only by raising")


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (the URL given to ``--broker``, as it was)."""
    try:
        parts = urlsplit(url)
        if parts.password is not None or not parts.netloc:
            return url
    except ValueError:
        return url
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user or 'guest'}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def restore_password(url: str) -> str:
    """``url`` as ``--broker`` was given it: with the password ``out_of_ps`` moved out."""
    moved = os.environ.pop(MOVED_PASSWORD, None)  # children must not inherit it
    return _with_password(url, moved) if moved else url


def _argv_without(url: str) -> list[str] | None:
    """This process's command line with ``url``'s password left out (None: it is not on it)."""
    parts = urlsplit(url)
    user_and_host = f"{parts.netloc.rpartition('@')[0].partition(':')[0]}@"
    bare = urlunsplit(parts._replace(netloc=user_and_host + parts.netloc.rpartition("@")[2]))
    argv = [arg.replace(url, bare) for arg in sys.orig_argv]
    if argv == list(sys.orig_argv) or not argv:
        return None
    return argv
