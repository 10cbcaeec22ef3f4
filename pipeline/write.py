"""Output side: committing the annotation rows as Parquet files while the job runs, and reading back what is
already done (resume).

Writing. The driver consumes the job's rows as they stream out of Ray (`write_rows`) and commits a Parquet
file every `flush_rows` rows or `flush_seconds` seconds, whichever comes first (checked as rows arrive), and
at the end: `part-<run_id>-<seq:05d>.parquet`. A commit is atomic: a local file is written under a hidden
name ('.' prefix, which every reader here skips) and renamed; an S3 object appears whole with its one PUT.
So a driver killed midway keeps every file it committed, no reader ever sees half a file, and the next run
resumes from them. A failed commit is retried with backoff (`media.errors.call_with_retries`) before the job
stops with `OutputWriteError`. Files of earlier runs are never appended to.

File size. Durability wants frequent commits, readers want few large files (tens to hundreds of MB: each file
opened costs a footer read, on S3 a request). The writer does both: it keeps the rows of its own small files
in memory until they add up to `target_file_bytes` (default TARGET_FILE_MB) of Parquet, then commits them as
one file `part-<run_id>-m<seq:05d>.parquet` that names them in its metadata (`REPLACES_KEY`) and deletes them
-- and at the end of the run it merges what is left. A crash between the two steps shows no duplicates to the
readers here (`read_files`, `pipeline.query`: they leave out a file that a committed file replaces), and the
next lease holder deletes it; a plain pyarrow/Spark listing of the folder in that moment sees both. The cost is
memory in the driver (up to the target's worth of rows, a few times that in Arrow) and writing each row twice;
`target_file_bytes=None` turns merging off. `flamingo-annotate compact` (pipeline/compact.py) merges the small
files of runs that were stopped, or written before this existed.

Reading back, for resume (pipeline/manifest.py). Every committed file names the input units its rows come from
in its metadata (UNITS_KEY); `unit_files` reads those names from the footers alone, on the driver, and
`scan_unit` reads one unit's rows (its `source`), in that unit's read task on a worker. No item id is ever
read on the driver. An unreadable file (not ours, or damaged by hand) is skipped with a warning; its items are
simply done again. `scan_output` applies the same rules to a whole output at once: a look for small outputs
and tools, never what a run does.

Resume rules, per task (same name and task-file hash): an item is done when it has an annotated row or an
error row of kind `input` or `model`. Rows of kind `transient` are re-attempted by the next run, and with
`retry_errors` every error row is. A re-attempted row is superseded once the new run has written a row for the
same item and task -- or, for a row whose id is a file's URI (a shard that failed as a whole), any row from
that file -- and `drop_rows` then rewrites the files that hold it without it (new file first, with the old
one's name in its metadata, then the old file deleted; the next run's `unit_files` finishes that deletion if a
crash cut it short). So pyarrow, pandas and Spark see one row per item and task. Rewriting happens at the end
of a run; a run stopped before that leaves the old rows, and their unit no manifest, so the next run reads the
unit again and removes them.

The output is a plain Parquet dataset (plus `_lease.json`, see pipeline/lease.py): pyarrow, pandas, DuckDB
(over a pyarrow dataset) and Spark read it as is. Rows are in `pipeline.schema.OUTPUT_SCHEMA`, followed by the
input metadata columns the job keeps (`keep_columns`, see pipeline/kept_columns.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from media.errors import TRANSIENT, call_with_retries
from media.files import file_prefixes, is_container
from media.storage import arrow_filesystem, decode_name, filesystem, is_local
from pipeline.kept_columns import KEPT_COLUMNS_KEY, METADATA_COLUMN, kept_arrays, kept_columns
from pipeline.manifest import is_retried, row_status
from pipeline.schema import (
    CREATED_AT_COLUMN,
    ERROR_COLUMN,
    ERROR_KIND_COLUMN,
    ID_COLUMN,
    OUTPUT_COLUMN_COLUMN,
    OUTPUT_SCHEMA,
    REPLACES_KEY,
    REQUIRED_COLUMNS,
    RUN_ID_COLUMN,
    SOURCE_COLUMN,
    TASK_COLUMN,
    TASK_HASH_COLUMN,
    infer_error_kind,
    replaced_files,
)

log = logging.getLogger(__name__)

FLUSH_ROWS = 10_000
FLUSH_SECONDS = 30.0
TARGET_FILE_MB = 128
_SCAN_COLUMNS = [ID_COLUMN, SOURCE_COLUMN, TASK_COLUMN, TASK_HASH_COLUMN, ERROR_COLUMN, ERROR_KIND_COLUMN]
# Parquet key-value metadata of every committed file: a JSON list of the `source` values (input units) of its
# rows, so a resumed run finds the files that hold an unfinished unit from the footers alone
# (pipeline/manifest.py). Files written before it existed lack it, and may hold any unit.
UNITS_KEY = b"flamingo_annotate.sources"


class OutputWriteError(Exception):
    """A commit failed even after retries; the message is the one line to show."""


@dataclass
class WriteStats:
    """What one run wrote, counted from its own rows as it committed them. Items are counted by their ids, kept
    per input unit (`source`) only until the unit is settled (its manifest written: its items are all in), so
    the ids held are those of the units in flight, not of the whole run."""

    rows_ok: int = 0
    rows_by_kind: Counter[str] = field(default_factory=Counter)  # error rows per error_kind
    files: list[str] = field(default_factory=list)
    written_keys: set[tuple[str, str]] = field(default_factory=set)  # (task, id or source) among `watch`
    open_items: dict[str, set[str]] = field(default_factory=dict)      # source -> ids it wrote rows for
    open_transient: dict[str, set[str]] = field(default_factory=dict)  # source -> ids with a transient error row
    settled_items: int = 0
    settled_transient: int = 0

    @property
    def rows_error(self) -> int:
        return sum(self.rows_by_kind.values())

    @property
    def items(self) -> set[str]:
        """Ids written, of the units not settled."""
        return set().union(*self.open_items.values())

    @property
    def transient_items(self) -> set[str]:
        """Ids with a transient error row, of the units not settled."""
        return set().union(*self.open_transient.values())

    @property
    def item_count(self) -> int:
        return self.settled_items + sum(map(len, self.open_items.values()))

    @property
    def transient_count(self) -> int:
        return self.settled_transient + sum(map(len, self.open_transient.values()))

    def settle(self, source: str) -> None:
        """Count the items of input unit `source` and forget their ids: all of its rows are committed."""
        self.settled_items += len(self.open_items.pop(source, ()))
        self.settled_transient += len(self.open_transient.pop(source, ()))


class OutputWriter:
    """Buffers output rows and commits them as Parquet files (see the module docstring). `before_commit` is
    called before every commit (the lease check: a run that lost the output stops there), `after_commit` with
    the rows of every file committed (not again when files are merged): the manifests' row counts."""

    def __init__(self, output_uri: str, run_id: str, *, storage_options: Mapping[str, Any] | None = None,
                 flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                 watch: Iterable[tuple[str, str]] = (), before_commit: Callable[[], None] | None = None,
                 keep_columns: Sequence[str] = (), target_file_bytes: int | None = TARGET_FILE_MB * 1024 * 1024,
                 after_commit: Callable[[pa.Table], None] | None = None, stats: WriteStats | None = None):
        self.output_uri = output_uri
        self.after_commit = after_commit
        self.keep_columns = tuple(keep_columns)
        self.run_id = run_id
        self.fs, self.root = filesystem(output_uri, storage_options)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.watch = watch if isinstance(watch, set) else set(watch)  # a set the caller may add keys to
        self.before_commit = before_commit
        self.stats = stats if stats is not None else WriteStats()  # the caller's, to settle units in it
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._last_commit = time.monotonic()
        self._seq = 0
        self.target_file_bytes = target_file_bytes
        self._small: list[tuple[str, pa.Table, int]] = []  # this run's committed files not merged yet
        self._merges = 0

    def write(self, rows: pa.Table) -> None:
        """Add rows (OUTPUT_SCHEMA columns, and the kept ones or `metadata`; extra ones are dropped); commits
        when a limit is reached."""
        table = to_output_table(rows, self.run_id, self.keep_columns)
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.flush_rows or time.monotonic() - self._last_commit >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one file (nothing when the buffer is empty)."""
        self._last_commit = time.monotonic()
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        if self.before_commit is not None:
            self.before_commit()
        path = self._next_path()
        size = commit_file(self.fs, path, table)
        self._buffer, self._buffered = [], 0
        self.stats.files.append(path)
        self._count(table)
        if self.after_commit is not None:
            self.after_commit(table)
        if self.target_file_bytes is not None:
            self._small.append((path, table, size))
            if sum(size for _, _, size in self._small) >= self.target_file_bytes:
                self.merge()

    def close(self) -> None:
        """Commit what is buffered, then merge this run's small files that are left (see the module docstring)."""
        self.flush()
        self.merge()

    def merge(self) -> None:
        """Commit this run's small files not merged yet as one file, then delete them (nothing for fewer than
        two)."""
        small, self._small = self._small, []
        if len(small) < 2:
            return
        if self.before_commit is not None:
            self.before_commit()
        self._merges += 1
        path = f"{self.root.rstrip('/')}/part-{self.run_id}-m{self._merges:05d}.parquet"
        metadata = {REPLACES_KEY: json.dumps([os.path.basename(p) for p, _, _ in small]).encode()}
        commit_file(self.fs, path, pa.concat_tables([table for _, table, _ in small]), metadata)
        for old, _, _ in small:
            self.fs.rm_file(old)
        gone = {p for p, _, _ in small}
        self.stats.files = [p for p in self.stats.files if p not in gone] + [path]

    def _next_path(self) -> str:
        self._seq += 1
        return f"{self.root.rstrip('/')}/part-{self.run_id}-{self._seq:05d}.parquet"

    def _count(self, table: pa.Table) -> None:
        stats = self.stats
        ids, sources = table.column(ID_COLUMN).to_pylist(), table.column(SOURCE_COLUMN).to_pylist()
        tasks, kinds = table.column(TASK_COLUMN).to_pylist(), table.column(ERROR_KIND_COLUMN).to_pylist()
        errors = table.column(ERROR_COLUMN).to_pylist()
        for item_id, source, task, error, kind in zip(ids, sources, tasks, errors, kinds):
            stats.open_items.setdefault(source, set()).add(item_id)
            if error is None:
                stats.rows_ok += 1
            else:
                stats.rows_by_kind[kind] += 1
                if kind == TRANSIENT:
                    stats.open_transient.setdefault(source, set()).add(item_id)
            for key in ((task, item_id), (task, source)):
                if key in self.watch:
                    stats.written_keys.add(key)


