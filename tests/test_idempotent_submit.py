"""Idempotent submits: a repeated idempotency key gets the first task and creates nothing.

In Python (``submit_task(..., idempotency_key=...)``) and over the request
protocol (``idempotency_key``, by default the AMQP ``message_id``), on both
buses; across a restart on a SQLite store; and, as a fault test, an
``orchestrator serve`` SIGKILLed in the middle of 400 submits and restarted
on its store makes no second task of the requests it had answered but not
acknowledged.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from broker import MessageTooLarge, RabbitMQBus, StatsRequest, SubmitTaskRequest, parse_reply
from orchestrator import OrchestratorService, TaskOrchestrator
from orchestrator.postgres_store import PostgresStore
from orchestrator.sqlite_store import SQLiteStore
from tests.conftest import require_broker
from tests.deployment import Deployment
from tests.harness import FAST, Harness, wait_until

WAIT = 10.0
TASK: dict[str, Any] = {
    "name": "t",
    "description": "",
    "task_type": "idem",
    "payload": {"n": 1, "items": [1, 2]},
}


def count_publishes(orchestrator: TaskOrchestrator) -> list[str]:
    """The task ids the orchestrator publishes from now on (its bus still publishes)."""
    published: list[str] = []
    publish_task = orchestrator.bus.publish_task

    async def counting(message: Any, *args: Any, **kwargs: Any) -> Any:
        published.append(message.task_id)
        return await publish_task(message, *args, **kwargs)

    orchestrator.bus.publish_task = counting  # type: ignore[method-assign]
    return published


async def created(orchestrator: TaskOrchestrator) -> int:
    return (await orchestrator.get_stats())["tasks_created"]


# --- in Python ------------------------------------------------------------------------


async def test_a_repeated_key_returns_the_first_task_and_publishes_nothing(
    harness: Harness,
) -> None:
    # Given an orchestrator, and a task submitted with a key
    orchestrator = await harness.start_orchestrator()
    published = count_publishes(orchestrator)
    first = await orchestrator.submit_task(**TASK, idempotency_key="order-42")

    # When the same submit is made again, and again at once ten times over
    again = await orchestrator.submit_task(**TASK, idempotency_key="order-42")
    burst = await asyncio.gather(
        *(orchestrator.submit_task(**TASK, idempotency_key="order-43") for _ in range(10))
    )

    # Then each repeat got its first task's id, and only the first ones were created
    # and published
    assert again == first
    assert len(set(burst)) == 1 and burst[0] != first
    assert await created(orchestrator) == 2
    assert sorted(published) == sorted([first, burst[0]])
    # And without a key, each submit is a task of its own
    other = await orchestrator.submit_task(**TASK)
    assert other not in (first, burst[0])
    assert await created(orchestrator) == 3


async def test_a_key_reused_with_other_parameters_is_refused_naming_the_key(
    harness: Harness,
) -> None:
    # Given a task submitted with a key
    orchestrator = await harness.start_orchestrator()
    first = await orchestrator.submit_task(**TASK, idempotency_key="k-1")

    # When a submit with that key asks for another payload and priority
    with pytest.raises(ValueError) as refused:
        await orchestrator.submit_task(
            **{**TASK, "payload": {"n": 2}}, priority="high", idempotency_key="k-1"
        )

    # Then it is refused with an error that names the key, the first task and what differs,
    # and nothing was created
    message = str(refused.value)
    assert message.startswith("idempotency_key: 'k-1' was used for task " + first)
    assert "payload" in message and "priority" in message
    assert await created(orchestrator) == 1


@pytest.mark.parametrize(
    ("key", "why"),
    [("", "must not be empty"), ("x" * 256, "exceeds the limit of 255"), (7, "must be a string")],
)
async def test_a_bad_key_is_a_value_error_naming_the_field(
    harness: Harness, key: Any, why: str
) -> None:
    orchestrator = await harness.start_orchestrator()
    with pytest.raises(ValueError, match=f"^idempotency_key: .*{why}"):
        await orchestrator.submit_task(**TASK, idempotency_key=key)
    assert await created(orchestrator) == 0


async def test_a_key_whose_first_submit_was_refused_makes_a_task_on_its_next_submit(
    harness: Harness,
) -> None:
    # Given an orchestrator whose next publish is held, then refused (it reached no
    # queue: the submit is withdrawn and raises)
    orchestrator = await harness.start_orchestrator()
    publish_task = orchestrator.bus.publish_task
    held = asyncio.Event()
    release = asyncio.Event()
    refusals = [MessageTooLarge("refused for the test")]

    async def refusing_once(message: Any, *args: Any, **kwargs: Any) -> Any:
        if refusals:
            held.set()
            await release.wait()
            raise refusals.pop()
        return await publish_task(message, *args, **kwargs)

    orchestrator.bus.publish_task = refusing_once  # type: ignore[method-assign]

    # When a submit with a key is under way, and a repeat of it comes meanwhile
    first = asyncio.ensure_future(orchestrator.submit_task(**TASK, idempotency_key="retry-me"))
    await asyncio.wait_for(held.wait(), WAIT)
    repeat = asyncio.ensure_future(orchestrator.submit_task(**TASK, idempotency_key="retry-me"))
    await asyncio.sleep(0)
    assert not repeat.done()  # it waits for the first
    release.set()

    # Then the first raises, and the repeat makes the one task the key names
    with pytest.raises(MessageTooLarge):
        await first
    task_id = await asyncio.wait_for(repeat, WAIT)
    assert await orchestrator.get_task_status(task_id) is not None
    assert await created(orchestrator) == 1
    assert await orchestrator.submit_task(**TASK, idempotency_key="retry-me") == task_id


async def test_a_key_is_kept_as_long_as_its_task(harness: Harness) -> None:
    # Given an orchestrator that forgets finished tasks soon, and a task with a key
    orchestrator = await harness.start_orchestrator(
        FAST.model_copy(update={"finished_task_ttl": 0.2})
    )
    first = await orchestrator.submit_task(**TASK, idempotency_key="short-lived")
    assert await orchestrator.submit_task(**TASK, idempotency_key="short-lived") == first

    # When the task ends and is forgotten
    assert await orchestrator.cancel_task(first)

    async def forgotten() -> bool:
        return await orchestrator.get_task_status(first) is None

    await wait_until(forgotten, timeout=WAIT)

    # Then its key is free: a submit with it makes a new task
    second = await orchestrator.submit_task(**TASK, idempotency_key="short-lived")
    assert second != first
    assert await orchestrator.get_task_status(second) is not None


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_a_key_outlives_a_restart_on_a_durable_store(
    harness: Harness, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    # Given a task submitted with a key to an orchestrator on a durable store, which stops
    if store_kind == "sqlite":
        path = tmp_path / "state.sqlite"

        def open_store() -> Any:
            return SQLiteStore(path)
    else:
        url = request.getfixturevalue("postgres_url")

        def open_store() -> Any:
            return PostgresStore(url)

    bus = await harness.connected_bus()
    first_run = TaskOrchestrator(bus, settings=FAST, store=open_store())
    await first_run.start()
    first = await first_run.submit_task(**TASK, idempotency_key="survives")
    await first_run.stop()

    # When a new orchestrator starts on that store and the submit comes again
    second_run = TaskOrchestrator(bus, settings=FAST, store=open_store())
    harness.orchestrator = second_run
    await second_run.start()
    again = await second_run.submit_task(**TASK, idempotency_key="survives")

    # Then it gets the first task, and the store holds that one task only
    assert again == first
    assert await created(second_run) == 1


# --- over the request protocol ----------------------------------------------------------


async def serving(harness: Harness) -> tuple[OrchestratorService, Any]:
    orchestrator = await harness.start_orchestrator()
    service = OrchestratorService(orchestrator)
    await service.start()
    return service, await harness.connected_bus()


async def test_a_request_repeating_its_key_gets_the_first_task(harness: Harness) -> None:
    # Given an orchestrator serving requests, and a client
    service, client = await serving(harness)
    request = SubmitTaskRequest(**TASK, idempotency_key="req-1")

    # When the client sends one submit twice, then the key with another payload
    first = await client.request(request, timeout=WAIT)
    again = await client.request(request, timeout=WAIT)
    other = SubmitTaskRequest(**{**TASK, "payload": {"n": 9}}, idempotency_key="req-1")
    refused = await client.request(other, timeout=WAIT)

    # Then both get the one task; the third is an invalid request naming the key
    assert first.ok and again.ok, (first.error, again.error)
    assert again.result["task_id"] == first.result["task_id"]
    assert not refused.ok and refused.error is not None
    assert refused.error.type == "invalid_request"
    assert refused.error.message.startswith("idempotency_key: 'req-1' was used for task")
    assert await created(service.orchestrator) == 1


@pytest.mark.parametrize("bus_kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_the_message_id_is_the_default_key_of_a_plain_amqp_request(
    harness: Harness,
) -> None:
    # Given an orchestrator serving requests, and a plain AMQP client
    service, _ = await serving(harness)
    assert harness.settings.broker_url
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        pseudo = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await pseudo.consume(replies.put, no_ack=True)
        body = json.dumps({"kind": "request.submit", **TASK}).encode()

        async def submit(message_id: str | None, body: bytes = body) -> str:
            await channel.default_exchange.publish(
                aio_pika.Message(body, reply_to="amq.rabbitmq.reply-to", message_id=message_id),
                routing_key=service.orchestrator.bus.topology.rpc_queue,
            )
            async with asyncio.timeout(WAIT):
                reply = parse_reply((await replies.get()).body)
            assert reply.ok, reply.error
            return reply.result["task_id"]

        # When it sends one message twice (one message_id), then two messages of
        # their own ids, then two without any, then a key in the body over the id
        same = [await submit("m-1"), await submit("m-1")]
        distinct = [await submit("m-2"), await submit("m-3")]
        unnamed = [await submit(None), await submit(None)]
        keyed = json.dumps({"kind": "request.submit", **TASK, "idempotency_key": "m-1"})
        by_body = await submit("m-4", keyed.encode())

    # Then the message sent twice made one task; every other message one of its own,
    # except the one whose key in the body names the first
    assert same[0] == same[1]
    assert len({*distinct, *unnamed, same[0]}) == 5
    assert by_body == same[0]
    assert await created(service.orchestrator) == 5


@pytest.mark.parametrize("bus_kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_the_bus_client_gives_each_request_a_message_id(harness: Harness) -> None:
    # Given a plain consumer of the request queue, standing in for a server
    client = await harness.connected_bus()
    assert isinstance(client, RabbitMQBus)
    assert harness.settings.broker_url
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        await client.declare(client.topology.rpc())
        queue = await channel.get_queue(client.topology.rpc_queue, ensure=False)
        seen: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(seen.put, no_ack=True)

        # When the bus sends two requests (nobody answers)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await client.request(StatsRequest(), timeout=0.5)
        ids = [(await asyncio.wait_for(seen.get(), WAIT)).message_id for _ in range(2)]
        await queue.delete(if_unused=False, if_empty=False)

    # Then each had a message_id of its own: the key a redelivery of it is known by
    assert all(ids) and ids[0] != ids[1]


@pytest.mark.rabbitmq
async def test_the_command_line_submits_again_with_its_key_and_gets_the_first_task(
    prefix: str,
) -> None:
    # Given `orchestrator serve`
    deployment = Deployment(prefix, require_broker())
    try:
        await deployment.serve()

        # When a script submits with a key, again, and then with the key and another payload
        args = ("submit", "idem", "-p", '{"n": 1}', "--idempotency-key", "nightly-2026-12-02")
        first = await deployment.run(*args)
        again = await deployment.run(*args)
        other = await deployment.run(*args[:2], "-p", '{"n": 2}', *args[4:])
        stats = await deployment.rpc(StatsRequest())
    finally:
        await deployment.close()

    # Then the repeat printed the first task's id, the other was refused naming the key,
    # and one task was made
    assert first.code == 0 and again.code == 0, (first, again)
    assert again.out == first.out
    assert other.code == 1, other
    assert other.error.startswith("error: idempotency_key: 'nightly-2026-12-02' was used for")
    assert stats["tasks_created"] == 1


# --- a serve killed mid-way ---------------------------------------------------------------

REQUESTS = 400
IN_FLIGHT = 50
KILL_AFTER = 150


@pytest.mark.fault
@pytest.mark.hostile
@pytest.mark.rabbitmq
async def test_a_serve_killed_during_400_submits_makes_no_second_task(
    broker_url: str, prefix: str, tmp_path: Path
) -> None:
    # Given `orchestrator serve` on a SQLite store, and a plain AMQP client that keeps
    # 50 submit requests in flight, each with a message_id of its own
    deployment = Deployment(prefix, broker_url)
    deployment.env["ORCHESTRATOR_STORE"] = f"sqlite:{tmp_path / 'state.sqlite'}"
    connection = await aio_pika.connect(broker_url)
    try:
        await deployment.serve()
        channel = await connection.channel()
        pseudo = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        answers: dict[str, list[str]] = {}
        room = asyncio.Semaphore(IN_FLIGHT)
        enough = asyncio.Event()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            reply = parse_reply(message.body)
            assert reply.ok, reply.error
            seen = answers.setdefault(message.correlation_id or "", [])
            seen.append(reply.result["task_id"])
            if len(seen) == 1:
                room.release()
            if len(answers) >= KILL_AFTER:
                enough.set()

        await pseudo.consume(on_reply, no_ack=True)

        async def send_all() -> None:
            for n in range(REQUESTS):
                await room.acquire()
                body = json.dumps({"kind": "request.submit", **TASK, "payload": {"n": n}})
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body.encode(),
                        message_id=f"req-{n}",
                        correlation_id=f"req-{n}",
                        reply_to="amq.rabbitmq.reply-to",
                    ),
                    routing_key=f"{prefix}.rpc",
                )

        sender = asyncio.create_task(send_all())

        # When serve is SIGKILLed once 150 requests are answered, and started again on
        # its store
        await asyncio.wait_for(enough.wait(), 60)
        serve = deployment.processes["serve"][0]
        serve.kill()
        await serve.wait()
        answered_before = len(answers)
        await deployment.serve()
        await asyncio.wait_for(sender, 120)

        async def all_answered() -> bool:
            return len(answers) == REQUESTS

        await wait_until(all_answered, timeout=120, interval=0.1)
        stats = await deployment.rpc(StatsRequest())
    finally:
        await connection.close()
        await deployment.close()

    # Then every request got a task, a request answered twice (answered, not yet
    # acknowledged when serve died, delivered again) got its first task again, and
    # no more tasks were created than requests were sent
    replies = sum(len(ids) for ids in answers.values())
    twice = [key for key, ids in answers.items() if len(ids) > 1]
    distinct = {task_id for ids in answers.values() for task_id in ids}
    print(
        f"\nrequests sent {REQUESTS}, answered {len(answers)} ({answered_before} before the"
        f" kill), replies {replies}, requests answered twice {len(twice)},"
        f" tasks created {stats['tasks_created']}, distinct task ids {len(distinct)}"
    )
    assert all(len(set(answers[key])) == 1 for key in twice), twice
    assert len(distinct) == REQUESTS
    assert stats["tasks_created"] == REQUESTS
