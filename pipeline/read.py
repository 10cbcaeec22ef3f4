"""Input side of a job: turn an input URI into a Ray Dataset with exactly one row per input item.

Listing runs on the driver (cheap fsspec metadata calls); reading runs in Ray tasks, each task taking a
group of files and calling `media.files.file_rows` on each, which turns every bad item or file into an
error row (see `media/files.py` for the kinds of input and the item ids). Rows are in
`pipeline.schema.ITEM_SCHEMA`.

Resume: items already done are left out here. Plain files among them are not read at all; a tar or
Parquet file is still read, and its done members are dropped inside the read task.

Read tasks are retried a bounded number of times (`READ_TASK_RETRIES`): Ray retries a crashed task
(a native decoder's segfault, say) without end by default, and the job would never finish.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import ray.data
from ray.util.annotations import RayDeprecationWarning

from media.files import DEFAULT_MAX_ITEM_BYTES, ListedFile, file_prefixes, file_rows, is_container, list_files
from media.storage import decode_name, resolve_storage_options
from pipeline.schema import ITEM_SCHEMA

# A read task hands rows to Ray in tables of at most this many rows / bytes of media.
_TABLE_ROWS = 256
_TABLE_BYTES = 64 * 1024 * 1024
READ_TASK_RETRIES = 3  # times a read task that crashed (worker died) is run again before the job fails


@dataclass(frozen=True)
class ReadResult:
    dataset: ray.data.Dataset  # rows in ITEM_SCHEMA (lazy: nothing is read until it executes)
    files: int                 # files listed under the input URI
    skipped: int               # ids of `skip_ids` that belong to the listed files (not read again)


def read_items(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    skip_ids: Iterable[str] | None = None,
    max_read_tasks: int = 200,
    files: Sequence[ListedFile] | None = None,
    media_keys: Sequence[str] | None = None,
    metadata_fields: Sequence[str] | None = (),
) -> ReadResult:
    """A Ray Dataset of the items under `uri`, one row per item (see the module docstring).

    `skip_ids` (ids already done, for resume): plain files among them are not read at all; members of
    tar / Parquet files are filtered out inside the read tasks. Files are spread over at most
    `max_read_tasks` Ray tasks. Raises FileNotFoundError, before any work, when nothing matches `uri`.
    `files`: the listing of `uri` when the caller already has it (listing a large prefix takes a while).
    `media_keys`: which WebDataset member / Parquet column is an item's media (`media.files.parse_media_keys`);
    `metadata_fields`: the metadata fields the rows carry (None: all; none by default).
    """
    options = resolve_storage_options(uri, storage_options)
    if files is None:
        files = list_files(uri, options)
    skip_by_file = _skip_ids_by_file(set(skip_ids or ()), {f.uri for f in files})
    entries = []
    for f in files:
        skip = skip_by_file.get(f.uri, [])
        if is_container(f.uri) or not skip:
            entries.append({"uri": f.uri, "size": f.size, "skip": skip})
    skipped = sum(len(ids) for ids in skip_by_file.values())
    if not entries:
        return ReadResult(ray.data.from_arrow(ITEM_SCHEMA.empty_table()), len(files), skipped)
    listed = ray.data.from_items(entries, override_num_blocks=min(len(entries), max_read_tasks))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for task retries and warns that `ray_remote_args` will go.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        dataset = listed.map_batches(
            partial(_read_files, storage_options=options, max_item_bytes=max_item_bytes,
                    media_keys=media_keys, metadata_fields=metadata_fields),
            batch_format="pyarrow",
            batch_size=None,  # one task per block of listed files
            max_retries=READ_TASK_RETRIES,
        )
    return ReadResult(dataset, len(files), skipped)


def _read_files(batch: pa.Table, *, storage_options: dict[str, Any], max_item_bytes: int,
                media_keys: Sequence[str] | None = None, metadata_fields: Sequence[str] | None = ()
                ) -> Iterator[pa.Table]:
    """Ray task body: the rows of every listed file in `batch`, as ITEM_SCHEMA tables."""

    def rows() -> Iterator[dict[str, Any]]:
        for entry in batch.to_pylist():
            skip = set(entry["skip"] or ())
            for row in file_rows(entry["uri"], entry["size"], storage_options, max_item_bytes,
                                 media_keys=media_keys, metadata_fields=metadata_fields):
                if row["id"] not in skip:
                    yield row

    yield from _tables(rows())


def _tables(rows: Iterable[dict[str, Any]]) -> Iterator[pa.Table]:
    """Pack rows into ITEM_SCHEMA tables of bounded size."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += len(row["data"] or b"")
        if len(chunk) >= _TABLE_ROWS or size >= _TABLE_BYTES:
            yield pa.Table.from_pylist(chunk, schema=ITEM_SCHEMA)
            chunk, size = [], 0
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=ITEM_SCHEMA)


def _skip_ids_by_file(skip_ids: set[str], file_uris: set[str]) -> dict[str, list[str]]:
    """Group the ids to skip by the listed file they belong to (ids of unlisted files are ignored). Ids and
    URIs are compared as names (`decode_name`): when the key of an item is not UTF-8 its whole id is
    escaped, so the id's text need not start with its file's text."""
    file_by_name = {decode_name(uri): uri for uri in file_uris}
    by_file: dict[str, list[str]] = {}
    for item_id in skip_ids:
        name = decode_name(item_id)
        candidates = [name, *file_prefixes(name)]
        owner = next((file_by_name[c] for c in candidates if c in file_by_name), None)
        if owner is not None:
            by_file.setdefault(owner, []).append(item_id)
    return by_file