def write_rows(batches: Iterable[pa.Table], output_uri: str, run_id: str, **writer_options: Any) -> WriteStats:
    """Write every table of `batches` (e.g. `dataset.iter_batches(batch_format="pyarrow", batch_size=None)`)
    through an OutputWriter; what was buffered is committed even when the stream fails midway."""
    writer = OutputWriter(output_uri, run_id, **writer_options)
    try:
        for batch in batches:
            writer.write(batch)
    except BaseException:
        try:
            writer.flush()  # keep what was done before the failure
        except Exception as exc:
            log.warning("could not commit the last rows before stopping: %s: %s", type(exc).__name__, exc)
        raise
    writer.close()
    return writer.stats


def commit_file(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table,
                metadata: Mapping[bytes, bytes] | None = None) -> int:
    """Write `table` to `path` atomically (see the module docstring), retrying transient failures. Returns the
    file's size in bytes. The file's metadata names the input units its rows come from (UNITS_KEY)."""
    units = sorted(pc.unique(table.column(SOURCE_COLUMN)).to_pylist()) if SOURCE_COLUMN in table.column_names else []
    metadata = {**(metadata or {}), UNITS_KEY: json.dumps(units).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()

    def put() -> None:
        if is_local(fs):
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            temporary = os.path.join(folder, f".{name}.tmp")
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        else:
            fs.pipe_file(path, data)

    try:
        call_with_retries(put)
    except Exception as exc:
        raise OutputWriteError(f"cannot write {path}: {type(exc).__name__}: {exc}") from exc
    return len(data)


def to_output_table(batch: pa.Table, run_id: str | None = None, keep_columns: Sequence[str] = ()) -> pa.Table:
    """`batch` reduced to OUTPUT_SCHEMA (column order and types): `created_at` filled in when absent, `run_id`
    when given, `error_kind` inferred for error rows without one. Raises ValueError for missing columns or null
    required values: those are bugs upstream, not bad input.

    Then the `keep_columns`, strings: taken from the rows' JSON `metadata` when they have one, else from the
    columns of those names (a file being rewritten), null where absent; their names go in the schema metadata."""
    if OUTPUT_COLUMN_COLUMN not in batch.column_names and TASK_COLUMN in batch.column_names:
        batch = batch.append_column(OUTPUT_COLUMN_COLUMN, batch.column(TASK_COLUMN))
    if CREATED_AT_COLUMN not in batch.column_names:
        now = pa.scalar(datetime.now(timezone.utc), OUTPUT_SCHEMA.field(CREATED_AT_COLUMN).type)
        batch = batch.append_column(CREATED_AT_COLUMN, pa.repeat(now, batch.num_rows))
    if run_id is not None:
        batch = _set(batch, RUN_ID_COLUMN, pa.repeat(pa.scalar(run_id, pa.string()), batch.num_rows))
    elif RUN_ID_COLUMN not in batch.column_names:
        batch = batch.append_column(RUN_ID_COLUMN, pa.nulls(batch.num_rows, pa.string()))
    if ERROR_COLUMN in batch.column_names:
        batch = _set(batch, ERROR_KIND_COLUMN, _error_kinds(batch))
    missing = [name for name in OUTPUT_SCHEMA.names if name not in batch.column_names]
    if missing:
        raise ValueError(f"rows lack output columns {missing}")
    nulls = [name for name in REQUIRED_COLUMNS if batch.column(name).null_count]
    if nulls:
        raise ValueError(f"null values in required output columns {nulls}")
    table = batch.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    if not keep_columns:
        return table
    if METADATA_COLUMN in batch.column_names:
        kept = kept_arrays(batch.column(METADATA_COLUMN).to_pylist(), keep_columns)
    else:
        kept = [batch.column(name).cast(pa.string()) if name in batch.column_names else
                pa.nulls(batch.num_rows, pa.string()) for name in keep_columns]
    for name, values in zip(keep_columns, kept):
        table = table.append_column(pa.field(name, pa.string()), values)
    return table.replace_schema_metadata({KEPT_COLUMNS_KEY: json.dumps(list(keep_columns)).encode()})


def _error_kinds(batch: pa.Table) -> pa.Array:
    """The `error_kind` column: as given where set, inferred from the error text where not, null when ok."""
    errors = batch.column(ERROR_COLUMN).to_pylist()
    given = batch.column(ERROR_KIND_COLUMN).to_pylist() if ERROR_KIND_COLUMN in batch.column_names else \
        [None] * len(errors)
    return pa.array([None if error is None else kind or infer_error_kind(error)
                     for error, kind in zip(errors, given)], pa.string())


def _set(table: pa.Table, name: str, values: Any) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)


