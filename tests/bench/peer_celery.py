"""Celery in the peer benchmark: RabbitMQ broker, rpc result backend, acks_late.

The app is built from the environment (BENCH_BROKER_URL, BENCH_QUEUE) so that
the worker processes (``celery -A tests.bench.peer_celery worker``) and the
client build the same one. Two shapes: ``solo``, one solo-pool worker process
per ``--workers``; ``prefork``, one worker whose prefork pool has ``--workers``
processes. Remote control, gossip, mingle and worker heartbeats are off (no
pidbox or event traffic beside the tasks).

Durability as configured: task messages persistent (Celery's default), acks
after the task ran (acks_late), but no publisher confirms and the rpc
backend's results are transient messages: not equal to this project's.

The client submits every task, then collects the results in order: the rpc
backend's reply queue belongs to the submitting thread, so submit and collect
share one thread.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from tests.bench.peer_common import Options, Workers, delete_topology, wait_consumers

PREFETCH_MULTIPLIER = 50
"""As the project's 50 tasks at once per agent."""


def make_app(broker_url: str, queue: str) -> Celery:
    app = Celery("peerbench", broker=broker_url, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_serializer="json",
        result_serializer="json",
        worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="noop")
    def noop(i: int) -> float:
        return time.monotonic()

    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("BENCH_QUEUE", "peerbench.celery"),
)


class CeleryRunner:
    def __init__(self, options: Options, pool: str) -> None:
        self.options = options
        self.pool = pool
        self.queue = os.environ["BENCH_QUEUE"]
        self.app = make_app(options.broker_url, self.queue)
        self.noop = self.app.tasks["noop"]
        self.workers = Workers()

    def setup(self) -> None:
        env = None  # the BENCH_* variables are inherited
        common = ["-m", "celery", "-A", "tests.bench.peer_celery", "worker", "-Q", self.queue]
        common += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
        if self.pool == "solo":
            for k in range(self.options.workers):
                self.workers.spawn([*common, "-P", "solo", "-n", f"solo{k}@%h"], env)
            consumers = self.options.workers
        else:
            self.workers.spawn(
                [*common, "-P", "prefork", "-c", str(self.options.workers), "-n", "prefork@%h"], env
            )
            consumers = 1
        wait_consumers(self.options.broker_url, self.queue, consumers, self.workers, 120)

    def one(self, i: int) -> tuple[float, float, float]:
        sent = time.monotonic()
        started = self.noop.delay(i).get(timeout=self.options.timeout)
        return sent, started, time.monotonic()

    def batch(self, n: int) -> list[tuple[float, float]]:
        sent = []
        handles = []
        for i in range(n):
            sent.append(time.monotonic())
            handles.append(self.noop.delay(i))
        out = []
        for at, handle in zip(sent, handles, strict=True):
            handle.get(timeout=self.options.timeout)
            out.append((at, time.monotonic()))
        return out

    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def teardown(self) -> None:
        self.workers.stop()
        self.app.close()
        delete_topology(self.options.broker_url, [self.queue], [self.queue])


def runner(options: Options, variant: str) -> tuple[Any, bool]:
    return CeleryRunner(options, variant), False
