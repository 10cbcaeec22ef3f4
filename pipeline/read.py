"""Input side of a job: turn an input URI into a Ray Dataset with exactly one row per input item.

Listing runs on the driver (cheap fsspec metadata calls); reading runs in Ray tasks, each task taking a
group of files and calling `media.files.file_rows` on each, which turns every bad item or file into an
error row (see `media/files.py` for the kinds of input and the item ids). Rows are in
`pipeline.schema.ITEM_SCHEMA`, plus `done_tasks`.

Resume (pipeline/manifest.py): the job passes only the files that are not finished, and a `Resume` saying where
the output keeps each file's rows. The read task of a file reads that file's rows from the output first
(`pipeline.write.scan_unit`: the output files that name it, its `source` only), on the worker, then leaves out
the items done for every task and gives the others `done_tasks`, the tasks they are done for already (null:
none). It reports the file to the job's `UnitLedger` before its first row and after its last (the rows the
file gives, so the driver knows when all of them are committed). `sample` leaves out the items outside the
sample here too, so those counts are the rows that reach the writer.

Read tasks are retried a bounded number of times (`READ_TASK_RETRIES`): Ray retries a crashed task
(a native decoder's segfault, say) without end by default, and the job would never finish.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import ray.data
from ray.util.annotations import RayDeprecationWarning

from media.files import DEFAULT_MAX_ITEM_BYTES, ListedFile, file_rows, list_files
from media.storage import filesystem, resolve_storage_options
from pipeline.manifest import unit_uri
from pipeline.plan import in_sample
from pipeline.schema import ITEM_SCHEMA
from pipeline.write import scan_unit

# A read task hands rows to Ray in tables of at most this many rows / bytes of media.
_TABLE_ROWS = 256
_TABLE_BYTES = 64 * 1024 * 1024
READ_TASK_RETRIES = 3  # times a read task that crashed (worker died) is run again before the job fails
DONE_TASKS_COLUMN = "done_tasks"  # the tasks an item is done for already (null: none)
READ_SCHEMA = ITEM_SCHEMA.append(pa.field(DONE_TASKS_COLUMN, pa.list_(pa.string())))
_REPORT_TIMEOUT_S = 120


@dataclass(frozen=True)
class Resume:
    """What the read tasks need to leave out what the output already holds (see the module docstring)."""

    output_uri: str
    task_hashes: Mapping[str, str]                   # the run's tasks: name -> task-file hash
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # the output's
    retry_errors: bool = False
    files_by_unit: Mapping[str, Sequence[str]] = field(default_factory=dict)  # unit -> output files naming it
    unknown_files: Sequence[str] = ()                # output files that may hold any unit (written before names)
    ledger: Any = None                               # a pipeline.manifest.UnitLedger actor, or None


@dataclass(frozen=True)
class ReadResult:
    dataset: ray.data.Dataset  # rows in READ_SCHEMA (lazy: nothing is read until it executes)
    files: int                 # files read


def read_items(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    max_read_tasks: int = 200,
    files: Sequence[ListedFile] | None = None,
    media_keys: Sequence[str] | None = None,
    metadata_fields: Sequence[str] | None = (),
    resume: Resume | None = None,
    sample: float | None = None,
) -> ReadResult:
    """A Ray Dataset of the items under `uri`, one row per item (see the module docstring).

    Files are spread over at most `max_read_tasks` Ray tasks. Raises FileNotFoundError, before any work, when
    nothing matches `uri`. `files`: the files to read when the caller already has them (listing a large prefix
    takes a while; a resumed job passes the unfinished ones only). `media_keys`: which WebDataset member /
    Parquet column is an item's media (`media.files.parse_media_keys`); `metadata_fields`: the metadata fields
    the rows carry (None: all; none by default). `resume`: leave out what the output holds; `sample`: only the
    items whose id is in the sample (`pipeline.plan.in_sample`).
    """
    options = resolve_storage_options(uri, storage_options)
    if files is None:
        files = list_files(uri, options)
    by_unit = resume.files_by_unit if resume is not None else {}
    entries = [{"uri": f.uri, "size": f.size, "outputs": list(by_unit.get(unit_uri(f.uri), ()))} for f in files]
    if not entries:
        return ReadResult(ray.data.from_arrow(READ_SCHEMA.empty_table()), 0)
    listed = ray.data.from_items(entries, override_num_blocks=min(len(entries), max_read_tasks))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for task retries and warns that `ray_remote_args` will go.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        dataset = listed.map_batches(
            partial(_read_files, storage_options=options, max_item_bytes=max_item_bytes,
                    media_keys=media_keys, metadata_fields=metadata_fields, resume=resume, sample=sample),
            batch_format="pyarrow",
            batch_size=None,  # one task per block of listed files
            max_retries=READ_TASK_RETRIES,
        )
    return ReadResult(dataset, len(files))


def _read_files(batch: pa.Table, *, storage_options: dict[str, Any], max_item_bytes: int,
                media_keys: Sequence[str] | None = None, metadata_fields: Sequence[str] | None = (),
                resume: Resume | None = None, sample: float | None = None) -> Iterator[pa.Table]:
    """Ray task body: the rows of every listed file in `batch` still to do, as READ_SCHEMA tables."""

    def rows() -> Iterator[dict[str, Any]]:
        for entry in batch.to_pylist():
            yield from _unit_rows(entry, storage_options, max_item_bytes, media_keys, metadata_fields, resume, sample)

    yield from _tables(rows())


def _unit_rows(entry: Mapping[str, Any], storage_options: dict[str, Any], max_item_bytes: int,
               media_keys: Sequence[str] | None, metadata_fields: Sequence[str] | None, resume: Resume | None,
               sample: float | None) -> Iterator[dict[str, Any]]:
    """The rows of one listed file still to do, its reports to the ledger before the first and after the last."""
    unit = unit_uri(entry["uri"])
    done: Mapping[str, set[str]] = {}
    tasks: set[str] = set()
    if resume is not None:
        tasks = set(resume.task_hashes)
        outputs = [*(entry["outputs"] or ()), *resume.unknown_files]
        if outputs:
            fs, _ = filesystem(resume.output_uri, resume.storage_options)
            scan = scan_unit(fs, outputs, unit, resume.task_hashes, retry_errors=resume.retry_errors)
            done = scan.done
            _report(resume, "opened", unit, {"retry": scan.retry, "stale": scan.stale,
                                             "prior": {task: dict(c) for task, c in scan.prior.items()}})
        else:
            _report(resume, "opened", unit, {"retry": [], "stale": [], "prior": {}})
    items = out_rows = skipped = 0
    for row in file_rows(entry["uri"], entry["size"], storage_options, max_item_bytes,
                         media_keys=media_keys, metadata_fields=metadata_fields):
        if sample is not None and not in_sample(row["id"], sample):
            continue
        items += 1
        already = done.get(row["id"], set())
        if tasks and already >= tasks:
            skipped += 1
            continue
        out_rows += len(tasks - already)
        yield {**row, DONE_TASKS_COLUMN: sorted(already) or None}
    if resume is not None:
        _report(resume, "read", unit, {"rows": out_rows, "items": items, "skipped": skipped})


def _report(resume: Resume, event: str, unit: str, report: dict[str, Any]) -> None:
    """Tell the ledger, and wait until it has it (the driver must know before the rows that follow arrive)."""
    if resume.ledger is not None:
        ray.get(getattr(resume.ledger, event).remote(unit, report), timeout=_REPORT_TIMEOUT_S)


def _tables(rows: Iterable[dict[str, Any]]) -> Iterator[pa.Table]:
    """Pack rows into READ_SCHEMA tables of bounded size."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += len(row["data"] or b"")
        if len(chunk) >= _TABLE_ROWS or size >= _TABLE_BYTES:
            yield pa.Table.from_pylist(chunk, schema=READ_SCHEMA)
            chunk, size = [], 0
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=READ_SCHEMA)