# --- reading back: resume --------------------------------------------------------------------------------------

@dataclass
class OutputScan:
    """What the output holds for the tasks of a run (see `scan_output`)."""

    done: dict[str, set[str]]                 # task name -> ids done for it
    # (task, id) of an error row that is re-attempted (or already superseded by a done row) -> files holding one
    retry: dict[tuple[str, str], set[str]]
    unreadable: list[str]                     # files skipped

    def watch(self) -> set[tuple[str, str]]:
        """The (task, id) keys whose rows a run's writes can supersede."""
        return set(self.retry)


def scan_output(output_uri: str, task_hashes: Mapping[str, str], *, retry_errors: bool = False,
                storage_options: Mapping[str, Any] | None = None, finish_rewrites: bool = True) -> OutputScan:
    """For each task (name -> task-file hash): the ids done, and the error rows to re-attempt, with their
    files (the resume rules are in the module docstring), over the whole output. A look at a small output (tests,
    tools): a run never calls it, as it holds every id in memory; a run resumes unit by unit (`scan_unit`).
    `finish_rewrites=False` (a look without the lease) changes nothing in the output."""
    names = list(task_hashes)
    condition = pc.field(TASK_COLUMN).isin(names) if names else None
    files, tables, unreadable = read_files(output_uri, _SCAN_COLUMNS, condition, storage_options,
                                           finish_rewrites=finish_rewrites)
    done: dict[str, set[str]] = {name: set() for name in names}
    retryable: dict[tuple[str, str], set[str]] = {}
    for file, table in zip(files, tables):
        for item_id, task, status in _statuses(table, task_hashes):
            if is_retried(status, retry_errors):
                retryable.setdefault((task, item_id), set()).add(file)
            else:
                done[task].add(item_id)
    return OutputScan(done=done, retry=retryable, unreadable=unreadable)


