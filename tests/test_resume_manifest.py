"""Resume by manifest (pipeline/manifest.py): a rerun skips finished shards without reading them, re-reads the
others and leaves out their done items on the workers, never holds item ids in the driver, and starts about as
fast over an output of many finished shards as over an empty one. The runs are real (tiny model, the session's
local Ray); manifests on S3 go through moto."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from sample_media import image_bytes, tar_bytes

import pipeline.write
from media import count
from media.files import ListedFile, list_files
from pipeline.generate import AnnotatorSpec
from pipeline.job import JobConfig, plan_job, run_job
from pipeline.manifest import MANIFESTS_FOLDER, ManifestTracker, list_manifests, manifest_folder, unit_key, unit_uri
from pipeline.task import load_tasks
from pipeline.write import UNITS_KEY, OutputWriter

TASK = """name: caption
demonstrations:
  - {media: demo.png, text: "a shape."}
query: "Output:"
generation: {max_new_tokens: 2}
"""


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("task")
    (folder / "demo.png").write_bytes(image_bytes((220, 20, 20)))
    (folder / "caption.yaml").write_text(TASK)
    return [str(folder / "caption.yaml")]


def config(task_files: list[str], input_uri: str, output_uri: str, **options: Any) -> JobConfig:
    return JobConfig(load_tasks(task_files), input_uri, output_uri, model="tiny-random", progress=False, **options)


def shard(path: Path, *names: str, bad: str | None = None) -> None:
    """A WebDataset shard of small pictures; `bad`: one more sample whose picture is not a picture."""
    members = [(f"{name}.png", image_bytes((40 * i % 256, 90, 200))) for i, name in enumerate(names)]
    path.write_bytes(tar_bytes(members + ([(f"{bad}.png", b"not a picture")] if bad else [])))


def rows(output: Path) -> pd.DataFrame:
    return pq.read_table(output).to_pandas()  # as any reader sees the folder


def manifests_by_unit(output: Path) -> dict[str, Path]:
    """Input file URI -> the path of its manifest (read from the bodies; the job itself never reads them)."""
    return {json.loads(p.read_text())["unit"]: p for p in (output / MANIFESTS_FOLDER).glob("*/*.json")}


def strip_unit_names(output: Path) -> None:
    """Rewrite every output file without UNITS_KEY, as files were written before it existed."""
    for path in output.glob("part-*.parquet"):
        table = pq.read_table(path)
        metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != UNITS_KEY}
        pq.write_table(table.replace_schema_metadata(metadata), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)


def committed_run(output: str, run_id: str, task_hash: str, rows_by_file: dict[ListedFile, list[dict[str, Any]]],
                  flush_rows: int = 10_000) -> None:
    """The output a run leaves when it finished the files of `rows_by_file`: their rows committed by the job's
    writer, and the manifests its tracker writes once each file's rows are committed, fed the reports that read
    tasks send (pipeline/read.py)."""
    tracker = ManifestTracker(output, {"caption": task_hash}, None, run_id, list(rows_by_file))
    writer = OutputWriter(output, run_id, flush_rows=flush_rows, before_commit=tracker.pull,
                          after_commit=tracker.committed, watch=tracker.watch)
    for f, items in rows_by_file.items():
        unit = unit_uri(f.uri)
        tracker.receive("opened", unit, {"retry": [], "stale": [], "prior": {}})
        writer.write(pa.Table.from_pylist([
            {"id": f"{unit}::{item['key']}", "source": unit, "task": "caption", "task_hash": task_hash, "model": "m",
             "annotation": None if item.get("error") else "a shape.", "score": None if item.get("error") else -1.0,
             "label_scores": None, "error": item.get("error"), "error_kind": item.get("kind"), "seconds": 0.1}
            for item in items]))
        tracker.receive("read", unit, {"rows": len(items), "items": len(items), "skipped": 0})
    writer.close()
    tracker.finish()
    assert tracker.written == len(rows_by_file)


@pytest.fixture(scope="module")
def resumed(ray_session: None, task_files: list[str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An output that holds shards a, b and d, finished (d has an item that failed as `input`); then a is
    overwritten with as many bytes of garbage (reading it would give an error row), a new shard c is added, b's
    manifest is deleted (a run killed between committing b's rows and its manifest) and the output files lose
    their unit names (written before those existed). Then the same command runs for real, its driver guarded."""
    root = tmp_path_factory.mktemp("resume")
    source, out = root / "in", root / "out"
    source.mkdir()
    shard(source / "a.tar", "a1", "a2")
    shard(source / "b.tar", "b1", "b2")
    shard(source / "d.tar", "d1", bad="d2")
    listed = {Path(f.uri).stem: f for f in list_files(str(source))}
    committed_run(str(out), "20261201T000000Z-aaaaaa", load_tasks(task_files)[0].sha256, {
        listed["a"]: [{"key": "a1"}, {"key": "a2"}], listed["b"]: [{"key": "b1"}, {"key": "b2"}],
        listed["d"]: [{"key": "d1"}, {"key": "d2", "error": "cannot decode image: x", "kind": "input"}]})
    before = rows(out)
    manifests = manifests_by_unit(out)
    (source / "a.tar").write_bytes(b"\0" * (source / "a.tar").stat().st_size)
    shard(source / "c.tar", "c1", "c2")
    manifests[str(source / "b.tar")].unlink()
    strip_unit_names(out)
    guard = pytest.MonkeyPatch()
    reads: list[Any] = []
    try:
        for name in ("scan_output", "existing_ids", "read_files"):
            guard.setattr(pipeline.write, name, lambda *a, **k: pytest.fail("the driver read item ids"))
        read_table = pq.read_table
        guard.setattr(pq, "read_table", lambda *a, **k: reads.append(a) or read_table(*a, **k))
        second = run_job(config(task_files, str(source), str(out)))
    finally:
        guard.undo()
    return SimpleNamespace(source=source, out=out, second=second, before=before, after=rows(out),
                           driver_reads=reads)


