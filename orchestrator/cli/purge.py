"""``purge``: delete a prefix's queues and exchanges, after saying which and asking.

AMQP cannot list queues, so ``purge`` gathers the names a prefix can have:
the topology's own (``Topology.everything``: the fixed exchanges and queues,
the request queue, every retry tier) and the capability queues, which depend
on the tasks submitted. Those it learns from RabbitMQ's management API when
it answers (every queue named ``<p>.tasks.*``), from the orchestrator's
store (``--store``: the queue of every task it holds) and from ``--queue-key``.
Each name is looked up (a passive declare), so only what exists is listed
and deleted. While an orchestrator serves the prefix it refuses: that one
would declare its queues again at once and lose what it was doing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker import BusSettings, RabbitMQBus, Topology, route_key
from broker.settings import first_address

from .connection import connected, run
from .errors import CliError
from .output import err
from .settings import Broker, Prefix, read_settings

if TYPE_CHECKING:  # imported where used: only purge needs them, not the command line
    from broker.rabbitmq_purge import Found

MANAGEMENT_TIMEOUT = 3.0
"""Seconds to wait for the management API before doing without it."""


def purge(
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Delete without asking.", show_default=False)
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(
            metavar="sqlite:PATH",
            help="The orchestrator's store: its tasks name capability queues to delete too."
            " Env: ORCHESTRATOR_STORE.",
            show_default=False,
        ),
    ] = None,
    queue_key: Annotated[
        list[str] | None,
        typer.Option(
            "--queue-key",
            metavar="KEY",
            help="A capability queue's key (<task type>.<capabilities>) to delete too; repeat it.",
            show_default=False,
        ),
    ] = None,
    management_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="RabbitMQ's management API, to find every capability queue. Env:"
            " RABBITMQ_MANAGEMENT_URL; default: http://<broker host>:15672, if it answers.",
            show_default=False,
        ),
    ] = None,
    broker: Broker = None,
    prefix: Prefix = None,
) -> None:
    """Delete a prefix's queues (with their messages) and exchanges; asks first."""
    settings, cli_settings = read_settings(broker, prefix)
    spec = store if store is not None else cli_settings.store
    keys = set(queue_key or ())
    run(_purge(settings, spec, keys, management_url, yes))


async def _purge(
    settings: BusSettings, store: str, keys: set[str], management_url: str | None, yes: bool
) -> None:
    from broker.rabbitmq_purge import delete, find

    topology = Topology(settings.prefix)
    stored_keys, agent_ids = await _keys_in_store(store)
    keys |= stored_keys
    listed = await asyncio.to_thread(_listed_by_management, settings, management_url)
    if listed is not None:
        keys |= _after(listed, topology.task_queue(""))
        agent_ids |= _after(listed, topology.agent_events_queue(""))
    everything = topology.everything(keys, agent_ids)
    bus = RabbitMQBus(
        settings=settings, connection_name=f"{settings.prefix}:purge", declare_topology=False
    )
    async with connected(bus):
        live = await find(bus, [topology.rpc_queue, topology.leader_queue], [])
        if any(q.consumers for q in live.queues) or live.locked:
            held = live.locked[0] if live.locked else topology.rpc_queue
            raise CliError(
                f"an orchestrator serves prefix {settings.prefix!r} now (it holds"
                f" {held!r}): stop it first, or it declares its queues again"
            )
        queues = [q.name for q in (everything + topology.retired()).queues]
        found = await find(bus, queues, [e.name for e in everything.exchanges])
        if not found.queues and not found.exchanges:
            err.print(
                f"nothing of prefix {settings.prefix!r} on {bus.address}",
                markup=False,
                highlight=False,
            )
            return
        _show(found, settings.prefix, bus.address, listed is not None)
        if not yes and not _confirmed(found):
            raise CliError("purge: nothing deleted (not confirmed; --yes skips the question)")
        await delete(bus, found)
    print(f"deleted {len(found.queues)} queues and {len(found.exchanges)} exchanges")


def _show(found: Found, prefix: str, address: str, complete: bool) -> None:
    print(f"prefix {prefix!r} on {address}:")
    for queue in found.queues:
        held = f", {queue.consumers} consumers" if queue.consumers else ""
        print(f"  queue    {queue.name} ({queue.messages} messages{held})")
    for exchange in found.exchanges:
        print(f"  exchange {exchange}")
    for name in found.locked:
        print(f"  in use   {name} (exclusive to a live connection: kept)")
    if not complete:
        err.print(
            "note: the management API did not answer: capability queues are those of"
            " --store and --queue-key only",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _confirmed(found: Found) -> bool:
    question = f"delete {len(found.queues)} queues and {len(found.exchanges)} exchanges? [y/N] "
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):  # no answer at all (end of input)
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


async def _keys_in_store(spec: str) -> tuple[set[str], set[str]]:
    """The capability keys of the tasks in the orchestrator's store, and the ids
    of its agents, whose events queues it declared (none for memory)."""
    from .serve import open_store

    state = open_store(spec, "--store")
    if state is None:
        return set(), set()
    await state.open()
    try:
        keys = {route_key(t.task_type, t.required_capabilities) for t in await state.tasks()}
        return keys, {a.agent_id for a in await state.agents()}
    finally:
        await state.close()


def _after(names: set[str], start: str) -> set[str]:
    """What follows ``start`` in the names that begin with it."""
    return {name.removeprefix(start) for name in names if name.startswith(start)}


def _listed_by_management(settings: BusSettings, url: str | None) -> set[str] | None:
    """The names of the vhost's queues as the management API lists them (the
    capability and agents' events queues among them); None when it does not answer."""
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(first_address(settings.broker_url or ""))  # a cluster: its first
    base = url or os.environ.get("RABBITMQ_MANAGEMENT_URL")
    base = base or f"http://{parts.hostname or '127.0.0.1'}:15672"
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    request = urllib.request.Request(
        f"{base.rstrip('/')}/api/queues/{urllib.parse.quote(vhost, safe='')}?columns=name",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT) as response:
            queues: list[dict[str, Any]] = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return {str(q.get("name", "")) for q in queues if isinstance(q, dict)}