def _statuses(table: pa.Table | None, task_hashes: Mapping[str, str]) -> Iterator[tuple[str, str, str]]:
    """(id, task, status) of the rows of `table` (_SCAN_COLUMNS) for the tasks as they are now (same hash)."""
    if table is None:
        return
    rows = zip(*(table.column(c).to_pylist() for c in (ID_COLUMN, TASK_COLUMN, TASK_HASH_COLUMN, ERROR_COLUMN,
                                                       ERROR_KIND_COLUMN)))
    for item_id, task, task_hash, error, kind in rows:
        if task_hashes.get(task) == task_hash:
            yield item_id, task, row_status(error, kind)


@dataclass
class UnitScan:
    """What the output holds of one input unit, for the tasks of a run (see `scan_unit`)."""

    done: dict[str, set[str]]                    # item id -> tasks it is done for
    retry: list[tuple[str, str, str]]            # (task, id, file) of error rows re-attempted
    stale: list[tuple[str, str, str]]            # (task, id, file) of error rows superseded already
    prior: dict[str, Counter[str]]               # task -> status -> rows that stay (manifest counts)


def scan_unit(fs: fsspec.AbstractFileSystem, files: Sequence[str], unit: str, task_hashes: Mapping[str, str], *,
              retry_errors: bool = False) -> UnitScan:
    """The rows of input unit `unit` (their `source`) in `files` (the output files that may hold them), by the
    resume rules of the module docstring. Runs in a read task, on a worker: memory is one unit's rows. An error
    row is stale when the same item and task also has a row that is done, or, for a shard that failed as a whole
    (its id is the unit), when items of the shard are done: a run stopped before `drop_rows` left it."""
    condition = (pc.field(SOURCE_COLUMN) == unit) & pc.field(TASK_COLUMN).isin(list(task_hashes))
    done: dict[tuple[str, str], str] = {}
    retry: list[tuple[str, str, str]] = []
    for file in files:
        table, _ = _read_file(fs, file, _SCAN_COLUMNS, condition)
        for item_id, task, status in _statuses(table, task_hashes):
            if is_retried(status, retry_errors):
                retry.append((task, item_id, file))
            else:
                done[(task, item_id)] = status
    shard_done = {task for task, item_id in done if item_id != unit}
    stale = [key for key in retry if (key[0], key[1]) in done or (key[1] == unit and key[0] in shard_done
                                                                  and is_container(decode_name(unit)))]
    by_item: dict[str, set[str]] = {}
    prior: dict[str, Counter[str]] = {}
    for (task, item_id), status in done.items():
        by_item.setdefault(item_id, set()).add(task)
        prior.setdefault(task, Counter())[status] += 1
    return UnitScan(by_item, [key for key in retry if key not in stale], stale, prior)