def test_a_finished_shard_is_not_read_again(resumed: Any) -> None:
    # a.tar is garbage now: had the run read it, there would be an error row from it
    mine = resumed.after[resumed.after.run_id == resumed.second.run_id]
    assert set(mine.source) == {str(resumed.source / "c.tar")}
    assert set(mine.id) == {f"{resumed.source}/c.tar::c1", f"{resumed.source}/c.tar::c2"}
    assert mine.error.isna().all() and resumed.second.items == 2


def test_an_unfinished_shard_is_filtered_on_the_workers_and_gets_its_manifest(resumed: Any) -> None:
    """b (rows committed, no manifest, files without unit names) is read again and yields nothing new."""
    assert not resumed.after.duplicated(["id", "task"]).any()
    assert len(resumed.after) == len(resumed.before) + 2
    assert resumed.second.skipped == 6  # a and d by their manifests, b's two items on the workers
    assert str(resumed.source / "b.tar") in manifests_by_unit(resumed.out)


def test_the_driver_never_reads_item_ids(resumed: Any) -> None:
    assert resumed.driver_reads == []  # not one Parquet column: footers and manifest names only
    assert {f.name for f in AnnotatorSpec.__dataclass_fields__.values()} == {
        "model", "trust_remote_code", "tasks", "device", "dtype", "storage_options"}  # no id sets for actors


