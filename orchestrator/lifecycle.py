"""The task's state machine: which status may follow which, and one door for every move.

Status used to be written at several sites and decided across many methods,
each keeping its own indexes in step by hand. Here the legal moves are one
table, and ``Lifecycle.transition`` is the only code that changes
``Task.status``: it refuses a move the table does not hold, stamps the
fields that belong to the move (``attempt``, ``assigned_agent``,
``started_at``, ``completed_at``, ``error_message``, ``result``), and then
tells every observer (statistics, run deadlines, retention, agent load,
waiters, the dependency graph, the outbox). An observer never has to guess
what happened from a record: it is handed the ``Move``.

The seed's statuses, as this orchestrator uses them:

========== =========================================================
status     the task is ...
========== =========================================================
pending    held by no agent: waiting for its dependencies (attempt 0),
           queued in the broker, or waiting out a retry's back-off
assigned   held by an agent (``assigned_agent``) that has not started it
running    started by ``assigned_agent``
completed  final: the agent's result is kept
failed     final: out of retries, rejected, or a dependency ended
timeout    final: its last attempt ran out of time
cancelled  final: by request, or a dependency was cancelled
========== =========================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from .models import FINAL_STATUSES, Task, TaskStatus

P, A, R = TaskStatus.PENDING, TaskStatus.ASSIGNED, TaskStatus.RUNNING

TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    # published (its dependencies completed) or published again (a lost message);
    # an agent holds it or started it; ended: a dependency ended otherwise, it can
    # never be published, a cancel, a dead letter, or its final event came before
    # any other (events of different kinds may arrive out of order)
    P: frozenset({P, A, R} | FINAL_STATUSES),
    # handed back or retried, its agent lost (no agent holds it); another agent
    # holds it (a redelivery after the first was lost); started; ended
    A: frozenset({P, A, R} | FINAL_STATUSES),
    # the same, from a started attempt
    R: frozenset({P, A, R} | FINAL_STATUSES),
    **{final: frozenset() for final in FINAL_STATUSES},
}
"""For each status, the statuses a task may move to from it. Final is final."""


class IllegalTransition(RuntimeError):
    """Raised when code asks for a move the table does not hold: a bug, never input."""


class Move(NamedTuple):
    """One status change, as observers and the audit see it.

    Immutable; a named tuple rather than a frozen dataclass, whose ``__init__``
    sets each field through ``object.__setattr__`` (one is made per move)."""

    task_id: str
    old: TaskStatus
    new: TaskStatus
    old_attempt: int
    attempt: int
    old_agent: str | None
    agent: str | None
    at: float


class Observer(Protocol):
    def moved(self, task: Task, move: Move) -> None:
        """Called after ``task`` was stamped; must not move it again."""


_KEEP: Any = object()
_tuple_new = tuple.__new__


class Lifecycle:
    """The one place where a task's status changes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._hearing: dict[TaskStatus, list[Observer]] = {status: [] for status in TaskStatus}
        """Per status moved to, the observers that hear it, in the order added."""

    def observe(self, observer: Observer, *, to: Iterable[TaskStatus] | None = None) -> None:
        """Hear every move from now on (in the order observers were added); with
        ``to``, only the moves to those statuses (an observer of final moves
        alone is not called for the two or three other moves of each task)."""
        for status in TaskStatus if to is None else frozenset(to):
            self._hearing[status].append(observer)

    def transition(
        self,
        task: Task,
        to: TaskStatus,
        *,
        new_attempt: bool = False,
        agent: str | None = _KEEP,
        at: float | None = None,
        error: str | None = _KEEP,
        result: dict[str, Any] | None = None,
    ) -> Move:
        """Move ``task`` to ``to``, or raise ``IllegalTransition``.

        - to ``pending``: ``new_attempt`` publishes a new attempt (its number
          goes up, its progress restarts); without it the same attempt went
          back to its queue (an agent handed it back). No agent holds it.
        - to ``assigned``: ``agent`` holds it, not started.
        - to ``running``: ``agent`` started it ``at``.
        - to a final status: ended ``at`` (now if not given) with ``result``
          and ``error``; ``agent`` is who ended it, if it was an agent.
        """
        old = task.status
        if to not in TRANSITIONS[old]:
            raise IllegalTransition(f"task {task.task_id}: {old.value} -> {to.value}")
        now = self.clock() if at is None else at
        old_attempt, old_agent = task.attempt, task.assigned_agent
        if new_attempt and to is not P:
            raise IllegalTransition(f"task {task.task_id}: a new attempt is published pending")
        if to is P:
            if new_attempt:
                task.attempt += 1
                task.progress = 0.0
            elif old is P:
                raise IllegalTransition(f"task {task.task_id}: pending -> pending needs an attempt")
            task.assigned_agent = None
        elif to in (A, R):
            if agent is _KEEP or not agent:
                raise IllegalTransition(f"task {task.task_id}: {to.value} needs an agent")
            task.assigned_agent = agent
            if to is R:
                task.started_at = now
        elif to.is_final:
            if agent is not _KEEP and agent:
                task.assigned_agent = agent
            task.completed_at = now
            task.result = result
            if to is TaskStatus.COMPLETED:
                task.progress = 1.0
        if error is not _KEEP:
            task.error_message = error
        task.status = to
        # ``tuple.__new__`` as ``Move``'s own ``__new__`` calls it, one Python frame fewer.
        move = _tuple_new(
            Move,
            (task.task_id, old, to, old_attempt, task.attempt, old_agent, task.assigned_agent, now),
        )
        for observer in self._hearing[to]:
            observer.moved(task, move)
        return move


def legal(move: Move) -> bool:
    """Whether ``move`` is one the table holds, with the stamps it must carry."""
    if move.new not in TRANSITIONS[move.old]:
        return False
    if move.new in (A, R):
        return move.agent is not None and move.attempt == move.old_attempt
    if move.new is P:
        if move.old is P:
            return move.agent is None and move.attempt == move.old_attempt + 1
        return move.agent is None and move.attempt in (move.old_attempt, move.old_attempt + 1)
    return move.attempt == move.old_attempt


def waiting_for_dependencies(task: Task) -> bool:
    """Pending and never published: the orchestrator holds it until its dependencies complete."""
    return task.status is P and task.attempt == 0


def held(task: Task) -> bool:
    """Whether an agent holds the task (received it, started or not)."""
    return task.status in (A, R) and task.assigned_agent is not None
