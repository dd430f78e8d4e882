"""``topology`` and ``schemas``: the documents other systems take from this code.

RabbitMQ's definitions, each role's RabbitMQ permissions, the wire messages'
JSON Schemas and the AsyncAPI document are generated from the code, never
written by hand, so that they cannot drift from what the orchestrator and
agents declare and send.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from broker import BusSettings, Topology
from broker import permissions as role_permissions

from .errors import CliError
from .output import err
from .settings import Prefix


class PermissionsFormat(StrEnum):
    json = "json"
    rabbitmqctl = "rabbitmqctl"


def topology(
    prefix: Prefix = None,
    vhost: Annotated[
        str, typer.Option(metavar="VHOST", help="The virtual host of the definitions.")
    ] = "/",
    export: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Write the definitions to this file instead.", show_default=False
        ),
    ] = None,
    permissions: Annotated[
        PermissionsFormat | None,
        typer.Option(
            "--permissions",
            help="Instead of the definitions, each role's RabbitMQ permissions (orchestrator,"
            " agent, client, monitor): as JSON, or as the rabbitmqctl commands that grant them.",
            show_default=False,
        ),
    ] = None,
    agents: Annotated[
        list[str] | None,
        typer.Option(
            "--agent",
            metavar="AGENT_ID",
            help="With --permissions: the permissions of the user of this agent (named after"
            " its id); repeat for more. Without it, the agent role is a template. Without"
            " --permissions: the definitions include this agent's events queue (the"
            " orchestrator declares it when it registers the agent).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the RabbitMQ definitions of the fixed topology (importable by RabbitMQ),
    or with --permissions what each role's user may do on it. Under
    ORCHESTRATOR_QUORUM_QUEUES=true the orchestrator's own queues are quorum queues."""
    settings = BusSettings(**({"prefix": prefix} if prefix is not None else {}))
    shape = Topology(settings.prefix, quorum=settings.quorum_queues)
    try:
        if permissions is PermissionsFormat.json:
            exported = role_permissions.export(shape, vhost, agents or ())
            text = json.dumps(exported, indent=2) + "\n"
        elif permissions is PermissionsFormat.rabbitmqctl:
            text = role_permissions.shell_script(shape, vhost, agents or ())
        else:
            text = json.dumps(shape.definitions(vhost, agents or ()), indent=2) + "\n"
    except ValueError as exc:
        raise CliError(f"--agent: {exc}") from None
    if export is None:
        sys.stdout.write(text)
        return
    try:
        export.write_text(text)
    except OSError as exc:
        raise CliError(f"--export: cannot write {str(export)!r}: {exc.strerror or exc}") from None
    err.print(f"wrote {export}", markup=False, highlight=False)


def schemas(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Write schemas/*.json and asyncapi.json under DIR (the project's own are"
            " docs/). Default: print the AsyncAPI document, which holds every schema.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The JSON Schemas of every wire message and the AsyncAPI document."""
    from broker.schemas import asyncapi, render, write

    if out_dir is None:  # never into ./docs of whatever folder the user is in
        sys.stdout.write(render(asyncapi()))
        return
    try:
        written = write(out_dir)
    except OSError as exc:
        raise CliError(f"--out: cannot write to {str(out_dir)!r}: {exc.strerror or exc}") from None
    err.print(f"wrote {len(written)} files under {out_dir}", markup=False, highlight=False)
