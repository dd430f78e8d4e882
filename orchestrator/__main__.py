"""``python -m orchestrator demo [--broker URL]``: the seed's workflow, end to end."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the seed's trading workflow with example agents")
    demo.add_argument("--broker", help="amqp:// URL; default: the in-process bus")
    demo.add_argument("--workflows", type=int, default=3, help="how many workflows to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .demo import run_demo

    try:
        stats = asyncio.run(run_demo(args.broker, args.workflows))
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if stats["tasks_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
