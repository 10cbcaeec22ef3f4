"""Output side: the annotation table, writing it as Parquet, and reading back what is already done.

Every run appends new Parquet files (Ray Data names them with a per-write UUID) next to the files of
earlier runs and never rewrites them, so resuming a job only adds the missing rows. The output
directory is a plain Parquet dataset: pyarrow, pandas, DuckDB (over a pyarrow dataset) and Spark read
it as is.

Rows are in `pipeline.schema.OUTPUT_SCHEMA`, one per input item and task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data import SaveMode

from media.storage import arrow_filesystem, filesystem
from pipeline.schema import (
    CREATED_AT_COLUMN,
    ERROR_COLUMN,
    ID_COLUMN,
    OUTPUT_COLUMN_COLUMN,
    OUTPUT_SCHEMA,
    REQUIRED_COLUMNS,
    TASK_COLUMN,
    TASK_HASH_COLUMN,
)

log = logging.getLogger(__name__)


def write_rows(
    dataset: ray.data.Dataset, output_uri: str, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Append `dataset` (rows with the OUTPUT_SCHEMA columns; extra columns are dropped) to
    `output_uri` as new Parquet files. Executes the dataset."""
    fs, path = filesystem(output_uri, storage_options)
    dataset.map_batches(to_output_table, batch_format="pyarrow", batch_size=None).write_parquet(
        path,
        filesystem=arrow_filesystem(fs),
        mode=SaveMode.APPEND,  # new, uniquely named files; earlier runs' files are left alone
        schema=OUTPUT_SCHEMA,
    )


def to_output_table(batch: pa.Table) -> pa.Table:
    """`batch` reduced to OUTPUT_SCHEMA (column order and types), `created_at` filled in when absent.
    Raises ValueError for missing columns or null required values: those are bugs upstream, not bad
    input."""
    if OUTPUT_COLUMN_COLUMN not in batch.column_names and TASK_COLUMN in batch.column_names:
        batch = batch.append_column(OUTPUT_COLUMN_COLUMN, batch.column(TASK_COLUMN))
    if CREATED_AT_COLUMN not in batch.column_names:
        now = pa.scalar(datetime.now(timezone.utc), OUTPUT_SCHEMA.field(CREATED_AT_COLUMN).type)
        batch = batch.append_column(CREATED_AT_COLUMN, pa.repeat(now, batch.num_rows))
    missing = [name for name in OUTPUT_SCHEMA.names if name not in batch.column_names]
    if missing:
        raise ValueError(f"rows lack output columns {missing}")
    nulls = [name for name in REQUIRED_COLUMNS if batch.column(name).null_count]
    if nulls:
        raise ValueError(f"null values in required output columns {nulls}")
    return batch.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)


def existing_ids(
    output_uri: str,
    task: str,
    *,
    task_hash: str | None = None,
    include_errors: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> set[str]:
    """Ids already written to `output_uri` for `task` (and `task_hash`, when given), for resume.
    `include_errors=False` leaves out rows that failed, so a resumed run tries them again. An absent
    or empty output gives an empty set; an unreadable file (e.g. cut short by a crash) is logged and
    ignored, so its items are simply done again."""
    condition = pc.field(TASK_COLUMN) == task
    if task_hash is not None:
        condition &= pc.field(TASK_HASH_COLUMN) == task_hash
    if not include_errors:
        condition &= pc.field(ERROR_COLUMN).is_null()
    return set(read_output(output_uri, [ID_COLUMN], condition, storage_options).column(ID_COLUMN).to_pylist())


def count_rows_since(
    output_uri: str, since: datetime, *, storage_options: Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """(rows, rows with an error) written to `output_uri` at or after `since`: what one run added."""
    since = pa.scalar(since, OUTPUT_SCHEMA.field(CREATED_AT_COLUMN).type)
    table = read_output(output_uri, [ERROR_COLUMN], pc.field(CREATED_AT_COLUMN) >= since, storage_options)
    return table.num_rows, table.num_rows - table.column(ERROR_COLUMN).null_count


def read_output(
    output_uri: str, columns: list[str], condition: pc.Expression, storage_options: Mapping[str, Any] | None = None
) -> pa.Table:
    """`columns` of the output rows matching `condition`, file by file in parallel; skips unreadable files."""
    fs, path = filesystem(output_uri, storage_options)
    empty = OUTPUT_SCHEMA.empty_table().select(columns)
    if not fs.exists(path):
        return empty
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/." not in p[len(path):])
    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(lambda file: _read_file(fs, file, columns, condition), files))
    return pa.concat_tables([empty, *(t for t in tables if t is not None)])


def _read_file(fs: fsspec.AbstractFileSystem, path: str, columns: list[str],
               condition: pc.Expression) -> pa.Table | None:
    try:
        return pq.read_table(path, filesystem=arrow_filesystem(fs), columns=columns, filters=condition).cast(
            OUTPUT_SCHEMA.empty_table().select(columns).schema)
    except Exception as exc:  # a broken file must not block resuming; its items get redone
        log.warning("ignoring unreadable output file %s: %s: %s", path, type(exc).__name__, exc)
        return None
