"""The parameters of a submit, written once.

``TaskOrchestrator.submit_task``, ``Client.submit`` and ``SyncClient.submit``
take the same parameters: the seed's ``submit_task`` ones, then
``max_retries`` and ``idempotency_key``. Written out three times they drifted
(whole seconds in one, any seconds in the others), and a new parameter had to
be added in three places. So they are written once, as the fields of
``SubmitArguments``, and each of the three takes them through
``@takes_submit_arguments``: a ``ParamSpec`` carries the fields to type
checkers and editors (their completion shows every parameter, none hidden
behind ``**kwargs``), ``__signature__`` carries them to ``inspect`` and
``help``. A call binds exactly as it would to the written-out signature (the
same positions, defaults and ``TypeError`` for an unknown name), then the
method gets one ``SubmitArguments``.

A new parameter is a field here and one of the wire's ``SubmitTaskRequest``
(the service passes the request's fields to ``submit_task``); the tests keep
the two in step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .models import TaskPriority

__all__ = ["SubmitArguments", "takes_submit_arguments", "takes_submit_arguments_and_extra"]

P = ParamSpec("P")
S = TypeVar("S")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class SubmitArguments:
    """One submit's arguments as the caller gave them (checked by whoever runs it).

    ``estimated_duration`` and ``timeout`` are seconds (the seed's examples use
    whole ones; fractions are accepted).
    """

    name: str
    description: str
    task_type: str
    payload: dict[str, Any]
    priority: TaskPriority | str = TaskPriority.MEDIUM
    dependencies: list[str] | None = None
    required_capabilities: list[str] | None = None
    estimated_duration: float = 300
    timeout: float = 600
    max_retries: int = 3
    idempotency_key: str | None = None

    def fields(self) -> dict[str, Any]:
        """Every argument by name; a list left out (``None``) is an empty one.

        Anything else is passed on as given, for the checks to refuse what is
        not a list (a string is not split into letters).
        """
        values = self.__dict__.copy()  # every field, in order (a getattr each: thrice the cost)
        for name in ("dependencies", "required_capabilities"):
            values[name] = values[name] or []
        return values


def _parameters_of(
    template: Callable[P, Any], *, extra: bool
) -> Callable[[Callable[..., R]], Callable[Concatenate[S, P], R]]:
    """A decorator giving a method ``(self, arguments[, extra])`` the template's parameters."""
    parameters = list(inspect.signature(template).parameters.values())
    if extra:
        parameters.append(inspect.Parameter("extra", inspect.Parameter.VAR_KEYWORD, annotation=Any))
    binding = inspect.Signature(parameters)

    names = frozenset(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)

    def arguments_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The template's own __init__ binds as the written-out signature does, at
        # a tenth of the cost of Signature.bind (which is only asked to word the
        # TypeError of a call that does not bind).
        try:
            return template(*args, **kwargs)
        except TypeError:
            binding.bind(*args, **kwargs)
            raise

    def decorate(method: Callable[..., R]) -> Callable[Concatenate[S, P], R]:
        def call(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
            if not extra:
                return method(self, arguments_of(args, kwargs))
            more = {k: v for k, v in kwargs.items() if k not in names}
            if more:
                kwargs = {k: v for k, v in kwargs.items() if k in names}
            return method(self, arguments_of(args, kwargs), more)

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                return await call(self, args, kwargs)  # type: ignore[misc]
        else:

            @functools.wraps(method)
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                return call(self, args, kwargs)

        own = inspect.signature(method)
        first = next(iter(own.parameters.values()))
        wrapper.__signature__ = own.replace(parameters=[first, *parameters])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


takes_submit_arguments = _parameters_of(SubmitArguments, extra=False)
"""For ``def m(self, arguments: SubmitArguments)``: callers pass the fields."""

takes_submit_arguments_and_extra = _parameters_of(SubmitArguments, extra=True)
"""Also ``**extra`` (fields a newer wire protocol has): ``m(self, arguments, extra)``.

``inspect`` shows ``**extra``; type checkers show the fields only (a
``ParamSpec`` cannot grow a ``**kwargs``), so a typed caller passing a field
this version does not know is told so before the orchestrator would be."""
