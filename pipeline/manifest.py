"""Resume by input unit: a manifest per finished input file, so that what a run knows about the output grows with
the number of shards, never with the number of items.

What a manifest is. A small JSON object saying that one input unit (a listed file: a WebDataset tar, an
img2dataset Parquet shard, or a plain image / video file) is finished for one task set: every item of it has a
row for every task in the output. It holds the unit's URI and size, the task names and file hashes, the
`--sample` fraction, the run id that finished it, its item count and its rows per task by status (`ok`, or
the error kind). A unit whose size changed since has another key, so a rewritten shard is done again.

Where. `OUTPUT/_manifests/<task set>/<unit key>-<run id>-<items>-<transient>-<other errors>.json`: the task
set is a digest of the task names, hashes and sample fraction; the unit key a digest of the URI and size; the
last three numbers are the unit's item count and its error rows to re-attempt: the most transient error rows,
and the most error rows of another kind, that any one task has there. Everything a rerun decides on is in the
name, so it lists the folder (one LIST request per 1,000 units on S3: ~100 requests at 10^5 shards) and reads
no manifest's body. Readers of the annotations never see the folder (a `_` folder; pyarrow and Spark skip it
too).

When. The driver writes a unit's manifest after the output files holding the last of that unit's rows are
committed, never before: the read task that read the unit reports (to a `UnitLedger` actor) how many rows the
unit gives this run, and the driver counts the unit's rows in every file it commits. A local manifest is
written under a hidden name and renamed, an S3 one is one PUT. A run killed between the rows and the manifest
leaves a unit without manifest: the next run reads it again and finds its rows (below), so nothing is written
twice or lost. A unit that re-attempts error rows gets its manifest only after the rows it superseded are
rewritten out of their files (`pipeline.write.drop_rows`), so a manifest never stands for a unit that still
holds a superseded row.

How resume uses it. A run lists the manifests of its task set and the input. A unit with a manifest that has
no error rows to re-attempt (transient ones; with `--retry-errors`, any) is skipped entirely: not read, not
counted (its item count comes from the name). Every other unit -- new, half done by a stopped run, re-opened
for its error rows, or in an output written before manifests existed -- is read again, and its read task
(pipeline/read.py, on a worker) reads that unit's own rows from the output: the `source` column of the files
that hold the unit, which every committed file names in its Parquet metadata (`pipeline.write.UNITS_KEY`;
files written before that are searched by every such unit). Items done for every task are dropped there,
items done for some tasks carry the names of those tasks (`done_tasks`), and the generation actors annotate
them for the other tasks only. The driver only ever holds per-unit state: the listing, the manifest names, the
files that hold each unfinished unit, and counters for the units in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from media.errors import INPUT, MODEL, TRANSIENT
from media.files import ListedFile
from media.storage import decode_name, encode_name, filesystem, is_local
from pipeline.schema import ERROR_COLUMN, ERROR_KIND_COLUMN, SOURCE_COLUMN, TASK_COLUMN, infer_error_kind

log = logging.getLogger(__name__)

MANIFESTS_FOLDER = "_manifests"
OK = "ok"


def unit_uri(uri: str) -> str:
    """A listed file's URI as the rows' `source` column writes it (`media.files.file_rows` normalises it so)."""
    return encode_name(decode_name(uri))


def task_set_key(task_hashes: Mapping[str, str], sample: float | None) -> str:
    """The folder of a task set's manifests: the same tasks (names and hashes) and sample, the same folder."""
    text = json.dumps({"tasks": sorted(task_hashes.items()), "sample": sample})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unit_key(uri: str, size: int | None) -> str:
    """A unit's key: its URI and size. A shard rewritten with another size is another unit."""
    return hashlib.sha256(f"{unit_uri(uri)}\t{size}".encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True)
class UnitState:
    """What a manifest's name says about its unit."""

    name: str        # the manifest's file name
    key: str
    run_id: str
    items: int       # items the unit gave (with `--sample`: those in the sample)
    transient: int   # the most transient error rows any one task has in the unit
    failed: int      # the most error rows of another kind (input, model) any one task has in the unit

    def retryable(self, retry_errors: bool) -> int:
        """Items (at least) with error rows that a run re-attempts."""
        return self.transient + (self.failed if retry_errors else 0)

    @classmethod
    def parse(cls, name: str) -> UnitState | None:
        stem = name.removesuffix(".json")
        parts = stem.split("-")
        if not name.endswith(".json") or len(parts) < 5 or not all(p.isdigit() for p in parts[-3:]):
            return None
        return cls(name, parts[0], "-".join(parts[1:-3]), int(parts[-3]), int(parts[-2]), int(parts[-1]))


