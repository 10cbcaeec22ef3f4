"""Query an annotation output (a folder of Parquet files, local or on S3) with DuckDB.

The output is opened as a `pyarrow.dataset` through media.storage (so S3 endpoints and credentials resolve
as they do for the job; DuckDB's own S3 support would need an extension download) and registered in DuckDB:

- `annotations`: the rows as pipeline/write.py writes them (`pipeline.schema.OUTPUT_SCHEMA`), one per (item, task);
- `items`: one row per item (`id`, `source`), one column per task holding its annotation, named after the
  task's `output_column` when the output records one, else after the task:
  `SELECT id, caption, classify_shape FROM items`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow.dataset as ds

from media.storage import arrow_filesystem, filesystem, is_local
from pipeline.schema import ANNOTATION_COLUMN, ERROR_COLUMN, ID_COLUMN, OUTPUT_COLUMN_COLUMN, SOURCE_COLUMN, TASK_COLUMN

ANNOTATIONS_VIEW = "annotations"
ITEMS_VIEW = "items"
ITEM_COLUMNS = (ID_COLUMN, SOURCE_COLUMN)  # one row per item in the `items` view


@dataclass(frozen=True)
class TaskCounts:
    task: str
    rows: int
    errors: int


@dataclass(frozen=True)
class OutputSummary:
    """What `flamingo-annotate query OUTPUT` prints without SQL."""

    output: str
    rows: int
    error_rows: int
    tasks: tuple[TaskCounts, ...]
    samples: tuple[dict[str, Any], ...]  # a few ok rows: item id, task, annotation

    def format(self) -> str:
        lines = [f"{self.output}: {self.rows} rows, {self.error_rows} with errors"]
        lines += [f"  {t.task:<24} {t.rows:>8} rows {t.errors:>6} errors" for t in self.tasks]
        if self.samples:
            lines.append("Sample annotations:")
            lines += ["  " + " | ".join(_printable(str(value)) for value in row.values()) for row in self.samples]
        return "\n".join(lines)


def _printable(text: str) -> str:
    """Control characters escaped: model output may contain any byte, terminal escape sequences included."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def open_output(output: str, storage_options: Mapping[str, Any] | None = None) -> ds.Dataset:
    """The output's Parquet files as one dataset (hive-style `key=value` folders become columns)."""
    fs, path = filesystem(output, storage_options)
    # Local paths go to pyarrow's own, faster filesystem; anything else through fsspec.
    return ds.dataset(path, filesystem=None if is_local(fs) else arrow_filesystem(fs), format="parquet",
                      partitioning="hive")


def connect(output: str, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the `annotations` (and, when possible, `items`) views."""
    dataset = open_output(output, storage_options)
    con = duckdb.connect()
    con.register(ANNOTATIONS_VIEW, dataset)
    columns = set(dataset.schema.names)
    if {*ITEM_COLUMNS, TASK_COLUMN, ANNOTATION_COLUMN} <= columns:
        # outputs written before `output_column` existed name the task columns after the task
        _create_items_view(con, OUTPUT_COLUMN_COLUMN if OUTPUT_COLUMN_COLUMN in columns else TASK_COLUMN)
    return con


def summarize(con: duckdb.DuckDBPyConnection, output: str, samples: int = 5) -> OutputSummary:
    """Row and error counts, per task, and a few ok rows."""
    columns = con.table(ANNOTATIONS_VIEW).columns
    missing = [c for c in (TASK_COLUMN, ERROR_COLUMN) if c not in columns]
    if missing:
        raise ValueError(f"{output}: no {', '.join(map(repr, missing))} column; columns: {', '.join(columns)}")
    task, error = _ident(TASK_COLUMN), _ident(ERROR_COLUMN)
    per_task = con.sql(f"SELECT {task}, count(*), count({error}) FROM {ANNOTATIONS_VIEW} "
                       f"GROUP BY {task} ORDER BY {task}").fetchall()
    shown = [_ident(c) for c in (ID_COLUMN, TASK_COLUMN, ANNOTATION_COLUMN) if c in columns]
    sample_rows = con.sql(f"SELECT {', '.join(shown)} FROM {ANNOTATIONS_VIEW} WHERE {error} IS NULL "
                          f"ORDER BY ALL LIMIT {int(samples)}").to_dicts()
    tasks = tuple(TaskCounts(str(name), rows, errors) for name, rows, errors in per_task)
    return OutputSummary(output=output, rows=sum(t.rows for t in tasks), error_rows=sum(t.errors for t in tasks),
                         tasks=tasks, samples=tuple(sample_rows))


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int = 40) -> str:
    """The result of one SQL statement drawn as a table (empty for statements without a result)."""
    relation = con.sql(sql)
    return "" if relation is None else relation.preview(limit=max_rows)


def _create_items_view(con: duckdb.DuckDBPyConnection, name_column: str) -> None:
    # DuckDB only allows PIVOT in a view when the pivot values are spelled out, so list them first.
    names = [row[0] for row in con.sql(f"SELECT DISTINCT {_ident(name_column)} FROM {ANNOTATIONS_VIEW} "
                                       f"WHERE {_ident(name_column)} IS NOT NULL ORDER BY 1").fetchall()]
    if not names:
        return
    keys = ", ".join(map(_ident, ITEM_COLUMNS))
    values = ", ".join(_literal(str(name)) for name in names)
    con.sql(f"CREATE VIEW {ITEMS_VIEW} AS PIVOT (SELECT {keys}, {_ident(name_column)}, {_ident(ANNOTATION_COLUMN)} "
            f"FROM {ANNOTATIONS_VIEW}) ON {_ident(name_column)} IN ({values}) "
            f"USING any_value({_ident(ANNOTATION_COLUMN)}) GROUP BY {keys}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