def unit_files(output_uri: str, units: Collection[str], storage_options: Mapping[str, Any] | None = None, *,
               finish_rewrites: bool = False) -> tuple[dict[str, list[str]], list[str]]:
    """(unit -> the output files whose metadata names it, the files without that metadata: they may hold any
    unit), for the `units` asked about, from the files' footers alone (one small read per file, in parallel;
    no column is read). Files that a rewritten file replaces are left out, and deleted with `finish_rewrites`;
    unreadable ones are skipped with a warning (their items are done again)."""
    fs, root = filesystem(output_uri, storage_options)
    files = output_files(fs, root) if units else []
    wanted = set(units)

    def look(path: str) -> tuple[list[str] | None, list[str], bool]:
        try:
            schema = pq.read_schema(path, filesystem=arrow_filesystem(fs))
        except Exception as exc:
            log.warning("skipping unreadable output file %s: %s: %s", path, type(exc).__name__, exc)
            return [], [], False
        named = (schema.metadata or {}).get(UNITS_KEY)
        mine = None if named is None else [u for u in json.loads(named) if u in wanted]
        return mine, replaced_files(schema), True

    with ThreadPoolExecutor(max_workers=16) as pool:
        looks = list(pool.map(look, files))
    replaced = {os.path.basename(name) for _, names, _ in looks for name in names}
    by_unit: dict[str, list[str]] = {}
    unknown: list[str] = []
    for path, (mine, _, readable) in zip(files, looks):
        if os.path.basename(path) in replaced:
            if finish_rewrites:
                _remove_replaced(fs, path)
        elif mine is None:
            unknown.append(path)
        elif readable:
            for unit in mine:
                by_unit.setdefault(unit, []).append(path)
    return by_unit, unknown