def test_manifests_decide_nothing_to_do_and_what_retry_errors_reopens(resumed: Any, task_files: list[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    again = run_job(config(task_files, str(resumed.source), str(resumed.out)))
    assert again.nothing_to_do.startswith(f"all 8 items of {resumed.source}")  # every shard has its manifest
    plan = plan_job(config(task_files, str(resumed.source), str(resumed.out), retry_errors=True))
    assert (plan.retry, plan.unfinished, plan.done_everywhere, plan.to_do) == (1, 0, 7, 1)  # d, from its name


# --- start-up over many finished shards, without Ray ------------------------------------------------------------

SHARDS, ITEMS_PER_SHARD = 200, 50


class _Started(Exception):
    """Raised where the job would start Ray: what the driver did before is its start-up."""


def test_a_resume_over_many_finished_shards_starts_as_fast_as_a_fresh_run(
        task_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "in"
    source.mkdir()
    member = image_bytes((1, 2, 3), size=(4, 4))
    for s in range(SHARDS):
        (source / f"{s:05d}.tar").write_bytes(tar_bytes([(f"{i:04d}.png", member) for i in range(ITEMS_PER_SHARD)]))
    cfg = config(task_files, str(source), str(tmp_path / "fresh"))
    files = list_files(str(source))
    committed_run(str(tmp_path / "done"), "20261201T000000Z-aaaaaa", cfg.tasks[0].sha256,
                  {f: [{"key": f"{i:04d}"} for i in range(ITEMS_PER_SHARD)] for f in files[:-1]}, flush_rows=4_000)
    counted: list[str] = []
    tar_keys = count._tar_keys
    monkeypatch.setattr(count, "_tar_keys", lambda uri, options: counted.append(uri) or tar_keys(uri, options))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def started(*args: object, **kwargs: object) -> None:
        raise _Started()

    monkeypatch.setattr(ray, "init", started)

    def start(output: str, trace: bool = False) -> tuple[float, int]:
        """Seconds to the point where Ray would start; with `trace`, the peak of traced memory instead."""
        if trace:
            tracemalloc.start()
        began = time.perf_counter()
        with pytest.raises(_Started):
            run_job(config(task_files, str(source), output))
        seconds = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
        return seconds, peak

    start(str(tmp_path / "warm-up"))  # imports (torch, the model's config) are paid once, here
    fresh = min(start(str(tmp_path / f"fresh{i}"))[0] for i in range(2))
    fresh_peak = start(str(tmp_path / "fresh-traced"), trace=True)[1]
    counted.clear()
    with monkeypatch.context() as guard:
        for name in ("scan_output", "existing_ids", "read_files"):
            guard.setattr(pipeline.write, name, lambda *a, **k: pytest.fail("the driver read item ids"))
        read_table = pq.read_table
        guard.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the driver read a Parquet column"))
        done = min(start(str(tmp_path / "done"))[0] for _ in range(2))
        done_peak = start(str(tmp_path / "done"), trace=True)[1]
    print(f"start-up over {SHARDS - 1} finished shards ({(SHARDS - 1) * ITEMS_PER_SHARD} items) vs fresh: "
          f"{done:.3f} s / {fresh:.3f} s = {done / fresh:.2f}x time, "
          f"{done_peak / 2**20:.1f} / {fresh_peak / 2**20:.1f} MiB = {done_peak / fresh_peak:.2f}x peak traced memory")
    assert counted == []  # no shard is opened to be counted before the job starts (the count runs beside it)
    assert done < 3 * fresh and done_peak < 3 * fresh_peak
    assert read_table is pq.read_table


# --- manifests on S3 --------------------------------------------------------------------------------------------

def test_a_manifest_appears_only_once_its_rows_are_committed_on_s3(s3: Any) -> None:
    bucket = s3.new_bucket()
    output, run_id = f"s3://{bucket}/out", "20261201T000000Z-bbbbbb"
    files = [ListedFile(f"s3://{bucket}/in/a.tar", 10), ListedFile(f"s3://{bucket}/in/b.tar", 20)]
    tracker = ManifestTracker(output, {"t": "h"}, None, run_id, files)
    writer = OutputWriter(output, run_id, flush_rows=2, flush_seconds=3600, before_commit=tracker.pull,
                          after_commit=tracker.committed, watch=tracker.watch)
    tracker.stats = writer.stats  # a finished unit's ids are counted, then forgotten
    fs, folder = manifest_folder(output, {"t": "h"}, None)

    def row(item_id: str, error: str | None = None) -> pa.Table:
        return pa.Table.from_pylist([{"id": item_id, "source": item_id.split("::")[0], "task": "t", "task_hash": "h",
                                      "model": "m", "annotation": None if error else "x", "score": None,
                                      "label_scores": None, "error": error, "seconds": 0.1}])

    a, b = (unit_uri(f.uri) for f in files)
    for unit in (a, b):
        tracker.receive("opened", unit, {"retry": [], "stale": [], "prior": {}})
    writer.write(row(f"{a}::1"))
    writer.write(row(f"{a}::2", "cannot decode image: x"))       # committed (2 rows) ...
    assert list_manifests(fs, folder) == {}                       # ... but a's read task has not finished
    tracker.receive("read", a, {"rows": 2, "items": 2, "skipped": 0})
    writer.write(row(f"{b}::1"))
    tracker.pull()
    assert set(list_manifests(fs, folder)) == {unit_key(a, 10)}  # b: one of its 2 rows is not committed
    tracker.receive("read", b, {"rows": 2, "items": 2, "skipped": 0})
    writer.write(row(f"{b}::2"))                                  # commits b's last row
    found = list_manifests(fs, folder)
    assert set(found) == {unit_key(a, 10), unit_key(b, 20)}
    assert (writer.stats.item_count, writer.stats.open_items) == (4, {})
    state = found[unit_key(a, 10)]
    assert (state.items, state.transient, state.failed, state.run_id) == (2, 0, 1, run_id)
    body = json.loads(fs.cat_file(f"{folder}/{state.name}"))
    assert body["unit"] == a and body["rows"] == {"t": {"ok": 1, "input": 1}} and body["tasks"] == {"t": "h"}
    assert list_manifests(fs, f"{folder}-other") == {}  # another task set has none
