"""Run an agent defined in user code: ``python -m agents package.module:agent``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .agent import Agent


def load_agent(spec: str) -> Agent:
    """Import ``module:attribute``; the attribute is an ``Agent`` or a function making one."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"agent: expected 'module:object', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"agent: module {module_name!r} has no {attribute!r}") from None
    if not isinstance(obj, Agent) and callable(obj):
        obj = obj()
    if not isinstance(obj, Agent):
        raise ValueError(f"agent: {spec!r} is not an Agent")
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents", description=__doc__)
    parser.add_argument("agent", help="module:object naming an Agent")
    parser.add_argument("--broker", help="amqp:// URL (default: ORCHESTRATOR_BROKER_URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.path.insert(0, "")
    try:
        agent = load_agent(args.agent)
        agent.run(args.broker)
    except (ValueError, ImportError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