def existing_ids(output_uri: str, task: str, *, task_hash: str | None = None, include_errors: bool = True,
                 storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Ids with a row for `task` (and `task_hash`, when given) in `output_uri`; `include_errors=False` leaves
    out error rows."""
    condition = pc.field(TASK_COLUMN) == task
    if task_hash is not None:
        condition &= pc.field(TASK_HASH_COLUMN) == task_hash
    if not include_errors:
        condition &= pc.field(ERROR_COLUMN).is_null()
    _, tables, _ = read_files(output_uri, [ID_COLUMN], condition, storage_options)
    return {item_id for table in tables if table is not None for item_id in table.column(ID_COLUMN).to_pylist()}


def output_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The output's Parquet files, hidden ones (uncommitted, '.' prefix) left out."""
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet") and "/." not in p[len(root):]
                  and "/_" not in p[len(root):])


def read_files(output_uri: str, columns: list[str], condition: pc.Expression | None,
               storage_options: Mapping[str, Any] | None = None, *, finish_rewrites: bool = False
               ) -> tuple[list[str], list[pa.Table | None], list[str]]:
    """(files, their `columns` for the rows matching `condition` -- None for a file that could not be read --,
    the unreadable files), file by file in parallel. Columns a file lacks (written before they existed) come
    back as nulls. A file that a rewritten file replaces (a rewrite cut short by a crash) is left out, and
    deleted with `finish_rewrites` (only the lease holder may)."""
    fs, root = filesystem(output_uri, storage_options)
    files = output_files(fs, root)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda file: _read_file(fs, file, columns, condition), files))
    replaced = {os.path.basename(name) for _, replaces in results for name in replaces}
    kept_files, tables, unreadable = [], [], []
    for file, (table, _) in zip(files, results):
        if os.path.basename(file) in replaced:
            if finish_rewrites:
                _remove_replaced(fs, file)
            continue
        kept_files.append(file)
        tables.append(table)
        if table is None:
            unreadable.append(file)
    return kept_files, tables, unreadable


