"""A record per run: `_runs/<run_id>.json` in the output, what img2dataset's `_stats.json` is to its shards.

A run that took the output's lease writes its record when it ends: `complete`, `stopped` (interrupted) or
`failed` (with the one-line reason). It holds the run id, start and end time, wall seconds, the counts of the
rows it wrote (by status and error kind), items/s, items/s per stage (pipeline/stage_stats.py), the model, the
tasks (name, file hash), the input URI with its number of files and a digest of the listing, the settings (no
storage credentials: only the endpoint is kept), and the versions of flamingo-annotate, torch, ray,
transformers and Python. A record is written like the output files: a local one under a hidden name, then
renamed; an S3 one in one PUT.

The records are for people and tools (`query` prints the last runs; `bench --pipeline` reads the stages); what
is done and what is left is the manifests' business (pipeline/manifest.py).
Readers of the annotations never see the records: they list only `.parquet` files outside `_`-folders
(`pipeline.write.output_files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from media.files import ListedFile
from media.storage import filesystem, is_local

log = logging.getLogger(__name__)

RUNS_FOLDER = "_runs"
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"
VERSIONED = ("flamingo-annotate", "torch", "ray", "transformers")
# Storage options that are safe to record; credentials (key, secret, token, ...) never are.
_RECORDED_STORAGE_OPTIONS = ("endpoint_url", "anon", "region_name")


def listing_digest(files: Sequence[ListedFile]) -> str:
    """sha256 of the listing (URI and size of every file): equal digests, same input."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.uri}\t{f.size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def recorded_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The storage options a record may hold: endpoint and region, never credentials."""
    return {key: options[key] for key in _RECORDED_STORAGE_OPTIONS if key in options}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_path(output_uri: str, run_id: str, storage_options: Mapping[str, Any] | None = None) -> str:
    _, root = filesystem(output_uri, storage_options)
    return f"{root.rstrip('/')}/{RUNS_FOLDER}/{run_id}.json"


def write_record(output_uri: str, record: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
                 ) -> str:
    """Write `record` (it has a `run_id`) atomically; returns its path."""
    fs, root = filesystem(output_uri, storage_options)
    path = f"{root.rstrip('/')}/{RUNS_FOLDER}/{record['run_id']}.json"
    data = (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode()
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)
    return path


def read_records(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every readable run record of the output, oldest first (run ids sort by start time). A record that
    cannot be read is skipped with a warning; no output or no records: []."""
    fs, root = filesystem(output_uri, storage_options)
    folder = f"{root.rstrip('/')}/{RUNS_FOLDER}"
    try:
        names = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json")
                       and not os.path.basename(p).startswith("."))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        try:
            record = json.loads(fs.cat_file(name))
            if isinstance(record, dict) and "run_id" in record:
                records.append(record)
        except Exception as exc:  # one bad record never stops a run
            log.warning("skipping unreadable run record %s: %s: %s", name, type(exc).__name__, exc)
    return sorted(records, key=lambda r: str(r["run_id"]))


def format_record(record: Mapping[str, Any]) -> str:
    """One line for a run: `RUN_ID complete 20 items (40 ok, 0 errors) in 61.2 s, 0.33 items/s`."""
    counts = record.get("counts") or {}
    line = (f"{record.get('run_id')} {record.get('status')} {counts.get('items', 0)} items "
            f"({counts.get('rows_ok', 0)} ok, {counts.get('rows_error', 0)} errors) "
            f"in {float(record.get('seconds') or 0):.1f} s, {float(record.get('items_per_second') or 0):.2f} items/s")
    if record.get("reason"):
        line += f": {record['reason']}"
    return line


def settings(config: Any) -> dict[str, Any]:
    """A JobConfig's settings as JSON values, tasks and storage credentials left out."""
    fields = dataclasses.asdict(config)
    fields.pop("tasks", None)
    fields["storage_options"] = recorded_storage_options(fields.get("storage_options") or {})
    return json.loads(json.dumps(fields, default=str))


def new_record(config: Any, run_id: str, files: Sequence[ListedFile]) -> dict[str, Any]:
    """The record of a run that starts now (`config`: its pipeline.job.JobConfig); `finish` completes it."""
    return {
        "run_id": run_id,
        "status": None,
        "reason": None,
        "started_at": utc_now(),
        "ended_at": None,
        "seconds": None,
        "model": config.model,
        "tasks": [{"name": t.name, "sha256": t.sha256, "path": t.path} for t in config.tasks],
        "task_hashes": {t.name: t.sha256 for t in config.tasks},
        "input": {"uri": config.input_uri, "files": len(files), "listing_sha256": listing_digest(files),
                  "items_seen": None},
        "output": config.output_uri,
        "read_all": False,
        "counts": {},
        "items_per_second": None,
        "stages": [],
        "settings": settings(config),
        "versions": versions(),
    }


def finish(record: dict[str, Any], status: str, seconds: float, *, summary: Any = None, reason: str | None = None,
           items_seen: int | None = None, read_all: bool = False,
           stages: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """`record` ended with `status`; `summary`: the run's pipeline.job.JobSummary when it got that far;
    `stages`: items/s per stage (pipeline/stage_stats.py)."""
    record.update(status=status, reason=reason, ended_at=utc_now(), seconds=round(seconds, 3), read_all=read_all,
                  stages=list(stages))
    record["input"]["items_seen"] = items_seen
    if summary is not None:
        record["counts"] = {"items": summary.items, "rows_ok": summary.rows_ok, "rows_error": summary.rows_error,
                            "rows_error_by_kind": dict(summary.rows_error_by_kind), "skipped": summary.skipped,
                            "superseded": summary.superseded, "transient_items": summary.transient_items}
        record["items_per_second"] = round(summary.items / seconds, 4) if seconds > 0 else None
    return record