def manifest_folder(output_uri: str, task_hashes: Mapping[str, str], sample: float | None,
                    storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = filesystem(output_uri, storage_options)
    return fs, f"{root.rstrip('/')}/{MANIFESTS_FOLDER}/{task_set_key(task_hashes, sample)}"


def list_manifests(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, UnitState]:
    """Unit key -> the newest manifest of the task set's folder (names only; no body is read)."""
    fs.invalidate_cache(folder)  # s3fs keeps listings: a rerun in the same process must see the folder as it is
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return {}
    found: dict[str, UnitState] = {}
    for path in names:
        name = os.path.basename(path.rstrip("/"))
        state = None if name.startswith(".") else UnitState.parse(name)
        if state is not None and (state.key not in found or state.run_id > found[state.key].run_id):
            found[state.key] = state
    return found


def finished_units(files: Iterable[ListedFile], manifests: Mapping[str, UnitState]) -> dict[str, UnitState]:
    """Listed file URI -> its manifest, for the listed files that have one (with error rows to re-attempt or
    not: `UnitState.retryable`)."""
    return {f.uri: manifests[key] for f in files if (key := unit_key(f.uri, f.size)) in manifests}


def write_manifest(fs: fsspec.AbstractFileSystem, folder: str, body: Mapping[str, Any], state: UnitState,
                   replaces: str | None = None) -> None:
    """Write one manifest atomically (hidden name then rename locally; one PUT on S3), then delete the one it
    replaces (an older manifest of the same unit, whose error rows this run re-attempted)."""
    path = f"{folder}/{state.name}"
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
    if is_local(fs):
        os.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{state.name}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)
    if replaces and replaces != state.name:
        try:
            fs.rm_file(f"{folder}/{replaces}")
        except FileNotFoundError:
            pass


def row_status(error: str | None, kind: str | None) -> str:
    """`ok`, or an error row's kind (inferred from the text for rows written before kinds existed)."""
    return OK if error is None else (kind or infer_error_kind(error))


def is_retried(status: str, retry_errors: bool) -> bool:
    """Whether a row of this status is re-attempted (the resume rules in pipeline/write.py)."""
    return status != OK and (retry_errors or status not in (INPUT, MODEL))


# --- the read tasks' reports, gathered by a small actor ----------------------------------------------------------

