"""Query an annotation output (a folder of Parquet files, local or on S3) with DuckDB.

The output is opened as a `pyarrow.dataset` through media.storage (so S3 endpoints and credentials resolve
as they do for the job; DuckDB's own S3 support would need an extension download) and registered in DuckDB:

- `annotations`: the rows as pipeline/write.py writes them (`pipeline.schema.OUTPUT_SCHEMA`), one per (item, task):
  when a (id, task) has several rows (a row an interrupted run could not remove yet), only the latest counts
  (by `run_id`, then `created_at`). Columns that older files lack (`run_id`, `error_kind`) read as null;
- `items`: one row per item (`id`, `source`, then the input metadata columns the runs kept, such as `key`,
  `url`), one column per task holding its annotation, named after the task's `output_column` when the output
  records one, else after the task: `SELECT id, url, caption, classify_shape FROM items`.

Files of runs that kept different input columns (pipeline/kept_columns.py) read together, by column name: a
column a file lacks reads as null, and the `items` view takes any non-null value an item has.

A file that cannot be read (damaged, not Parquet) is left out with a warning, so one bad file never hides the
rest. Only footers are checked when opening: a file whose footer is fine but whose data is damaged still fails
the query that reaches it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from media.storage import arrow_filesystem, filesystem, is_local
from pipeline.kept_columns import KEPT_COLUMNS_KEY, kept_columns
from pipeline.runs import format_record
from pipeline.schema import (
    ANNOTATION_COLUMN,
    CREATED_AT_COLUMN,
    ERROR_COLUMN,
    ERROR_KIND_COLUMN,
    ID_COLUMN,
    OUTPUT_COLUMN_COLUMN,
    OUTPUT_SCHEMA,
    RUN_ID_COLUMN,
    SOURCE_COLUMN,
    TASK_COLUMN,
    replaced_files,
)
from pipeline.write import output_files

log = logging.getLogger(__name__)

ANNOTATIONS_VIEW = "annotations"
ITEMS_VIEW = "items"
ITEM_COLUMNS = (ID_COLUMN, SOURCE_COLUMN)  # one row per item in the `items` view
_ROWS_VIEW = "_rows"                        # every row of every readable file, before keeping the latest


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
    runs: tuple[str, ...] = ()           # the last runs' records, one line each (pipeline.runs.format_record)
    run_count: int = 0                   # how many runs wrote a record

    def format(self) -> str:
        lines = [f"{self.output}: {self.rows} rows, {self.error_rows} with errors"]
        lines += [f"  {t.task:<24} {t.rows:>8} rows {t.errors:>6} errors" for t in self.tasks]
        if self.runs:
            older = self.run_count - len(self.runs)
            lines.append(f"Runs ({self.run_count}, newest last{f'; {older} older not shown' if older else ''}):")
            lines += [f"  {_printable(line)}" for line in self.runs]
        if self.samples:
            lines.append("Sample annotations:")
            lines += ["  " + " | ".join(_printable(str(value)) for value in row.values()) for row in self.samples]
        return "\n".join(lines)


def _printable(text: str) -> str:
    """Control characters escaped: model output may contain any byte, terminal escape sequences included."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def open_output(output: str, storage_options: Mapping[str, Any] | None = None) -> ds.Dataset:
    """The output's readable Parquet files as one dataset (hive-style `key=value` folders become columns);
    unreadable files are left out with a warning. Raises FileNotFoundError when there is no output."""
    fs, path = filesystem(output, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{output}: no such output")
    files = [path] if fs.isfile(path) else output_files(fs, path)
    arrow_fs = None if is_local(fs) else arrow_filesystem(fs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        schemas = list(pool.map(lambda file: _footer_schema(file, arrow_fs), files))
    # a file that a rewritten file replaces (a rewrite cut short, see pipeline/write.py) is left out
    replaced = {name for schema in schemas if schema is not None for name in replaced_files(schema)}
    readable = [(file, schema) for file, schema in zip(files, schemas)
                if schema is not None and file.rsplit("/", 1)[-1] not in replaced]
    # An output with no rows yet (a run that stopped before its first commit) reads as an empty annotations table.
    schema = pa.unify_schemas([s for _, s in readable], promote_options="permissive") if readable else OUTPUT_SCHEMA
    if {ID_COLUMN, TASK_COLUMN} <= set(schema.names):  # our output: the columns older files lack read as null
        added = [OUTPUT_SCHEMA.field(name) for name in (ERROR_KIND_COLUMN, RUN_ID_COLUMN) if name not in schema.names]
        kept = list(dict.fromkeys(name for _, s in readable for name in kept_columns(s) if name in schema.names))
        schema = pa.schema([*schema, *added], metadata={KEPT_COLUMNS_KEY: json.dumps(kept).encode()})
    # Local paths go to pyarrow's own, faster filesystem; anything else through fsspec.
    return ds.dataset([file for file, _ in readable], schema=schema, filesystem=arrow_fs, format="parquet",
                      partitioning="hive", partition_base_dir=path)


def _footer_schema(file: str, arrow_fs: Any) -> pa.Schema | None:
    try:
        return pq.read_schema(file, filesystem=arrow_fs)
    except Exception as exc:  # one damaged file must not hide the others
        log.warning("skipping unreadable output file %s: %s: %s", file, type(exc).__name__, exc)
        return None


def connect(output: str, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the `annotations` (and, when possible, `items`) views."""
    dataset = open_output(output, storage_options)
    con = duckdb.connect()
    con.register(_ROWS_VIEW, dataset)
    columns = set(dataset.schema.names)
    if {ID_COLUMN, TASK_COLUMN} <= columns:
        order = ", ".join(f"{_ident(c)} DESC NULLS LAST" for c in (RUN_ID_COLUMN, CREATED_AT_COLUMN) if c in columns)
        con.sql(f"CREATE VIEW {ANNOTATIONS_VIEW} AS SELECT * FROM {_ROWS_VIEW} QUALIFY row_number() OVER "
                f"(PARTITION BY {_ident(ID_COLUMN)}, {_ident(TASK_COLUMN)} ORDER BY {order or 'NULL'}) = 1")
    else:
        con.sql(f"CREATE VIEW {ANNOTATIONS_VIEW} AS SELECT * FROM {_ROWS_VIEW}")
    if {*ITEM_COLUMNS, TASK_COLUMN, ANNOTATION_COLUMN} <= columns:
        # outputs written before `output_column` existed name the task columns after the task
        _create_items_view(con, OUTPUT_COLUMN_COLUMN if OUTPUT_COLUMN_COLUMN in columns else TASK_COLUMN,
                           kept_columns(dataset.schema))
    return con


def summarize(con: duckdb.DuckDBPyConnection, output: str, samples: int = 5,
              records: Sequence[Mapping[str, Any]] = (), last_runs: int = 3) -> OutputSummary:
    """Row and error counts, per task, a few ok rows, and the last runs (`records`: pipeline.runs.read_records)."""
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
                         tasks=tasks, samples=tuple(sample_rows),
                         runs=tuple(format_record(r) for r in records[-last_runs:]), run_count=len(records))


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int = 40) -> str:
    """The result of one SQL statement drawn as a table (empty for statements without a result)."""
    relation = con.sql(sql)
    return "" if relation is None else relation.preview(limit=max_rows)


def _create_items_view(con: duckdb.DuckDBPyConnection, name_column: str, kept: list[str]) -> None:
    # DuckDB only allows PIVOT in a view when the pivot values are spelled out, so list them first.
    names = [row[0] for row in con.sql(f"SELECT DISTINCT {_ident(name_column)} FROM {ANNOTATIONS_VIEW} "
                                       f"WHERE {_ident(name_column)} IS NOT NULL ORDER BY 1").fetchall()]
    if not names:
        return
    keys = ", ".join(map(_ident, ITEM_COLUMNS))
    values = ", ".join(_literal(str(name)) for name in names)
    pivot = (f"PIVOT (SELECT {keys}, {_ident(name_column)}, {_ident(ANNOTATION_COLUMN)} FROM {ANNOTATIONS_VIEW}) "
             f"ON {_ident(name_column)} IN ({values}) USING any_value({_ident(ANNOTATION_COLUMN)}) GROUP BY {keys}")
    kept = [name for name in kept if name not in (*ITEM_COLUMNS, *map(str, names))]
    if not kept:
        con.sql(f"CREATE VIEW {ITEMS_VIEW} AS {pivot}")
        return
    # kept input columns: one value per item even where runs kept different columns (any_value skips nulls)
    metadata = ", ".join(f"any_value({_ident(name)}) AS {_ident(name)}" for name in kept)
    con.sql(f"CREATE VIEW {ITEMS_VIEW} AS SELECT m.*, p.* EXCLUDE ({keys}) FROM "
            f"(SELECT {keys}, {metadata} FROM {ANNOTATIONS_VIEW} GROUP BY {keys}) AS m "
            f"JOIN ({pivot}) AS p USING ({keys})")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
