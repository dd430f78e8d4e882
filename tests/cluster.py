"""A three-node RabbitMQ cluster of the test's own, on this machine.

Each node is a ``tests.brokers.LocalNode`` (its own node name, AMQP and
distribution ports, data folder; one Erlang cookie for the session's private
nodes, so they can cluster and cannot reach the shared broker). The first
node boots alone; the others boot with it as their ``classic_config`` peer
and join it on first boot, which costs no ``rabbitmqctl join_cluster`` round
(an Erlang VM start each).
"""

from __future__ import annotations

import contextlib
import re
from concurrent.futures import ThreadPoolExecutor

from .brokers import LocalNode


class LocalCluster:
    def __init__(self, size: int = 3, *, label: str = "cluster") -> None:
        self.nodes = [LocalNode(label=f"{label}{n}") for n in range(size)]
        seed = self.nodes[0].name
        for node in self.nodes[1:]:
            # Added before the first boot: the peer's name is known only now.
            with open(node.base / "rabbitmq.conf", "a") as conf:
                conf.write(
                    "cluster_formation.peer_discovery_backend = classic_config\n"
                    f"cluster_formation.classic_config.nodes.1 = {seed}\n"
                )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> LocalCluster:
        self.nodes[0].start()
        with ThreadPoolExecutor(len(self.nodes) - 1) as pool:
            list(pool.map(lambda node: node.start(), self.nodes[1:]))
        members = self.members()
        if sorted(members) != sorted(node.name for node in self.nodes):
            raise RuntimeError(f"the cluster did not form: running nodes {members}")
        return self

    def members(self) -> list[str]:
        """The running nodes, as the first live node sees them."""
        live = next(node for node in self.nodes if node.running)
        out = live.eval("rabbit_nodes:all_running().")
        return re.findall(r"'([^']+)'", out)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
