"""pipeline.write: Parquet files committed as rows arrive, locally and on moto S3; resume ids and the resume
rules; superseded rows; the output read back with pyarrow, pandas and DuckDB in the documented schema."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.schema import OUTPUT_SCHEMA
from pipeline.write import existing_ids, to_output_table, write_rows


def annotation(item_id: str, task: str = "caption", **overrides: Any) -> dict[str, Any]:
    row = {
        "id": item_id,
        "source": item_id.split("::")[0],
        "task": task,
        "task_hash": "h1",
        "model": "tiny-random",
        "annotation": f"text for {item_id}",
        "score": -1.25,
        "label_scores": None,
        "error": None,
        "seconds": 0.5,
        "pixels": b"extra columns are dropped",
    }
    return {**row, **overrides}


FIRST_RUN = [
    annotation("/in/a.jpg"),
    annotation("/in/s.tar::1", task="classify", annotation="cat",
               label_scores=[{"label": "cat", "score": -0.1}, {"label": "dog", "score": -2.3}]),
    annotation("/in/bad.jpg", annotation=None, score=None, error="cannot decode image: broken"),
]
SECOND_RUN = [annotation("/in/b.jpg"), annotation("/in/c.jpg", task_hash="h2")]


def parquet_files(fs: fsspec.AbstractFileSystem, path: str) -> set[str]:
    return {p for p in fs.find(path) if p.endswith(".parquet")}


def write(rows: list[dict[str, Any]], output: str, run_id: str = "20261130T000000Z-aaaaaa", **options: Any) -> Any:
    """Rows written as one run, in batches of two (as they would stream out of the pipeline)."""
    batches = [pa.Table.from_pylist(rows[i:i + 2]) for i in range(0, len(rows), 2)]
    return write_rows(batches, output, run_id, **options)


def test_write_and_resume_locally(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    assert existing_ids(output, "caption") == set()  # nothing written yet

    write(FIRST_RUN, output)
    fs = fsspec.filesystem("file")
    first_files = parquet_files(fs, output)
    assert first_files
    assert existing_ids(output, "caption") == {"/in/a.jpg", "/in/bad.jpg"}
    assert existing_ids(output, "caption", include_errors=False) == {"/in/a.jpg"}
    assert existing_ids(output, "classify") == {"/in/s.tar::1"}

    write(SECOND_RUN, output, "20261130T000001Z-bbbbbb")
    assert parquet_files(fs, output) > first_files  # appended; the first run's files are untouched
    assert existing_ids(output, "caption") == {"/in/a.jpg", "/in/bad.jpg", "/in/b.jpg", "/in/c.jpg"}
    assert existing_ids(output, "caption", task_hash="h2") == {"/in/c.jpg"}
    assert existing_ids(output, "other-task") == set()


def test_write_and_resume_on_s3(s3: Any) -> None:
    output = f"s3://{s3.new_bucket()}/annotations"
    assert existing_ids(output, "caption") == set()
    write(FIRST_RUN, output)
    write(SECOND_RUN, output, "20261130T000001Z-bbbbbb")
    assert existing_ids(output, "caption") == {"/in/a.jpg", "/in/bad.jpg", "/in/b.jpg", "/in/c.jpg"}
    fs, path = fsspec.core.url_to_fs(output)
    table = pads.dataset(sorted(parquet_files(fs, path)), filesystem=fs, format="parquet").to_table()
    assert table.schema.equals(OUTPUT_SCHEMA) and table.num_rows == 5


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("out")
    write(FIRST_RUN + SECOND_RUN, str(output))
    return output


def test_output_schema_with_pyarrow(written: Path) -> None:
    table = pads.dataset(str(written), format="parquet").to_table()
    assert table.schema.equals(OUTPUT_SCHEMA)
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows["/in/s.tar::1"]["label_scores"] == [{"label": "cat", "score": -0.1, "calibrated": None},
                                                    {"label": "dog", "score": -2.3, "calibrated": None}]
    assert rows["/in/bad.jpg"]["annotation"] is None and rows["/in/bad.jpg"]["score"] is None
    created = rows["/in/a.jpg"]["created_at"]
    assert created.tzinfo is not None and abs((datetime.now(timezone.utc) - created).total_seconds()) < 600


def test_output_with_pandas(written: Path) -> None:
    frame = pd.read_parquet(written)
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    assert frame["score"].dtype == "float64" and frame["seconds"].dtype == "float64"
    labelled = frame.set_index("id").loc["/in/s.tar::1"]
    assert {entry["label"]: entry["score"] for entry in labelled["label_scores"]} == {"cat": -0.1, "dog": -2.3}
    assert frame["error"].notna().sum() == 1


def test_output_with_duckdb(written: Path) -> None:
    output = pads.dataset(str(written), format="parquet")  # DuckDB scans the pyarrow dataset in place
    connection = duckdb.connect()
    connection.register("output", output)
    scores = connection.sql(
        "SELECT ls.label, ls.score FROM output, UNNEST(label_scores) AS u(ls) WHERE task = 'classify' "
        "ORDER BY ls.score DESC"
    ).fetchall()
    assert scores == [("cat", -0.1), ("dog", -2.3)]
    ok = connection.sql("SELECT count(*) FROM output WHERE error IS NULL AND annotation IS NOT NULL").fetchall()
    assert ok == [(4,)]
    types = dict(connection.sql("SELECT column_name, column_type FROM (DESCRIBE output)").fetchall())
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE" and types["score"] == "DOUBLE"
    assert types["label_scores"] == 'STRUCT("label" VARCHAR, score DOUBLE, calibrated DOUBLE)[]'


def test_broken_output_file_is_ignored_when_resuming(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(to_output_table(pa.Table.from_pylist([annotation("/in/a.jpg")])), output / "good.parquet")
    (output / "cut-short.parquet").write_bytes(b"PAR1 half a file")
    with caplog.at_level(logging.WARNING):
        assert existing_ids(str(output), "caption") == {"/in/a.jpg"}
    assert "cut-short.parquet" in caplog.text


def test_rows_missing_output_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="lack output columns"):
        to_output_table(pa.Table.from_pylist([{"id": "x"}]))
    with pytest.raises(ValueError, match="null values in required output columns"):
        to_output_table(pa.Table.from_pylist([annotation("x", model=None)]))
