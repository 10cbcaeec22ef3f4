"""What a run would do, known before Ray starts: items in the input, how many the output already holds, how
many are left -- for `--dry-run`, for the progress line's total, and to stop at once when nothing is left.

Items are counted cheaply (media/count.py: the listing, Parquet footers, tar member headers; remote tar shards
only while that stays cheap). The output's state comes from `pipeline.write.scan_output`. An item is left to
do unless the output holds a row for it for every task (same task hash) that is not an error to re-attempt.

Nothing to do: every listed file's items are done for every task and no error row of a listed file is to be
re-attempted. When some shards could not be counted cheaply, the last complete run's record decides
(pipeline/runs.py): the same listing (digest), the same tasks, it read its whole input, and the output holds
at least as many done items of the listing as it saw.

Sampling (`--sample`) keeps an item when a hash of its id falls below the fraction, so every run picks the
same items and resume works; `--limit` caps the items one run annotates.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from media.count import FileCount
from media.files import file_prefixes
from media.storage import decode_name, filesystem, is_local

_HASH_SPACE = 2**64


def in_sample(item_id: str, fraction: float) -> bool:
    """Whether `item_id` is in the `fraction` sample: the same answer on every run and machine."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _HASH_SPACE


@dataclass(frozen=True)
class JobPlan:
    input_uri: str
    counts: tuple[FileCount, ...]   # per listed file
    done: Mapping[str, int]         # task -> items of the listing done for that task
    done_everywhere: int            # items of the listing done for every task
    retry: int                      # error rows of listed files the run re-attempts
    sample: float | None = None
    limit: int | None = None
    done_ids: int = 0               # ids done for every task that belong to listed files (a resume skips them)

    @property
    def files(self) -> int:
        return len(self.counts)

    @property
    def uncounted(self) -> int:
        """Files whose items are counted only when read."""
        return sum(c.items is None for c in self.counts)

    @property
    def items(self) -> int | None:
        """Items in the listing; None when some files are uncounted."""
        return None if self.uncounted else sum(c.items or 0 for c in self.counts)

    @property
    def new(self) -> int | None:
        """Items the output does not hold for every task; None when unknown."""
        return None if self.items is None else max(self.items - self.done_everywhere, 0)

    @property
    def to_do(self) -> int | None:
        """Items this run would annotate (the sample of a container's items is estimated); None when unknown."""
        new = self.new
        if new is None:
            return self.limit
        if self.sample is not None:
            new = round(new * self.sample)
        return new if self.limit is None else min(new, self.limit)

    def kinds(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for c in self.counts:
            found[c.kind] = found.get(c.kind, 0) + 1
        return found


def make_plan(input_uri: str, counts: Sequence[FileCount], done: Mapping[str, set[str]],
              retry_ids: Iterable[str], *, sample: float | None = None, limit: int | None = None) -> JobPlan:
    """The plan from the item counts and the output's scan (`done`: task -> ids; `retry_ids`: ids of error rows
    to re-attempt). With `sample`, plain files outside the sample are left out (their id is their URI)."""
    if sample is not None:
        counts = [c for c in counts if c.kind != "file" or in_sample(c.uri, sample)]
    owners = _Owners(c.uri for c in counts)
    everywhere = set.intersection(*map(set, done.values())) if done else set()
    by_file = owners.count(everywhere)
    done_everywhere = sum(min(n, c.items) if c.items is not None else n
                          for c in counts for n in [by_file.get(c.uri, 0)])
    per_task = {task: sum(owners.count(ids).values()) for task, ids in done.items()}
    retry = sum(owners.count(set(retry_ids)).values())
    return JobPlan(input_uri, tuple(counts), per_task, done_everywhere, retry, sample, limit,
                   done_ids=sum(by_file.values()))


def nothing_to_do(plan: JobPlan, last_complete: Mapping[str, Any] | None, listing_sha256: str,
                  task_hashes: Mapping[str, str]) -> bool:
    """Whether the output already holds everything this run would do (see the module docstring)."""
    if plan.retry:
        return False
    if plan.new == 0:
        return True
    sampled_shards = plan.sample is not None and any(c.kind != "file" for c in plan.counts)
    if (plan.new is not None and not sampled_shards) or last_complete is None:
        return False  # counted and something is left; or nothing to tell from
    same = (last_complete.get("input", {}).get("listing_sha256") == listing_sha256
            and last_complete.get("task_hashes") == dict(task_hashes)
            and last_complete.get("read_all") is True
            and last_complete.get("settings", {}).get("sample") == plan.sample)
    seen = last_complete.get("input", {}).get("items_seen")
    return bool(same and isinstance(seen, int) and plan.done_everywhere >= seen)


def check_writable(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise unless the output can be written, leaving nothing behind: a hidden probe object written and
    deleted (S3: also proves the credentials); a local folder that does not exist yet is not created, its
    nearest existing parent must be writable."""
    fs, root = filesystem(output_uri, storage_options)
    if is_local(fs):
        folder = root
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
        return
    probe = f"{root.rstrip('/')}/.write-check-{secrets.token_hex(4)}"
    fs.pipe_file(probe, b"")
    fs.rm_file(probe)


class _Owners:
    """Finds the listed file an item id belongs to: the file itself (a plain file, or a shard that failed as
    a whole) or the shard before a `::` (ids are compared as names, as `decode_name` gives them)."""

    def __init__(self, uris: Iterable[str]):
        self._by_name = {decode_name(uri): uri for uri in uris}

    def owner(self, item_id: str) -> str | None:
        name = decode_name(item_id)
        if name in self._by_name:
            return self._by_name[name]
        return next((self._by_name[prefix] for prefix in file_prefixes(name) if prefix in self._by_name), None)

    def count(self, ids: Iterable[str]) -> dict[str, int]:
        """Listed file -> how many of `ids` belong to it."""
        found: dict[str, int] = {}
        for item_id in ids:
            owner = self.owner(item_id)
            if owner is not None:
                found[owner] = found.get(owner, 0) + 1
        return found
