"""pipeline.compact on local folders and moto S3: small files merged into few, every row kept exactly once (the
multiset of (id, task, run_id) before and after), a crash between commit and delete shows no duplicates, and the
output's lease is respected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flamingo_annotate.cli import PROJECT_ROOT, main
from media.storage import filesystem
from pipeline.compact import compact_output
from pipeline.lease import Lease, LeaseHeld
from pipeline.schema import REPLACES_KEY, replaced_files
from pipeline.write import OutputWriter, output_files, read_files


def rows(n: int, prefix: str, task: str = "caption", **extra: Any) -> pa.Table:
    return pa.Table.from_pylist([
        {"id": f"{prefix}/{i}.png", "source": f"{prefix}/{i}.png", "task": task, "task_hash": "h1", "model": "m",
         "annotation": f"text {i}", "score": -1.0, "label_scores": None, "error": None, "error_kind": None,
         "seconds": 0.1, **extra} for i in range(n)])


def write_run(output: str, run_id: str, table: pa.Table, keep_columns: tuple[str, ...] = ()) -> None:
    writer = OutputWriter(output, run_id, flush_rows=3, flush_seconds=3600, keep_columns=keep_columns)
    for start in range(0, table.num_rows, 2):
        writer.write(table.slice(start, 2))
    writer.flush()


def contents(output: str) -> Counter[tuple[str, str, str]]:
    _, tables, unreadable = read_files(output, ["id", "task", "run_id"], None)
    assert not unreadable
    return Counter(row for t in tables if t is not None
                   for row in zip(*(t.column(c).to_pylist() for c in ("id", "task", "run_id"))))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compaction_keeps_every_row_once_and_survives_a_crash_before_the_deletes(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    output = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3').new_bucket()}/out"
    write_run(output, "20261201T000000Z-aaaaaa", rows(10, "/in/a"))
    write_run(output, "20261201T010000Z-bbbbbb", rows(7, "/in/b", task="tags"))
    write_run(output, "20261201T020000Z-cccccc", rows(5, "/in/c", metadata='{"key": "k"}'), keep_columns=("key",))
    fs, root = filesystem(output)
    before_files = output_files(fs, root)
    before = contents(output)
    assert len(before_files) == 3 + 2 + 2 and sum(before.values()) == 22

    stats = compact_output(output, target_file_mb=64)
    after_files = output_files(fs, root)
    # One file per set of kept columns: the runs without kept columns share one, the run keeping `key` its own.
    assert (stats.files_merged, stats.files_written, stats.rows) == (7, 2, 22) and len(after_files) == 2
    assert contents(output) == before
    schemas = {f: pq.ParquetFile(fs.open(f)).schema_arrow for f in after_files}
    kept = next(f for f in after_files if "key" in schemas[f].names)
    assert pq.ParquetFile(fs.open(kept)).read().column("key").to_pylist() == ["k"] * 5

    # A crash after a merged file is committed but before the files it holds are deleted: an old file is back.
    # Readers leave it out (the merged file names it), and the next compaction deletes it.
    merged = next(f for f in after_files if f != kept)
    old_name = replaced_files(schemas[merged])[0]
    old_path = f"{root.rstrip('/')}/{old_name}"
    fs.pipe_file(old_path, fs.cat_file(kept))  # any readable file: the merged one hides it by name
    assert contents(output) == before
    again = compact_output(output, target_file_mb=64)
    assert not fs.exists(old_path) and again.files_written == 0 and contents(output) == before
    assert REPLACES_KEY in (schemas[merged].metadata or {})


def test_files_at_the_target_size_stay_and_a_held_lease_refuses(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    write_run(output, "20261201T000000Z-aaaaaa", rows(6, "/in/a"))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    tiny = compact_output(output, target_file_mb=1e-6)  # every file is over the target: nothing to merge
    assert tiny.files_written == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    with Lease(output, "20261201T030000Z-dddddd"):
        with pytest.raises(LeaseHeld, match="being written by run 20261201T030000Z-dddddd"):
            compact_output(output)
        result = CliRunner().invoke(main, ["compact", output])
        assert result.exit_code != 0 and "being written by run" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    result = CliRunner().invoke(main, ["compact", output, "--target-file-mb", "16"])
    assert result.exit_code == 0, result.output
    assert "merged 2 files into 1" in result.output and len(list((tmp_path / "out").iterdir())) == 1


def test_a_run_merges_its_own_small_files_at_the_target_size_and_at_the_end(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    probe = OutputWriter(str(tmp_path / "probe"), "20261201T000000Z-pppppp", flush_rows=3, flush_seconds=3600)
    probe.write(rows(3, "/in/p"))
    file_bytes = (tmp_path / "probe").joinpath(Path(probe.stats.files[0]).name).stat().st_size
    # Merge once two small files are committed: 11 rows in files of 3 -> merged (3+3), (3+2 at the end).
    writer = OutputWriter(output, "20261201T000000Z-aaaaaa", flush_rows=3, flush_seconds=3600,
                          target_file_bytes=2 * file_bytes - 1)
    table = rows(11, "/in/a")
    for start in range(0, 11):
        writer.write(table.slice(start, 1))
        if start == 5:  # 2 small files committed and merged: the durability of each commit is kept
            assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-20261201T000000Z-aaaaaa-m00001.parquet"]
    writer.close()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["part-20261201T000000Z-aaaaaa-m00001.parquet", "part-20261201T000000Z-aaaaaa-m00002.parquet"]
    assert sorted(writer.stats.files) == [str(tmp_path / "out" / n) for n in names]
    assert sorted(pq.read_table(tmp_path / "out").column("id").to_pylist()) == sorted(table.column("id").to_pylist())


def test_run_passes_the_target_file_size(run_job_calls: list[Any]) -> None:
    caption = str(PROJECT_ROOT / "jobs" / "tasks" / "caption.yaml")
    result = CliRunner().invoke(main, ["run", caption, "--input", "s3://b/in", "--output", "s3://b/out",
                                       "--target-file-mb", "64"])
    assert result.exit_code == 0, result.output
    assert run_job_calls[0].target_file_mb == 64.0
