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
