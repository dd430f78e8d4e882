"""The communication bus: wire messages, topology, and the RabbitMQ and in-process buses."""

from .bus import (
    CommunicationBus,
    DeadLetter,
    Subscription,
    TaskConsumer,
    TaskDelivery,
    default_broker_url,
)
from .errors import (
    BusConnectionError,
    BusError,
    BusNotStarted,
    InvalidMessage,
    MessageTooLarge,
    TopologyMismatch,
    UnroutableMessage,
)
from .memory import MemoryBus
from .messages import (
    SCHEMA_VERSION,
    AgentAnnounced,
    AgentHeartbeat,
    AgentLeft,
    CancelTask,
    ConsumeQueues,
    Control,
    Event,
    Reannounce,
    TaskFinished,
    TaskMessage,
    TaskProgress,
    TaskStarted,
    Unregister,
    parse_control,
    parse_event,
    parse_task,
)
from .rabbitmq import RabbitMQBus
from .settings import BusSettings, redact_url
from .topology import (
    AGENT_ID_PATTERN,
    ANY_CAPABILITY_KEY,
    CAPABILITY_PATTERN,
    MAX_PRIORITY,
    RETRY_TIERS_MS,
    Topology,
    capability_key,
    covers,
    retry_tier_ms,
)

__all__ = [
    # buses
    "CommunicationBus",
    "DeadLetter",
    "MemoryBus",
    "RabbitMQBus",
    "BusSettings",
    "Subscription",
    "TaskConsumer",
    "TaskDelivery",
    "default_broker_url",
    "redact_url",
    # errors
    "BusError",
    "BusConnectionError",
    "BusNotStarted",
    "InvalidMessage",
    "MessageTooLarge",
    "TopologyMismatch",
    "UnroutableMessage",
    # wire messages
    "SCHEMA_VERSION",
    "TaskMessage",
    "Event",
    "TaskStarted",
    "TaskProgress",
    "TaskFinished",
    "AgentAnnounced",
    "AgentHeartbeat",
    "AgentLeft",
    "Control",
    "ConsumeQueues",
    "CancelTask",
    "Unregister",
    "Reannounce",
    "parse_task",
    "parse_event",
    "parse_control",
    # topology
    "Topology",
    "capability_key",
    "covers",
    "ANY_CAPABILITY_KEY",
    "CAPABILITY_PATTERN",
    "AGENT_ID_PATTERN",
    "MAX_PRIORITY",
    "RETRY_TIERS_MS",
    "retry_tier_ms",
]
