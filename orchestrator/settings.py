"""Orchestrator settings, from arguments or ``ORCHESTRATOR_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    max_payload_bytes: int = Field(default=256 * 1024, gt=0)
    heartbeat_timeout: float = Field(
        default=15.0, gt=0, description="an agent silent this long is unregistered"
    )
    monitor_interval: float = Field(
        default=1.0, gt=0, description="how often agent heartbeats are checked"
    )
    retry_base_delay: float = Field(
        default=1.0, gt=0, description="first retry delay in seconds; doubles per retry"
    )
    retry_max_delay: float = Field(default=300.0, gt=0, description="longest retry delay")
    lost_retry_grace: float = Field(
        default=30.0,
        gt=0,
        description="a retry this long overdue, its queue empty, is published again",
    )
    finished_task_ttl: float | None = Field(
        default=None,
        gt=0,
        description="seconds a finished task is kept (while no dependent needs it);"
        " None keeps every task",
    )
    timeout_grace: float = Field(
        default=5.0,
        ge=0,
        description="a running task silent this long past its timeout is timed out here",
    )
    reclaim_lease: bool = Field(
        default=True,
        description="a leader whose lease's connection ends (a broker restart, a blip) takes"
        " it back and leads on if nobody led meanwhile; off, it steps down (serve: it then"
        " stands by again with a fresh orchestrator on a fresh connection)",
    )
    unseen_holder_grace: float = Field(
        default=3.0,
        ge=0,
        description="a redelivered copy of a queued attempt waits this long before it may"
        " run: an agent that took it and ended it quickly (telling no start) may have"
        " lost its final event with its link, and reports it on its new one",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        description="an attempt started this many times without a final event fails"
        " (its message keeps coming back: an agent dies on it, or cannot report it)",
    )
    submit_timeout: float = Field(
        default=5.0,
        gt=0,
        description="longest a submit waits for the broker to take its task; then it"
        " raises ConnectionError (or, with a durable store, keeps the task to publish later)",
    )
