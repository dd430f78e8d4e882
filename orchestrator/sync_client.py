"""``SyncClient``: the ``Client`` for code that is not async.

A web view, a script or a notebook cell calls ``SyncClient`` methods and gets
answers; behind them one private event loop runs in a thread of its own, and
each call is a coroutine handed to it. So the client's connection, its events
queue and the handles' waits are exactly ``Client``'s, and a caller that
already runs an event loop (Jupyter) is not disturbed.

    with SyncClient("amqp://guest:guest@localhost/") as client:
        handle = client.submit("report", "", "report", {"day": "monday"})
        print(handle.result(timeout=60)["status"])
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from .client import Client
from .models import TaskStatus
from .submit_arguments import SubmitArguments, takes_submit_arguments_and_extra

__all__ = ["SyncClient", "SyncTaskHandle"]

T = TypeVar("T")


class SyncTaskHandle:
    """A submitted task, for code that is not async (see ``TaskHandle``)."""

    def __init__(self, client: SyncClient, task_id: str) -> None:
        self.client = client
        self.task_id = task_id

    def status(self) -> dict[str, Any]:
        return self.client.status(self.task_id)

    def cancel(self) -> bool:
        return self.client.cancel(self.task_id)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the task has ended: its status. ``TimeoutError`` after ``timeout``."""
        return self.client.wait(self.task_id, timeout)

    def __repr__(self) -> str:
        return f"SyncTaskHandle({self.task_id!r})"


class SyncClient:
    """``Client`` with blocking methods; the same arguments. Connects at once."""

    def __init__(self, broker_url: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="orchestrator-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._client: Client = self._call(Client.connect(broker_url, **options))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coroutine.close()
            raise ConnectionError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller: stop the call too
            if not future.done():
                future.cancel()
                try:
                    future.result()
                except (concurrent.futures.CancelledError, Exception):
                    pass
            raise

    @property
    def client(self) -> Client:
        """The async client underneath (its methods run only on the client's loop)."""
        return self._client

    @takes_submit_arguments_and_extra
    def submit(self, arguments: SubmitArguments, extra: dict[str, Any]) -> SyncTaskHandle:
        """Submit a task (the parameters of ``TaskOrchestrator.submit_task``); its handle."""
        handle = self._call(self._client.submit(**arguments.fields(), **extra))
        return SyncTaskHandle(self, handle.task_id)

    def handle(self, task_id: str) -> SyncTaskHandle:
        return SyncTaskHandle(self, task_id)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._call(self._client.status(task_id))

    def get_task_status(self, task_id: str) -> dict[str, Any] | None:
        return self._call(self._client.get_task_status(task_id))

    def cancel(self, task_id: str) -> bool:
        return self._call(self._client.cancel(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self._call(self._client.wait(task_id, timeout))

    def stats(self) -> dict[str, Any]:
        return self._call(self._client.stats())

    def agents(self) -> list[dict[str, Any]]:
        return self._call(self._client.agents())

    def tasks(
        self,
        status: str | TaskStatus | Iterable[str | TaskStatus] | None = None,
        task_type: str | None = None,
        agent_id: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        return self._call(self._client.tasks(status, task_type, agent_id, limit))

    def close(self) -> None:
        """Close the connection and end the client's thread. Idempotent."""
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
