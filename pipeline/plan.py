"""What a run would do, known before Ray starts: items in the input, how many the output already holds, how
many are left -- for `--dry-run`, for the progress line's total, and to stop at once when nothing is left.

The output's state comes from its manifests (pipeline/manifest.py), one per finished input file, found by
listing their folder: a finished file's items are done, less those with error rows to re-attempt, and its
item count is in its manifest's name. The other files' items are counted cheaply (media/count.py: the listing,
Parquet footers, tar member headers; remote tar shards only while that stays cheap); what the output holds of
them (a run stopped midway) is found by the run's read tasks, so the plan counts them as new: a total that errs
on the high side, never by reading item ids.

Nothing to do: every listed file has a manifest and none of them has error rows to re-attempt.

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
from media.storage import filesystem, is_local
from pipeline.manifest import UnitState

_HASH_SPACE = 2**64


def in_sample(item_id: str, fraction: float) -> bool:
    """Whether `item_id` is in the `fraction` sample: the same answer on every run and machine."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _HASH_SPACE


@dataclass(frozen=True)
class JobPlan:
    input_uri: str
    counts: tuple[FileCount, ...]   # per listed file
    done: Mapping[str, int]         # task -> items of the finished files done for that task
    done_everywhere: int            # items of the finished files done for every task
    retry: int                      # error rows of finished files the run re-attempts
    sample: float | None = None
    limit: int | None = None
    done_ids: int = 0               # items of finished files done for every task (a resume skips them)
    unfinished: int = 0             # listed files without a manifest (a run reads them)

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


def make_plan(input_uri: str, counts: Sequence[FileCount], finished: Mapping[str, UnitState],
              tasks: Iterable[str], *, retry_errors: bool = False, sample: float | None = None,
              limit: int | None = None) -> JobPlan:
    """The plan from the item counts of the listed files (`counts`; a finished file's from its manifest) and
    the manifests of the finished ones (`finished`: listed URI -> manifest). With `sample`, plain files outside
    the sample are left out (their id is their URI)."""
    if sample is not None:
        counts = [c for c in counts if c.kind != "file" or in_sample(c.uri, sample)]
    done = retry = unfinished = 0
    for c in counts:
        state = finished.get(c.uri)
        if state is None:
            unfinished += 1
        else:
            retry += state.retryable(retry_errors)
            done += max(state.items - state.retryable(retry_errors), 0)
    return JobPlan(input_uri, tuple(counts), {task: done for task in tasks}, done, retry, sample, limit,
                   done_ids=done, unfinished=unfinished)


def nothing_to_do(plan: JobPlan) -> bool:
    """Whether the output already holds everything this run would do (see the module docstring)."""
    return plan.unfinished == 0 and plan.retry == 0


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