def _read_file(fs: fsspec.AbstractFileSystem, path: str, columns: list[str],
               condition: pc.Expression | None) -> tuple[pa.Table | None, list[str]]:
    """(the rows, or None when unreadable; the names of the files this one replaces)."""
    wanted = OUTPUT_SCHEMA.empty_table().select(columns).schema
    try:
        schema = pq.read_schema(path, filesystem=arrow_filesystem(fs))
        present = [c for c in columns if c in schema.names]
        table = pq.read_table(path, filesystem=arrow_filesystem(fs), columns=present, filters=condition)
        for name in columns:
            if name not in present:
                table = table.append_column(wanted.field(name), pa.nulls(table.num_rows, wanted.field(name).type))
        return table.select(columns).cast(wanted), replaced_files(schema)
    except Exception as exc:  # a broken file must not block resuming; its items get redone
        log.warning("skipping unreadable output file %s: %s: %s", path, type(exc).__name__, exc)
        return None, []


def _remove_replaced(fs: fsspec.AbstractFileSystem, path: str) -> None:
    log.warning("removing %s: a rewritten file replaces it (a rewrite was cut short)", path)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


# --- superseded rows -------------------------------------------------------------------------------------------

def drop_superseded(output_uri: str, scan: OutputScan, written_keys: set[tuple[str, str]], run_id: str,
                    task_hashes: Mapping[str, str], *, storage_options: Mapping[str, Any] | None = None) -> int:
    """Rewrite the files holding re-attempted error rows of `scan` that are now superseded (see the module
    docstring), without those rows. Returns how many rows were dropped."""
    gone = {key for key in scan.retry if key in written_keys or key[1] in scan.done.get(key[0], ())}
    gone |= _shards_with_done_items(scan)
    by_file: dict[str, set[tuple[str, str]]] = {}
    for key in gone:
        for file in scan.retry[key]:
            by_file.setdefault(file, set()).add(key)
    return drop_rows(output_uri, by_file, run_id, task_hashes, storage_options=storage_options)


def drop_rows(output_uri: str, by_file: Mapping[str, set[tuple[str, str]]], run_id: str,
              task_hashes: Mapping[str, str], *, storage_options: Mapping[str, Any] | None = None) -> int:
    """Rewrite each file of `by_file` without its error rows of those (task, id) keys (task as it is now, same
    hash): the new file first, naming the old one in its metadata, then the old one deleted. Returns how many
    rows were dropped."""
    fs, root = filesystem(output_uri, storage_options)
    dropped = 0
    for seq, (file, keys) in enumerate(sorted(by_file.items()), start=1):
        try:
            table = pq.read_table(file, filesystem=arrow_filesystem(fs))
        except FileNotFoundError:  # rewritten already (the same file named twice)
            continue
        rows = zip(*(table.column(c).to_pylist() for c in (TASK_COLUMN, ID_COLUMN, TASK_HASH_COLUMN, ERROR_COLUMN)))
        keep = [not (error is not None and (task, item_id) in keys and task_hashes.get(task) == task_hash)
                for task, item_id, task_hash, error in rows]
        kept = table.filter(pa.array(keep, pa.bool_()))
        dropped += table.num_rows - kept.num_rows
        if kept.num_rows == table.num_rows:
            continue
        if kept.num_rows:
            new_path = f"{root.rstrip('/')}/part-{run_id}-r{seq:04d}.parquet"
            metadata = {REPLACES_KEY: json.dumps([os.path.basename(file)]).encode()}
            commit_file(fs, new_path, to_output_table(kept, keep_columns=kept_columns(table.schema)), metadata)
        fs.rm_file(file)
    return dropped


def _shards_with_done_items(scan: OutputScan) -> set[tuple[str, str]]:
    """The re-attempted rows of whole shards (id = the file's URI) whose items the output holds as done: a run
    stopped between committing those items and `drop_superseded` left them, and no later run writes a row from
    that file again. Ids are compared as names (`decode_name`), as `pipeline.read` does."""
    shards = {(task, decode_name(item_id)): (task, item_id) for task, item_id in scan.retry
              if is_container(decode_name(item_id))}
    if not shards:
        return set()
    found = set()
    for task, ids in scan.done.items():
        for item_id in ids:
            for prefix in file_prefixes(decode_name(item_id)):
                key = shards.get((task, prefix))
                if key is not None:
                    found.add(key)
    return found
