"""Compaction: merge an output's small Parquet files into files of about `target_file_mb` each.

Why: a run commits a file every `flush_rows` rows or `flush_seconds` seconds (pipeline/write.py), which keeps a
killed job's work but leaves many small files; readers (pyarrow, DuckDB, Spark) pay per file opened and per S3
request, and scale best with files of tens to hundreds of MB. Compaction reads small files and writes them
back as few large ones, rows unchanged (their `run_id` and `created_at` included).

Safety. It holds the output's lease (pipeline/lease.py), so no run writes or rewrites files meanwhile; it
confirms the lease before every commit. Each merged file is committed atomically (`commit_file`) with the names
of the files it holds in its metadata (`REPLACES_KEY`), and only then are those files deleted. Every reader here
(`pipeline.write.read_files`, `pipeline.query`) leaves out a file that a committed file replaces, so a crash
between the two steps shows no row twice, and the next run or compaction (as lease holder) deletes what is left.
Before merging, files already replaced are deleted for that reason: a merged file that replaced a rewrite must
not let the file that the rewrite replaced reappear.

A group is merged only from files of one folder with the same kept input columns (pipeline/kept_columns.py), so
the merged file has one schema. Unreadable files are left as they are. Memory: one group is read whole, so
about `target_file_mb` of Parquet (a few times that once decoded) at a time.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from media.storage import arrow_filesystem, filesystem
from pipeline.kept_columns import kept_columns
from pipeline.schema import REPLACES_KEY, replaced_files
from pipeline.write import _remove_replaced, commit_file, output_files, to_output_table

log = logging.getLogger(__name__)

TARGET_FILE_MB = 128


@dataclass
class CompactStats:
    """What one compaction did."""

    files_before: int = 0   # readable data files found (replaced leftovers not counted)
    files_merged: int = 0   # of those, how many went into merged files
    files_written: int = 0  # merged files written
    rows: int = 0           # rows in the merged files
    unreadable: int = 0     # files left as they were because they could not be read


@dataclass(frozen=True)
class _File:
    path: str
    size: int
    schema: pa.Schema | None  # None: unreadable


def compact_output(output_uri: str, *, target_file_mb: float = TARGET_FILE_MB,
                   storage_options: Mapping[str, Any] | None = None, force: bool = False) -> CompactStats:
    """Compact `output_uri` under its lease (see the module docstring). Raises LeaseHeld when a run holds the
    output (unless `force`), LeaseLost when another run takes it over midway (what was merged stays valid)."""
    from pipeline.lease import Lease

    compaction_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}-compact"
    lease = Lease(output_uri, compaction_id, storage_options=storage_options, force=force)
    lease.acquire()
    try:
        return compact_files(output_uri, compaction_id, target_bytes=int(target_file_mb * 1024 * 1024),
                             storage_options=storage_options, before_commit=lease.confirm)
    finally:
        lease.release()


def compact_files(output_uri: str, compaction_id: str, *, target_bytes: int,
                  storage_options: Mapping[str, Any] | None = None,
                  before_commit: Callable[[], None] | None = None) -> CompactStats:
    """Merge the small files of `output_uri` (the caller holds the lease). New files are named
    `part-<compaction_id>-c<seq>.parquet`."""
    if target_bytes <= 0:
        raise ValueError(f"target file size must be positive, got {target_bytes} bytes")
    fs, root = filesystem(output_uri, storage_options)
    files = _list_with_schemas(fs, root)
    replaced = {name for f in files if f.schema is not None for name in replaced_files(f.schema)}
    for f in files:
        if os.path.basename(f.path) in replaced:
            _remove_replaced(fs, f.path)
    files = [f for f in files if os.path.basename(f.path) not in replaced]
    stats = CompactStats(files_before=sum(f.schema is not None for f in files),
                         unreadable=sum(f.schema is None for f in files))
    seq = 0
    for group in _groups([f for f in files if f.schema is not None], target_bytes):
        seq += 1
        stats.rows += _merge(fs, group, f"{os.path.dirname(group[0].path)}/part-{compaction_id}-c{seq:05d}.parquet",
                             before_commit)
        stats.files_merged += len(group)
        stats.files_written += 1
    return stats


def _list_with_schemas(fs: fsspec.AbstractFileSystem, root: str) -> list[_File]:
    paths = output_files(fs, root)
    sizes = {path: int(info.get("size") or 0) for path, info in fs.find(root, detail=True).items()} if paths else {}
    arrow_fs = arrow_filesystem(fs)

    def schema(path: str) -> pa.Schema | None:
        try:
            return pq.read_schema(path, filesystem=arrow_fs)
        except Exception as exc:
            log.warning("leaving unreadable output file %s as it is: %s: %s", path, type(exc).__name__, exc)
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        schemas = list(pool.map(schema, paths))
    return [_File(path, sizes.get(path, 0), s) for path, s in zip(paths, schemas)]


def _groups(files: list[_File], target_bytes: int) -> list[list[_File]]:
    """Files under the target, packed in name order into groups of about `target_bytes` (each of 2+ files),
    one folder and one set of kept columns per group."""
    by_kind: dict[tuple[str, tuple[str, ...]], list[_File]] = {}
    for f in files:
        if f.size < target_bytes and f.schema is not None:
            by_kind.setdefault((os.path.dirname(f.path), tuple(kept_columns(f.schema))), []).append(f)
    groups = []
    for members in by_kind.values():
        group: list[_File] = []
        total = 0
        for f in sorted(members, key=lambda f: f.path):
            if group and total + f.size > target_bytes:
                groups.append(group)
                group, total = [], 0
            group.append(f)
            total += f.size
        groups.append(group)
    return [g for g in groups if len(g) >= 2]


def _merge(fs: fsspec.AbstractFileSystem, group: list[_File], path: str,
           before_commit: Callable[[], None] | None) -> int:
    """Write the rows of `group` as one file at `path` (committed, naming the files it replaces), then delete
    the group's files. Returns the rows written."""
    arrow_fs = arrow_filesystem(fs)
    keep = kept_columns(group[0].schema) if group[0].schema is not None else ()
    tables = [to_output_table(pq.read_table(f.path, filesystem=arrow_fs), keep_columns=keep) for f in group]
    table = pa.concat_tables(tables)
    if before_commit is not None:
        before_commit()
    metadata = {REPLACES_KEY: json.dumps([os.path.basename(f.path) for f in group]).encode()}
    commit_file(fs, path, table, metadata)
    for f in group:
        try:
            fs.rm_file(f.path)
        except FileNotFoundError:
            pass
    return table.num_rows