class UnitLedger:
    """A Ray actor (no CPU) that read tasks report their units to; the driver takes the reports as it commits.

    `opened(unit, ...)` comes before the unit's first row is handed on (so the driver knows the error rows the
    unit re-attempts before any of its new rows reach the writer); `read(unit, rows, ...)` after its last,
    with the number of output rows the unit gives this run. A read task that Ray runs again reports again; the
    last report of a unit wins."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, dict[str, Any]]] = []

    def opened(self, unit: str, report: dict[str, Any]) -> None:
        self._events.append(("opened", unit, report))

    def read(self, unit: str, report: dict[str, Any]) -> None:
        self._events.append(("read", unit, report))

    def take(self) -> list[tuple[str, str, dict[str, Any]]]:
        events, self._events = self._events, []
        return events


@dataclass
class _Unit:
    listed: ListedFile
    rows: int = 0                                                     # rows of it committed this run
    counts: dict[str, Counter[str]] = field(default_factory=dict)     # task -> status -> rows (prior + new)
    expected: int | None = None                                       # rows it gives this run (read report)
    items: int = 0                                                    # items it holds (read report)
    dirty: bool = False                                               # it has error rows to supersede
    opened: bool = False                                              # its read task reported its prior rows


class ManifestTracker:
    """The driver's side: counts the committed rows of the units read this run and writes each unit's manifest
    once all of them are committed (see the module docstring). State is per unit in flight."""

    def __init__(self, output_uri: str, task_hashes: Mapping[str, str], sample: float | None, run_id: str,
                 files: Iterable[ListedFile], *, ledger: Any = None, previous: Mapping[str, UnitState] | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        self.fs, self.folder = manifest_folder(output_uri, task_hashes, sample, storage_options)
        self.task_hashes, self.sample, self.run_id, self.ledger = dict(task_hashes), sample, run_id, ledger
        self.units = {unit_uri(f.uri): _Unit(f) for f in files}
        self.previous = {unit_uri(uri): state.name for uri, state in (previous or {}).items()}
        self.retry: dict[tuple[str, str], set[str]] = {}   # (task, id) re-attempted -> files holding its row
        self.stale: dict[str, set[tuple[str, str]]] = {}   # file -> (task, id) superseded already
        self.watch: set[tuple[str, str]] = set()           # keys whose new rows supersede an error row
        self.skipped = 0                                   # items the read tasks found done for every task
        self.written = 0                                   # manifests written
        self.stats: Any = None                             # the writer's pipeline.write.WriteStats, to settle
        self._pending: set[str] = set()                    # units read to the end, manifest not written yet

    def pull(self) -> None:
        """Take the read tasks' reports (called before every commit, so a unit's `opened` report is known before
        any of its rows is counted); write the manifests of units that became complete."""
        if self.ledger is None:
            self._write_complete()
            return
        import ray

        for event, unit, report in ray.get(self.ledger.take.remote(), timeout=120):
            self.receive(event, unit, report)
        self._write_complete()

    def receive(self, event: str, unit: str, report: Mapping[str, Any]) -> None:
        """One report of a read task, as `UnitLedger` keeps them (`opened` or `read`)."""
        state = self.units.get(unit)
        if state is None:
            return
        if event == "opened":
            if not state.opened:  # a read task that Ray runs again reports the same prior rows again
                state.counts = {task: Counter(counts) for task, counts in report["prior"].items()}
                state.opened = True
            for task, item_id, file in report["retry"]:
                self.retry.setdefault((task, item_id), set()).add(file)
                self.watch.add((task, item_id))
            for task, item_id, file in report["stale"]:
                self.stale.setdefault(file, set()).add((task, item_id))
            state.dirty = state.dirty or bool(report["retry"] or report["stale"])
        else:
            state.expected, state.items = report["rows"], report["items"]
            self.skipped += report["skipped"]
            self._pending.add(unit)

    def committed(self, table: pa.Table) -> None:
        """Count the rows of a committed file by unit and status."""
        sources = table.column(SOURCE_COLUMN)
        tasks, errors, kinds = (table.column(c) for c in (TASK_COLUMN, ERROR_COLUMN, ERROR_KIND_COLUMN))
        grouped = pa.table({"s": sources, "t": tasks, "ok": pc.is_null(errors), "k": kinds}) \
            .group_by(["s", "t", "ok", "k"]).aggregate([([], "count_all")])
        for source, task, ok, kind, n in zip(*(grouped.column(c).to_pylist() for c in ("s", "t", "ok", "k",
                                                                                          "count_all"))):
            state = self.units.get(source)
            if state is None:
                continue
            state.rows += n
            state.counts.setdefault(task, Counter())[OK if ok else (kind or INPUT)] += n
        self._write_complete()

    def finish(self) -> None:
        """After the last commit: the last reports, and the manifests of clean units they complete."""
        self.pull()
        self._write_complete()

    def superseded(self, written_keys: set[tuple[str, str]]) -> dict[str, set[tuple[str, str]]]:
        """File -> (task, id) error rows to rewrite out of it: re-attempted ones this run wrote a row for (by
        item, or by source for a shard that had failed as a whole), and those superseded already."""
        by_file = {file: set(keys) for file, keys in self.stale.items()}
        for key, files in self.retry.items():
            if key in written_keys:
                for file in files:
                    by_file.setdefault(file, set()).add(key)
        return by_file

    def write_dirty(self) -> None:
        """The manifests of complete units that re-attempted error rows: call once those are rewritten away."""
        self._write_complete(dirty=True)

    def _write_complete(self, dirty: bool = False) -> None:
        for uri in sorted(self._pending):
            state = self.units[uri]
            if state.expected is None or (state.dirty and not dirty) or state.rows < state.expected:
                continue
            self._pending.discard(uri)
            if state.rows > state.expected:  # a read task run twice by Ray: the next run looks at the unit again
                log.warning("%s: %d rows committed, %d expected; no manifest", uri, state.rows, state.expected)
                continue
            self._write(uri, state)

    def _write(self, uri: str, state: _Unit) -> None:
        rows = {task: dict(counts) for task, counts in sorted(state.counts.items())}
        transient = max((c.get(TRANSIENT, 0) for c in state.counts.values()), default=0)
        failed = max((sum(n for s, n in c.items() if s not in (OK, TRANSIENT)) for c in state.counts.values()),
                     default=0)
        key = unit_key(state.listed.uri, state.listed.size)
        name = f"{key}-{self.run_id}-{state.items}-{min(transient, state.items)}-{min(failed, state.items)}.json"
        body = {"unit": uri, "size": state.listed.size, "tasks": self.task_hashes, "sample": self.sample,
                "run_id": self.run_id, "items": state.items, "rows": rows}
        write_manifest(self.fs, self.folder, body, UnitState.parse(name) or _never(name),
                       replaces=self.previous.get(uri))
        self.written += 1
        if self.stats is not None:
            self.stats.settle(uri)


def _never(name: str) -> UnitState:
    raise ValueError(f"bad manifest name {name}")
