"""The agent runtime: write a worker in a few lines, run it with one call."""

from .agent import ANY_TASK_TYPE, Agent, AgentCounters
from .context import TaskContext, TaskInterrupted
from .runner import load_agent

__all__ = [
    "ANY_TASK_TYPE",
    "Agent",
    "AgentCounters",
    "TaskContext",
    "TaskInterrupted",
    "load_agent",
]
