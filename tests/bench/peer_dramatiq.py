"""Dramatiq in the peer benchmark: RabbitMQ broker, Redis results, with and
without publisher confirms.

The broker is built at import from the environment (BENCH_BROKER_URL,
BENCH_QUEUE, BENCH_REDIS_URL, BENCH_CONFIRMS) so that the worker processes
(``dramatiq tests.bench.peer_dramatiq --processes N``) and the client build
the same one. Dramatiq's default middleware, without Prometheus (it would
open an HTTP port in every worker), plus Results.

Durability: messages persistent, acks after the actor ran and its result is
stored; with ``confirms`` the client's publish waits for the broker's confirm
(equal to this project's then, the results living in Redis instead of a
journal); without, a publish is fire-and-forget.

The client submits from a thread of its own while the main thread collects
the results in order (Dramatiq's broker keeps a connection per thread).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import default_middleware
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from tests.bench.peer_common import Options, Workers, delete_topology, wait_consumers

QUEUE = os.environ.get("BENCH_QUEUE", "peerbench_dramatiq")
broker = RabbitmqBroker(
    url=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    confirm_delivery=os.environ.get("BENCH_CONFIRMS") == "1",
    middleware=[m() for m in default_middleware],
)
broker.add_middleware(
    Results(
        backend=RedisBackend(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    )
)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="noop", queue_name=QUEUE, store_results=True, max_retries=0)
def noop(i: int) -> float:
    return time.monotonic()


class DramatiqRunner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.workers = Workers()
        self.wait_ms = int(options.timeout * 1000)

    def setup(self) -> None:
        self.workers.spawn(
            ["-m", "dramatiq", "tests.bench.peer_dramatiq", "--queues", QUEUE, *self.pool()]
        )
        wait_consumers(self.options.broker_url, QUEUE, self.options.workers, self.workers, 120)

    def pool(self) -> list[str]:
        return ["--processes", str(self.options.workers), "--threads", "8"]

    def one(self, i: int) -> tuple[float, float, float]:
        sent = time.monotonic()
        started = noop.send(i).get_result(block=True, timeout=self.wait_ms)
        return sent, started, time.monotonic()

    def batch(self, n: int) -> list[tuple[float, float]]:
        handed: queue.Queue[tuple[float, Any]] = queue.Queue()

        def submit() -> None:
            for i in range(n):
                handed.put((time.monotonic(), noop.send(i)))

        thread = threading.Thread(target=submit, daemon=True)
        thread.start()
        out = []
        for _ in range(n):
            sent, message = handed.get(timeout=self.options.timeout)
            message.get_result(block=True, timeout=self.wait_ms)
            out.append((sent, time.monotonic()))
        thread.join()
        return out

    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def teardown(self) -> None:
        self.workers.stop()
        broker.close()
        delete_topology(self.options.broker_url, [QUEUE, f"{QUEUE}.DQ", f"{QUEUE}.XQ"])


def runner(options: Options, variant: str) -> tuple[Any, bool]:
    """The environment (``peer_common.bench_env``) was set before this module was imported."""
    return DramatiqRunner(options), True
