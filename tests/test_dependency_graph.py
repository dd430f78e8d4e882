"""The dependency graph on its own: what finishing a task releases or dooms."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator import DependencyGraph


def test_a_dependent_is_released_once_all_its_dependencies_completed() -> None:
    graph = DependencyGraph()
    graph.wait("c", ["a", "b"])
    assert graph.is_waiting("c")
    assert graph.completed("a") == []
    assert graph.completed("a") == []  # the same completion again releases nothing
    assert graph.completed("b") == ["c"]
    assert not graph.is_waiting("c")
    assert graph.completed("b") == []


def test_a_failed_dependency_dooms_its_dependents_transitively_naming_the_cause() -> None:
    graph = DependencyGraph()
    graph.wait("b", ["a"])
    graph.wait("c", ["b"])
    graph.wait("d", ["b", "x"])
    graph.wait("other", ["x"])
    doomed = graph.doomed("a")
    assert sorted(doomed) == [("b", "a"), ("c", "b"), ("d", "b")]
    assert graph.is_waiting("other")
    # d no longer waits: x completing releases only the task still waiting for it
    assert graph.completed("x") == ["other"]


def test_a_forgotten_task_waits_no_more_but_its_dependents_stay() -> None:
    graph = DependencyGraph()
    graph.wait("b", ["a"])
    graph.wait("c", ["b"])
    graph.forget("b")  # cancelled
    assert not graph.is_waiting("b")
    assert graph.completed("a") == []
    assert graph.doomed("b") == [("c", "b")]


@given(
    st.lists(st.tuples(st.integers(0, 9), st.sets(st.integers(0, 9), max_size=3)), max_size=10),
    st.permutations(range(10)),
)
def test_every_waiting_task_is_released_exactly_once_when_all_complete(edges, order) -> None:
    graph = DependencyGraph()
    waiting = {}
    for task, deps in edges:
        deps = {d for d in deps if d != task}
        if deps and task not in waiting:
            graph.wait(str(task), [str(d) for d in deps])
            waiting[task] = deps
    released: list[str] = []
    done: set[int] = set()
    for task in order:
        done.add(task)
        for ready in graph.completed(str(task)):
            released.append(ready)
            assert waiting[int(ready)] <= done, "released before all its dependencies completed"
    assert sorted(released) == sorted(str(t) for t in waiting)
