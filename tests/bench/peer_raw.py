"""The floor: a raw aio-pika loop in two processes, as durable as this project.

publish -> consume -> reply -> collect, with nothing else: the client publishes
each task persistent to a durable classic queue and awaits the broker's
confirm; the worker (a process of its own, ``python -m tests.bench.peer_raw
worker URL QUEUE``) publishes the reply persistent to the client's durable
reply queue, awaits that confirm, and only then acknowledges the task; the
client acknowledges each reply. What any task system on AMQP must at least
spend for those guarantees is what this loop spends.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aio_pika

from broker import event_loop
from tests.bench.peer_common import Options, Workers, delete_topology, wait_consumers

PREFETCH = 100
IN_FLIGHT = 200
"""Publishes awaited together by the client (as the project's benchmark does)."""


async def worker(url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(queue_name, durable=True, arguments=_CLASSIC)

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        started = time.monotonic()
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"started": started}).encode(),
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    await queue.consume(handle)
    await asyncio.Future()


_CLASSIC = {"x-queue-type": "classic"}


class RawRunner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.queue = f"{options.prefix}.raw.tasks"
        self.replies = f"{options.prefix}.raw.replies"
        self.workers = Workers()
        self.loop = event_loop.new_event_loop()  # uvloop where installed, as the project
        self.waiting: dict[str, asyncio.Future[tuple[float, float]]] = {}
        self.counter = 0
        self.connection: Any = None

    def setup(self) -> None:
        self.loop.run_until_complete(self._connect())
        self.workers.spawn(
            ["-m", "tests.bench.peer_raw", "worker", self.options.broker_url, self.queue]
        )
        wait_consumers(self.options.broker_url, self.queue, 1, self.workers, self.options.timeout)

    async def _connect(self) -> None:
        self.connection = await aio_pika.connect(self.options.broker_url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=PREFETCH * 2)
        await self.channel.declare_queue(self.queue, durable=True, arguments=_CLASSIC)
        replies = await self.channel.declare_queue(self.replies, durable=True, arguments=_CLASSIC)
        await replies.consume(self._reply)

    async def _reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen = time.monotonic()
        future = self.waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result((json.loads(message.body)["started"], seen))
        await message.ack()

    async def _submit(self) -> tuple[float, asyncio.Future[tuple[float, float]]]:
        self.counter += 1
        key = str(self.counter)
        future = self.loop.create_future()
        self.waiting[key] = future
        sent = time.monotonic()
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"i": self.counter}).encode(),
                correlation_id=key,
                reply_to=self.replies,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue,
        )
        return sent, future

    async def _one(self) -> tuple[float, float, float]:
        sent, future = await self._submit()
        started, seen = await asyncio.wait_for(future, self.options.timeout)
        return sent, started, seen

    async def _batch(self, n: int) -> list[tuple[float, float]]:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def task() -> tuple[float, float]:
            async with gate:
                sent, future = await self._submit()
            _, seen = await future
            return sent, seen

        async with asyncio.timeout(self.options.timeout):
            return list(await asyncio.gather(*(task() for _ in range(n))))

    def one(self, i: int) -> tuple[float, float, float]:
        return self.loop.run_until_complete(self._one())

    def batch(self, n: int) -> list[tuple[float, float]]:
        return self.loop.run_until_complete(self._batch(n))

    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def teardown(self) -> None:
        self.workers.stop()
        if self.connection is not None:
            self.loop.run_until_complete(self.connection.close())
        self.loop.close()
        delete_topology(self.options.broker_url, [self.queue, self.replies])


def runner(options: Options, variant: str) -> tuple[RawRunner, bool]:
    return RawRunner(options), False


def main(argv: list[str]) -> Any:
    if argv[:1] == ["worker"]:
        event_loop.run(worker(argv[1], argv[2]))
    else:
        raise SystemExit("usage: python -m tests.bench.peer_raw worker URL QUEUE")


if __name__ == "__main__":
    main(sys.argv[1:])
