"""What the two SQL stores share: the shape of their tables, and how a newer
schema is refused.

``SQLiteStore`` and ``PostgresStore`` keep the same three tables (a row a
task, a row an agent, a row a meta value) and write a flush's ``Batch`` the
same way: upsert the changed rows, delete the gone ones, table by table.
Only the dialect differs (``executemany`` with ``?`` rows; one statement
over ``unnest`` of arrays), so each store keeps its own statements' form
and reads the tables, their keys and columns, and the batch's rows for
each, from here: a column added to a table is added once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .journal import Batch


@dataclass(frozen=True)
class Table:
    """A table of records: its key column, then the columns the key's row holds."""

    name: str
    key: str
    columns: tuple[str, ...]

    @property
    def all_columns(self) -> tuple[str, ...]:
        return (self.key, *self.columns)

    def upsert(self, rows: str) -> str:
        """``INSERT`` of ``rows`` (a ``VALUES`` or ``SELECT`` clause), replacing a row of a key.

        For example ``INSERT INTO agents (agent_id, record) VALUES (?, ?) ON
        CONFLICT (agent_id) DO UPDATE SET record = excluded.record``.
        """
        updates = ", ".join(f"{column} = excluded.{column}" for column in self.columns)
        return (
            f"INSERT INTO {self.name} ({', '.join(self.all_columns)}) {rows}"
            f" ON CONFLICT ({self.key}) DO UPDATE SET {updates}"
        )


TASKS = Table("tasks", "task_id", ("status", "record"))
AGENTS = Table("agents", "agent_id", ("record",))
META = Table("meta", "key", ("value",))


def changes(batch: Batch) -> list[tuple[Table, Sequence[tuple[str, ...]], Sequence[str]]]:
    """(table, rows to upsert, keys to delete) of each table, in the order they are written."""
    return [
        (TASKS, batch.task_rows, batch.task_gone),
        (AGENTS, batch.agent_rows, batch.agent_gone),
        (META, batch.meta_rows, ()),  # a meta value is replaced, never deleted
    ]


def newer_schema(where: str, version: int, supported: int) -> RuntimeError:
    """The error that refuses a database a newer orchestrator has written."""
    return RuntimeError(
        f"{where} holds state of schema version {version}; "
        f"this orchestrator reads up to version {supported}: upgrade it"
    )
