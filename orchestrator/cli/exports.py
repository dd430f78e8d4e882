"""``topology`` and ``schemas``: the documents other systems take from this code.

RabbitMQ's definitions, the wire messages' JSON Schemas and the AsyncAPI
document are generated from the code, never written by hand, so that they
cannot drift from what the orchestrator and agents declare and send.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker import BusSettings, Topology

from .errors import CliError
from .output import err
from .settings import Prefix


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
) -> None:
    """Print the RabbitMQ definitions of the fixed topology (importable by RabbitMQ)."""
    settings = BusSettings(**({"prefix": prefix} if prefix is not None else {}))
    text = json.dumps(Topology(settings.prefix).definitions(vhost), indent=2) + "\n"
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
