"""taskiq in the peer benchmark: taskiq-aio-pika broker, taskiq-redis results.

The broker is built at import from the environment (BENCH_BROKER_URL,
BENCH_QUEUE, BENCH_REDIS_URL) so that the worker processes (``taskiq worker
tests.bench.peer_taskiq:broker --workers N``) and the client build the same
one. Its queues are classic ones, as this project's (taskiq-aio-pika declares
quorum queues unless told).

Durability: messages persistent, publisher confirms (aio-pika's channel
default), acks once the result is saved (taskiq's default ``when_saved``):
equal to this project's, the results living in Redis.

The client awaits each result by polling Redis (taskiq's ``wait_result``); it
submits concurrently and collects in order in the same event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue, QueueType
from taskiq_redis import RedisAsyncResultBackend

from tests.bench.peer_common import Options, Workers, delete_topology, wait_consumers

QUEUE = os.environ.get("BENCH_QUEUE", "peerbench.taskiq")
QOS = 50
IN_FLIGHT = 200
POLL = 0.002
"""Seconds between two looks at Redis for a result."""

broker = AioPikaBroker(
    os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    qos=QOS,
    exchange=Exchange(name=QUEUE),
    task_queues=[Queue(name=QUEUE, type=QueueType.CLASSIC)],
    dead_letter_queue=Queue(name=f"{QUEUE}.dead", type=QueueType.CLASSIC),
).with_result_backend(
    RedisAsyncResultBackend(
        os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"), result_ex_time=3600
    )
)


@broker.task(task_name="noop")
async def noop(i: int) -> float:
    return time.monotonic()


class TaskiqRunner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.workers = Workers()
        self.loop = asyncio.new_event_loop()
        self.started = False

    def setup(self) -> None:
        self.workers.spawn(
            ["-m", "taskiq", "worker", "tests.bench.peer_taskiq:broker", *self.pool()]
        )
        self.loop.run_until_complete(broker.startup())
        self.started = True
        wait_consumers(self.options.broker_url, QUEUE, self.options.workers, self.workers, 120)

    def pool(self) -> list[str]:
        return ["--workers", str(self.options.workers), "--log-level", "WARNING"]

    async def _one(self, i: int) -> tuple[float, float, float]:
        sent = time.monotonic()
        task = await noop.kiq(i)
        result = await task.wait_result(check_interval=POLL / 2, timeout=self.options.timeout)
        return sent, result.return_value, time.monotonic()

    async def _batch(self, n: int) -> list[tuple[float, float]]:
        handed: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def submit(i: int) -> None:
            async with gate:
                sent = time.monotonic()
                await handed.put((sent, await noop.kiq(i)))

        submitting = asyncio.gather(*(submit(i) for i in range(n)))
        out = []
        for _ in range(n):
            sent, task = await handed.get()
            await task.wait_result(check_interval=POLL, timeout=self.options.timeout)
            out.append((sent, time.monotonic()))
        await submitting
        return out

    def one(self, i: int) -> tuple[float, float, float]:
        return self.loop.run_until_complete(self._one(i))

    def batch(self, n: int) -> list[tuple[float, float]]:
        return self.loop.run_until_complete(self._batch(n))

    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def teardown(self) -> None:
        self.workers.stop()
        if self.started:
            self.loop.run_until_complete(broker.shutdown())
        self.loop.close()
        delete_topology(self.options.broker_url, [QUEUE, f"{QUEUE}.dead"], [QUEUE])


def runner(options: Options, variant: str) -> tuple[Any, bool]:
    """The environment (``peer_common.bench_env``) was set before this module was imported."""
    return TaskiqRunner(options), True
