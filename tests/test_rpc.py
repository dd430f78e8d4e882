"""The request protocol for other services, on both buses.

First the bus's part (``serve_requests`` / ``request``: replies matched by
correlation id, errors as replies, expiry, no server), then the
orchestrator's (``OrchestratorService``: requests mapped to the API). In
memory every party shares one bus; on RabbitMQ each has its own connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import aio_pika
import pytest

from broker import (
    AgentsRequest,
    CancelTaskRequest,
    CommunicationBus,
    InvalidMessage,
    NoReply,
    QueuesRequest,
    RabbitMQBus,
    Reply,
    Request,
    StatsRequest,
    SubmitTaskRequest,
    TaskMessage,
    TaskStarted,
    TaskStatusRequest,
    TopologyMissing,
    parse_reply,
)
from broker.messages import parse_result
from broker.rpc import TasksRequest
from orchestrator import OrchestratorService
from tests.harness import Harness, wait_until

WAIT = 5.0

RABBITMQ_ONLY = pytest.mark.parametrize(
    "bus_kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True
)
"""For tests about the AMQP wire itself."""


async def echo_server(request: Request) -> Reply:
    """A handler that answers with what it was asked."""
    return Reply.success({"kind": request.kind, "task_id": getattr(request, "task_id", None)})


# --- the bus: serve_requests and request ----------------------------------------------


async def test_each_request_gets_its_own_reply(harness: Harness) -> None:
    # Given a server, and a client on its own connection
    server = await harness.connected_bus()
    await server.serve_requests(echo_server)
    client = await harness.connected_bus()

    # When the client sends twenty requests at once
    ids = [f"t-{n}" for n in range(20)]
    replies = await asyncio.gather(
        *(client.request(TaskStatusRequest(task_id=i), timeout=WAIT) for i in ids)
    )

    # Then each reply is the answer to its own request
    assert [r.result["task_id"] for r in replies] == ids
    assert all(r.ok and r.result["kind"] == "request.status" for r in replies)


async def test_without_a_server_a_request_raises_no_reply_naming_the_queue(
    harness: Harness,
) -> None:
    # Given a client and no server for its prefix
    client = await harness.connected_bus()

    # When it sends a request, then it hears NoReply, a TimeoutError, naming the queue
    with pytest.raises(NoReply, match=rf"'{client.topology.rpc_queue}'") as raised:
        await client.request(StatsRequest(), timeout=0.3)
    assert isinstance(raised.value, TimeoutError)


async def test_a_request_nobody_took_in_time_is_dropped(harness: Harness) -> None:
    # Given a request queue whose server has stopped
    server = await harness.connected_bus()
    seen: list[Request] = []

    async def recording(request: Request) -> Reply:
        seen.append(request)
        return await echo_server(request)

    subscription = await server.serve_requests(recording)
    await subscription.close()
    client = await harness.connected_bus()

    # When a client gives up on a request while no server runs
    with pytest.raises(NoReply):
        await client.request(TaskStatusRequest(task_id="stale"), timeout=0.2)
    await asyncio.sleep(0.1)

    # Then a server that starts later never acts on it, and answers what comes next
    await server.serve_requests(recording)
    reply = await client.request(TaskStatusRequest(task_id="fresh"), timeout=WAIT)
    assert reply.result["task_id"] == "fresh"
    assert [r.task_id for r in seen] == ["fresh"]  # type: ignore[union-attr]


async def test_a_message_that_is_not_a_request_gets_an_error_reply(harness: Harness) -> None:
    # Given a server
    server = await harness.connected_bus()
    await server.serve_requests(echo_server)
    client = await harness.connected_bus()

    # When a client sends an event where a request belongs
    reply = await client.request(TaskStarted(task_id="t", attempt=1, agent_id="a"), timeout=WAIT)

    # Then it is told why, naming the field, and the server goes on serving
    assert not reply.ok
    assert reply.error is not None
    assert reply.error.type == "invalid_request"
    assert reply.error.message.startswith("invalid request: kind: ")
    assert (await client.request(StatsRequest(), timeout=WAIT)).ok


async def test_a_failing_handler_gets_an_internal_error_reply(harness: Harness) -> None:
    # Given a server whose handler fails on status requests
    server = await harness.connected_bus()

    async def buggy(request: Request) -> Reply:
        if isinstance(request, TaskStatusRequest):
            raise RuntimeError("bug in the handler")
        return Reply.success("fine")

    await server.serve_requests(buggy)
    client = await harness.connected_bus()

    # When a client asks for a status
    reply = await client.request(TaskStatusRequest(task_id="t"), timeout=WAIT)

    # Then it gets an internal error, and the server still answers the next request
    assert reply.error is not None
    assert reply.error.type == "internal"
    assert "RuntimeError: bug in the handler" in reply.error.message
    assert (await client.request(StatsRequest(), timeout=WAIT)).result == "fine"


async def test_a_late_reply_is_not_taken_for_the_next_one(harness: Harness) -> None:
    # Given a server that is slow on its first request
    server = await harness.connected_bus()
    first = True

    async def slow_once(request: Request) -> Reply:
        nonlocal first
        if first:
            first = False
            await asyncio.sleep(0.5)
        return await echo_server(request)

    await server.serve_requests(slow_once)
    client = await harness.connected_bus()

    # When the client gives up on the first request, then sends another
    with pytest.raises(NoReply):
        await client.request(TaskStatusRequest(task_id="slow"), timeout=0.2)
    reply = await client.request(TaskStatusRequest(task_id="second"), timeout=WAIT)

    # Then the reply it gets is the second request's
    assert reply.result["task_id"] == "second"


async def test_queue_depth_counts_waiting_tasks(harness: Harness) -> None:
    # Given two tasks waiting in a queue nobody consumes
    bus = await harness.connected_bus()
    harness.queue_keys.add("depth_test")
    await bus.declare_task_queue("depth_test")
    for n in range(2):
        message = TaskMessage(
            task_id=f"t-{n}",
            attempt=1,
            name="t",
            task_type="t",
            payload={},
            priority="low",
            timeout=1.0,
            estimated_duration=1.0,
        )
        await bus.publish_task(message, queue_key="depth_test", priority=0)

    # Then its depth is 2, and a queue that does not exist has none
    assert await bus.queue_depth("depth_test") == 2
    assert await bus.queue_depth("no_such_queue") == 0


@RABBITMQ_ONLY
async def test_any_amqp_client_gets_replies_and_garbage_is_answered(harness: Harness) -> None:
    # Given a server on RabbitMQ, and a plain AMQP client with its own reply queue
    server = await harness.connected_bus()
    await server.serve_requests(echo_server)
    assert harness.settings.broker_url
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)

        async def send(body: bytes, correlation_id: str, reply_to: str | None) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(body, reply_to=reply_to, correlation_id=correlation_id),
                routing_key=server.topology.rpc_queue,
            )

        # When it sends a request as JSON, and then a body that is not JSON
        await send(json.dumps({"kind": "request.stats"}).encode(), "c-1", replies.name)
        await send(b"not json", "c-2", replies.name)

        # Then each reply comes to its reply_to with its correlation id
        answers = {}
        async with asyncio.timeout(WAIT):
            while len(answers) < 2:
                message = await replies.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                answers[message.correlation_id] = parse_reply(message.body)
        assert answers["c-1"].ok
        assert answers["c-1"].result["kind"] == "request.stats"
        assert answers["c-2"].error is not None
        assert answers["c-2"].error.type == "invalid_request"

        # And garbage with nobody to tell goes to the dead letters with the reason
        await send(b"garbage", "c-3", None)
        dead = await channel.declare_queue(server.topology.dead_queue, passive=True)
        letter = None
        async with asyncio.timeout(WAIT):
            while letter is None:
                letter = await dead.get(no_ack=True, fail=False)
                await asyncio.sleep(0.02)
        assert letter.body == b"garbage"
        assert "invalid request" in str(letter.headers["x-reason"])


@RABBITMQ_ONLY
async def test_a_plain_amqp_client_gets_its_reply_by_direct_reply_to(harness: Harness) -> None:
    # Given an orchestrator serving requests, and a plain AMQP client with no queue of
    # its own: it consumes RabbitMQ's direct reply-to pseudo-queue (no-ack)
    service, _ = await serving(harness)
    assert harness.settings.broker_url
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        pseudo = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await pseudo.consume(replies.put, no_ack=True)

        async def ask(correlation_id: str, body: dict) -> aio_pika.abc.AbstractIncomingMessage:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    content_type="application/json",
                    reply_to="amq.rabbitmq.reply-to",
                    correlation_id=correlation_id,
                ),
                routing_key=service.orchestrator.bus.topology.rpc_queue,
            )
            async with asyncio.timeout(WAIT):
                return await replies.get()

        # When it publishes requests on that same channel, replying to the pseudo-queue
        submit = {"kind": "request.submit", "name": "t", "task_type": "t", "payload": {}}
        submitted = await ask("submit-1", submit)
        stats = await ask("stats-1", {"kind": "request.stats"})

    # Then each reply comes back on the channel, with its request's correlation id
    assert (submitted.correlation_id, stats.correlation_id) == ("submit-1", "stats-1")
    answers = {m.correlation_id: parse_reply(m.body) for m in (submitted, stats)}
    assert answers["submit-1"].ok, answers["submit-1"].error
    task_id = answers["submit-1"].result["task_id"]
    assert await service.orchestrator.get_task_status(task_id) is not None
    assert answers["stats-1"].result["tasks_created"] == 1


def test_a_reply_has_an_error_exactly_when_it_failed() -> None:
    with pytest.raises(ValueError):
        Reply(ok=True, error={"type": "internal", "message": "x"})
    with pytest.raises(ValueError):
        Reply(ok=False)
    with pytest.raises(InvalidMessage, match="error"):
        parse_reply(b'{"kind": "reply", "ok": false}')


# --- the orchestrator's service --------------------------------------------------------


async def serving(harness: Harness) -> tuple[OrchestratorService, CommunicationBus]:
    """An orchestrator serving the protocol, and a client on its own connection."""
    orchestrator = await harness.start_orchestrator()
    service = OrchestratorService(orchestrator)
    await service.start()
    return service, await harness.connected_bus()


def documented(kind: str, result: Any) -> Any:
    """``result`` of a ``kind`` request, checked against its result model: valid, and
    with no key the model does not document."""
    parsed = parse_result(kind, result)
    for model, raw in zip(
        parsed if isinstance(parsed, list) else [parsed],
        result if isinstance(result, list) else [result],
        strict=True,
    ):
        assert set(raw) == set(type(model).model_fields), (kind, set(raw))
    return result


async def test_replies_are_what_the_result_schemas_document(harness: Harness) -> None:
    # Given an orchestrator serving requests, an agent, and a completed and a cancelled task
    service, client = await serving(harness)
    await harness.start_agent("worker", ["analysis"], 2)
    harness.queue_keys.add("t.nobody_has_this")

    async def ask(request: Any) -> Any:
        reply = await client.request(request, timeout=WAIT)
        assert reply.ok, reply.error
        return documented(request.kind, json.loads(json.dumps(reply.result)))

    done = (await ask(SubmitTaskRequest(name="t", task_type="t", payload={"x": 1})))["task_id"]
    await service.orchestrator.wait_for_task(done, timeout=WAIT)
    waiting = await ask(
        SubmitTaskRequest(
            name="w", task_type="t", payload={}, required_capabilities=["nobody_has_this"]
        )
    )

    # When a client asks for everything the protocol offers, then every reply's result
    # is its documented model, with no undocumented key
    assert (await ask(TaskStatusRequest(task_id=done)))["status"] == "completed"
    assert (await ask(CancelTaskRequest(task_id=waiting["task_id"])))["cancelled"] is True
    assert (await ask(TaskStatusRequest(task_id=waiting["task_id"])))["status"] == "cancelled"
    listed = await ask(TasksRequest(limit=5))
    assert [t["task_id"] for t in listed] == [waiting["task_id"], done]
    assert (await ask(StatsRequest()))["tasks_created"] == 2
    assert [a["agent_id"] for a in await ask(AgentsRequest())] == ["worker"]
    queues = await ask(QueuesRequest())
    assert {(q["key"], q["task_type"]) for q in queues} == {
        ("t.@any", "t"),
        ("t.nobody_has_this", "t"),
    }

    # And a result that does not fit is refused, naming where
    with pytest.raises(InvalidMessage, match=r"request.cancel: cancelled: "):
        parse_result("request.cancel", {"task_id": "t", "cancelled": "perhaps", "status": "x"})


async def test_a_task_submitted_by_request_runs_and_reports(harness: Harness) -> None:
    # Given an orchestrator serving requests, and an agent
    service, client = await serving(harness)
    orchestrator = service.orchestrator
    await harness.start_agent("worker", ["analysis"], 2)

    # When a client submits a task by request and waits for it
    reply = await client.request(
        SubmitTaskRequest(
            name="BTC Analysis",
            task_type="analysis",
            payload={"symbol": "BTC"},
            priority="HIGH",
            required_capabilities=["analysis"],
        ),
        timeout=WAIT,
    )
    assert reply.ok, reply.error
    task_id = reply.result["task_id"]
    await orchestrator.wait_for_task(task_id, timeout=WAIT)

    # Then status and stats replies are exactly the API's answers
    status = await client.request(TaskStatusRequest(task_id=task_id), timeout=WAIT)
    assert status.result == await orchestrator.get_task_status(task_id)
    assert status.result["status"] == "completed"
    assert status.result["result"] == {"echo": {"symbol": "BTC"}, "agent": "worker"}
    stats = await client.request(StatsRequest(), timeout=WAIT)
    assert stats.result == json.loads(json.dumps(await orchestrator.get_stats()))

    # And agents and queues show who runs what
    agents = (await client.request(AgentsRequest(), timeout=WAIT)).result
    assert [(a["agent_id"], a["capabilities"], a["max_concurrent_tasks"]) for a in agents] == [
        ("worker", ["analysis"], 2)
    ]
    queues = (await client.request(QueuesRequest(), timeout=WAIT)).result
    assert {q["key"]: q["depth"] for q in queues} == {"analysis.analysis": 0}
    assert {q["queue"] for q in queues} == {client.topology.task_queue("analysis.analysis")}


async def test_bad_submit_is_refused_naming_the_field(harness: Harness) -> None:
    # Given an orchestrator serving requests
    service, client = await serving(harness)

    # When a client submits with an unknown priority, then a dependency nobody knows
    with pytest.raises(
        ValueError, match=r"must be one of low, medium, high, critical, got 'urgent'"
    ):
        SubmitTaskRequest(name="t", task_type="t", payload={}, priority="urgent")
    unchecked = SubmitTaskRequest.model_construct(  # as a client in another language may send
        **{
            **SubmitTaskRequest(name="t", task_type="t", payload={}).model_dump(),
            "priority": "urgent",
        }
    )
    bad_priority = await client.request(unchecked, timeout=WAIT)
    bad_dependency = await client.request(
        SubmitTaskRequest(name="t", task_type="t", payload={}, dependencies=["nope"]),
        timeout=WAIT,
    )

    # Then each is refused as an invalid request naming its field, and nothing was created
    assert bad_priority.error is not None
    assert bad_priority.error.type == "invalid_request"
    assert bad_priority.error.message == (
        "invalid request: priority: must be one of low, medium, high, critical, got 'urgent'"
    )
    assert bad_dependency.error is not None
    assert bad_dependency.error.message.startswith("dependencies: ")
    assert (await service.orchestrator.get_stats())["tasks_created"] == 0


async def test_unknown_task_ids_are_not_found(harness: Harness) -> None:
    # Given an orchestrator serving requests
    _, client = await serving(harness)
    unknown = f"task_{uuid.uuid4().hex}"

    # When a client asks for the status of, or cancels, a task nobody submitted
    for request in (TaskStatusRequest(task_id=unknown), CancelTaskRequest(task_id=unknown)):
        reply = await client.request(request, timeout=WAIT)

        # Then it is told the task is not found, naming the id
        assert reply.error is not None
        assert reply.error.type == "not_found"
        assert reply.error.message == f"task_id: unknown task {unknown!r}"


async def test_cancel_by_request_cancels_once(harness: Harness) -> None:
    # Given a task no agent can run yet
    service, client = await serving(harness)
    submitted = await client.request(
        SubmitTaskRequest(
            name="t", task_type="t", payload={}, required_capabilities=["nobody_has_this"]
        ),
        timeout=WAIT,
    )
    task_id = submitted.result["task_id"]
    harness.queue_keys.add("t.nobody_has_this")

    # When a client cancels it twice
    first = await client.request(CancelTaskRequest(task_id=task_id), timeout=WAIT)
    second = await client.request(CancelTaskRequest(task_id=task_id), timeout=WAIT)

    # Then the first cancels it and the second says it had already ended
    assert first.result == {"task_id": task_id, "cancelled": True, "status": "cancelled"}
    assert second.result == {"task_id": task_id, "cancelled": False, "status": "cancelled"}

    async def cancelled() -> bool:
        status = await service.orchestrator.get_task_status(task_id)
        return status is not None and status["status"] == "cancelled"

    await wait_until(cancelled, WAIT)


async def test_requests_of_a_stopped_service_wait_for_the_next_one(harness: Harness) -> None:
    # Given a service that stopped, and a client that waits long enough
    service, client = await serving(harness)
    await service.stop()
    pending = asyncio.ensure_future(client.request(StatsRequest(), timeout=WAIT))
    await asyncio.sleep(0.2)
    assert not pending.done()

    # When the service starts again, then the waiting request is answered
    await service.start()
    reply = await asyncio.wait_for(pending, WAIT)
    assert reply.ok
    assert reply.result["tasks_created"] == 0


@RABBITMQ_ONLY
async def test_a_client_that_declares_nothing_leaves_nothing_behind(harness: Harness) -> None:
    # Given a RabbitMQ client for requests only, on a prefix nobody serves
    client = RabbitMQBus(settings=harness.settings, declare_topology=False)
    harness.buses.append(client)
    await client.connect()

    # When it asks, then it hears at once that nobody serves the prefix
    with pytest.raises(NoReply, match="no orchestrator has served"):
        await client.request(StatsRequest(), timeout=WAIT)

    # And the broker has no queue of that prefix
    assert harness.settings.broker_url
    connection = await aio_pika.connect(harness.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(client.topology.orchestrator_events_queue, passive=True)


@RABBITMQ_ONLY
async def test_watching_events_of_a_prefix_nobody_served_is_a_bus_error(harness: Harness) -> None:
    # Given a client that declares nothing, on a prefix nobody has served
    client = RabbitMQBus(settings=harness.settings, declare_topology=False)
    harness.buses.append(client)
    await client.connect()

    # When it subscribes to the events, then the bus says which exchange is missing
    # (a BusError of its own: callers need not know the AMQP library's errors)
    exchange = client.topology.events_exchange
    with pytest.raises(TopologyMissing, match=re.escape(f"no exchange '{exchange}'")):
        await client.subscribe_events(_ignore, patterns=["task.#"])

    # And the connection is still of use
    with pytest.raises(NoReply, match="no orchestrator has served"):
        await client.request(StatsRequest(), timeout=WAIT)


async def _ignore(event: object) -> None:
    pass
