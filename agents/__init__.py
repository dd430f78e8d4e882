"""The agent runtime: write a worker in a few lines, run it with one call."""

from .agent import Agent, AgentIdInUse
from .attempts import AgentCounters
from .context import TaskContext, TaskInterrupted
from .handlers import ANY_TASK_TYPE
from .runner import load_agent

__all__ = [
    # the worker
    "Agent",
    "AgentCounters",
    "AgentIdInUse",
    "ANY_TASK_TYPE",
    # what a handler sees
    "TaskContext",
    "TaskInterrupted",
    # running one from the command line
    "load_agent",
]
