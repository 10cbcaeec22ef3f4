"""How many items an input holds, found without reading its media: what a dry run and a progress total need.

Per listed file (`media.files.list_files`):
  image / video file   1 item, from the listing alone
  img2dataset Parquet  the row count of its footer (one small read per file)
  WebDataset tar       the number of sample keys, from the member headers only (`tarfile` seeks past each
                       member's data). Cheap on a local disk; on object storage each member can cost a
                       ranged read, so remote shards are counted only while they add up to at most
                       `max_remote_tar_bytes`, and otherwise stay uncounted ("items counted when read").
  anything else        1 item (its error row)

A file that cannot be counted (unreadable, corrupt) is left uncounted too: the count never guesses. Keys are
grouped as the reader groups them (`media.files` rule: a key is everything up to the basename's first dot,
samples are runs of members with the same key), so the count equals the rows the reader gives for a sound
shard.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from media.files import PARQUET_EXTENSION, TAR_EXTENSION, ListedFile
from media.storage import filesystem, is_local

MAX_REMOTE_TAR_BYTES = 256 * 1024 * 1024  # remote tar shards are counted while they add up to no more than this
_THREADS = 16


@dataclass(frozen=True)
class FileCount:
    uri: str
    kind: str          # "file" (an image, video or other single file), "tar" or "parquet"
    items: int | None  # None: not counted (see the module docstring)


def count_items(files: Sequence[ListedFile], storage_options: Mapping[str, Any] | None = None, *,
                max_remote_tar_bytes: int = MAX_REMOTE_TAR_BYTES, read: bool = True,
                stop: threading.Event | None = None) -> list[FileCount]:
    """The item count of every file of `files`, in the same order (see the module docstring). Without `read`,
    only what the listing tells (plain files) is counted and shards stay uncounted, at no cost per shard. Once
    `stop` is set, the files not yet counted are left uncounted: a count beside a job ends soon after the job."""
    remote_tar_bytes = 0
    jobs: list[tuple[ListedFile, str, bool]] = []
    for f in files:
        kind = file_kind(f.uri)
        count_it = read
        if kind == TAR_EXTENSION and not _is_local_uri(f.uri, storage_options):
            remote_tar_bytes += f.size or 0
            count_it = count_it and f.size is not None and remote_tar_bytes <= max_remote_tar_bytes
        jobs.append((f, kind, count_it))

    def count(job: tuple[ListedFile, str, bool]) -> FileCount:
        f, kind, count_it = job
        if kind == "file":
            return FileCount(f.uri, kind, 1)
        if not count_it or (stop is not None and stop.is_set()):
            return FileCount(f.uri, kind, None)
        try:
            return FileCount(f.uri, kind, _tar_keys(f.uri, storage_options) if kind == TAR_EXTENSION
                             else _parquet_rows(f.uri, storage_options))
        except Exception:  # an unreadable file is counted when read (it becomes error rows then)
            return FileCount(f.uri, kind, None)

    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return list(pool.map(count, jobs))


def file_kind(uri: str) -> str:
    """`tar`, `parquet` or `file`, from the name."""
    extension = uri.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    return extension if extension in (TAR_EXTENSION, PARQUET_EXTENSION) else "file"


def _is_local_uri(uri: str, storage_options: Mapping[str, Any] | None) -> bool:
    return is_local(filesystem(uri, storage_options)[0])


def _parquet_rows(uri: str, storage_options: Mapping[str, Any] | None) -> int:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as raw:
        return int(pq.ParquetFile(raw).metadata.num_rows)


def _tar_keys(uri: str, storage_options: Mapping[str, Any] | None) -> int:
    """Samples in a WebDataset shard: runs of members with the same key, from the headers alone."""
    fs, path = filesystem(uri, storage_options)
    samples, key = 0, None
    with fs.open(path, "rb") as raw, \
            tarfile.open(fileobj=raw, mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # type: ignore[attr-defined]  # keep memory flat on large shards
            if member.isdir():
                continue
            directory, _, base = member.name.rpartition("/")
            member_key = f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]
            if member_key != key:
                samples, key = samples + 1, member_key
    return samples
