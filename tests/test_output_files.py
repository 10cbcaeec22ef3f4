"""pipeline.write and pipeline.query on output folders as crashes and outages leave them: files committed as
rows arrive, atomically; unreadable files skipped; resume rules by error kind; superseded rows rewritten out
(and a rewrite cut short finished); outputs written before `run_id` / `error_kind` existed."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.schema import OUTPUT_SCHEMA, REPLACES_KEY
from pipeline.write import (
    OutputWriter,
    commit_file,
    drop_superseded,
    scan_output,
    to_output_table,
    write_rows,
)

HASHES = {"caption": "h1"}


def row(item_id: str, error: str | None = None, kind: str | None = None, **overrides: Any) -> dict[str, Any]:
    return {"id": item_id, "source": item_id.split("::")[0], "task": "caption", "task_hash": "h1", "model": "m",
            "annotation": None if error else f"text {item_id}", "score": None if error else -1.0,
            "label_scores": None, "error": error, "error_kind": kind, "seconds": 0.1, **overrides}


def table(*rows: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(rows))


def ids_in(folder: Path) -> list[str]:
    return sorted(pq.read_table(folder).column("id").to_pylist())


def test_files_are_committed_every_n_rows_under_run_named_files(tmp_path: Path) -> None:
    writer = OutputWriter(str(tmp_path), "20261130T000000Z-aaaaaa", flush_rows=3, flush_seconds=3600)
    for i in range(7):
        writer.write(table(row(f"/in/{i}.png")))
        if i == 3:  # 4 rows given: one file of 3 committed, nothing half-written lying around
            assert [p.name for p in tmp_path.iterdir()] == ["part-20261130T000000Z-aaaaaa-00001.parquet"]
    writer.flush()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [f"part-20261130T000000Z-aaaaaa-0000{i}.parquet" for i in (1, 2, 3)]
    assert [pq.read_metadata(p).num_rows for p in files] == [3, 3, 1]
    written = pq.read_table(tmp_path)
    assert written.schema.equals(OUTPUT_SCHEMA) and written.num_rows == 7
    assert set(written.column("run_id").to_pylist()) == {"20261130T000000Z-aaaaaa"}
    assert writer.stats.rows_ok == 7 and len(writer.stats.items) == 7


def test_files_are_committed_every_t_seconds(tmp_path: Path) -> None:
    writer = OutputWriter(str(tmp_path), "r", flush_rows=1000, flush_seconds=0.05)
    writer.write(table(row("/in/a.png")))
    assert not list(tmp_path.glob("*.parquet"))
    time.sleep(0.1)
    writer.write(table(row("/in/b.png")))
    assert len(list(tmp_path.glob("*.parquet"))) == 1


def test_rows_before_a_failure_are_committed(tmp_path: Path) -> None:
    def stream():
        yield table(row("/in/a.png"))
        raise RuntimeError("the pipeline died")

    with pytest.raises(RuntimeError):
        write_rows(stream(), str(tmp_path), "r")
    assert ids_in(tmp_path) == ["/in/a.png"]


def test_error_kinds_are_kept_or_inferred_and_counted(tmp_path: Path) -> None:
    stats = write_rows([table(
        row("/in/a.png"),
        row("/in/b.png", "cannot read file: EndpointConnectionError: Could not connect"),
        row("/in/c.png", "cannot decode image: broken"),
        row("/in/d.png", "generation failed: RuntimeError: boom"),
        row("/in/e.png", "anything", "transient"),
    )], str(tmp_path), "r")
    kinds = dict(zip(*pq.read_table(tmp_path, columns=["id", "error_kind"]).to_pydict().values()))
    assert kinds == {"/in/a.png": None, "/in/b.png": "transient", "/in/c.png": "input", "/in/d.png": "model",
                     "/in/e.png": "transient"}
    assert stats.rows_ok == 1 and dict(stats.rows_by_kind) == {"transient": 2, "input": 1, "model": 1}
    assert stats.transient_items == {"/in/b.png", "/in/e.png"}


def test_resume_rules_by_error_kind(tmp_path: Path) -> None:
    write_rows([table(row("/in/ok.png"), row("/in/bad.png", "cannot decode image: x", "input"),
                      row("/in/model.png", "generation failed: x", "model"),
                      row("/in/flaky.png", "cannot read file: x", "transient"),
                      row("/in/other-hash.png", task_hash="h0"))], str(tmp_path), "r")
    scan = scan_output(str(tmp_path), HASHES)
    assert scan.done["caption"] == {"/in/ok.png", "/in/bad.png", "/in/model.png"}
    assert set(scan.retry) == {("caption", "/in/flaky.png")}
    every = scan_output(str(tmp_path), HASHES, retry_errors=True)
    assert every.done["caption"] == {"/in/ok.png"}
    assert set(every.retry) == {("caption", p) for p in ("/in/bad.png", "/in/model.png", "/in/flaky.png")}


def test_unreadable_files_are_skipped_by_resume_and_query(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_rows([table(row("/in/a.png"))], str(tmp_path), "r")
    (tmp_path / "part-torn.parquet").write_bytes(b"PAR1 half a file")
    with caplog.at_level(logging.WARNING):
        scan = scan_output(str(tmp_path), HASHES)
        con = query.connect(str(tmp_path))
        assert con.sql("SELECT id FROM annotations").fetchall() == [("/in/a.png",)]
        assert "1 rows, 0 with errors" in query.summarize(con, str(tmp_path)).format()
    assert scan.done["caption"] == {"/in/a.png"} and scan.unreadable == [str(tmp_path / "part-torn.parquet")]
    assert caplog.text.count("part-torn.parquet") == 2  # reported by both


def test_superseded_rows_are_rewritten_out_of_their_files(tmp_path: Path) -> None:
    out = str(tmp_path)
    write_rows([table(row("/in/a.png"), row("/in/b.png", "cannot read file: ConnectionResetError: x"),
                      row("/in/s.tar", "cannot read tar shard: EndpointConnectionError: x"),
                      row("/in/c.png", "cannot read file: ReadTimeoutError: x"))], out, "run1")
    scan = scan_output(out, HASHES)
    assert set(scan.retry) == {("caption", "/in/b.png"), ("caption", "/in/s.tar"), ("caption", "/in/c.png")}
    # The next run gets b and the shard's items; c fails again (its new row supersedes the old one too).
    stats = write_rows([table(row("/in/b.png"), row("/in/s.tar::1"), row("/in/s.tar::2"),
                              row("/in/c.png", "cannot read file: ReadTimeoutError: x"))], out, "run2",
                       watch=scan.watch())
    assert drop_superseded(out, scan, stats.written_keys, "run2", HASHES) == 3
    final = pq.read_table(tmp_path).to_pandas()
    assert sorted(final.id) == ["/in/a.png", "/in/b.png", "/in/c.png", "/in/s.tar::1", "/in/s.tar::2"]
    assert final.set_index("id").loc["/in/c.png", "run_id"] == "run2"
    assert final.set_index("id").loc["/in/a.png", "run_id"] == "run1"  # kept rows keep their run


def test_a_shard_row_left_by_a_run_stopped_before_its_rewrite_goes_with_the_next_run(tmp_path: Path) -> None:
    """A run that wrote a shard's items and was stopped before `drop_superseded` leaves the shard's old error
    row; the next run has nothing left to write from that shard, and must still see the row superseded."""
    out = str(tmp_path)
    write_rows([table(row("/in/a.png"), row("/in/s.tar", "cannot read tar shard: EndpointConnectionError: x"),
                      row("/in/t.tar", "cannot read tar shard: EndpointConnectionError: x"))], out, "run1")
    write_rows([table(row("/in/s.tar::1"), row("/in/s.tar::2"))], out, "run2")   # stopped here
    scan = scan_output(out, HASHES)
    stats = write_rows([], out, "run3", watch=scan.watch())                       # s.tar: every item done
    assert drop_superseded(out, scan, stats.written_keys, "run3", HASHES) == 1
    assert ids_in(tmp_path) == ["/in/a.png", "/in/s.tar::1", "/in/s.tar::2", "/in/t.tar"]  # t.tar: still to do


def test_a_rewrite_cut_short_is_finished_by_the_next_scan(tmp_path: Path) -> None:
    write_rows([table(row("/in/a.png"), row("/in/b.png", "cannot read file: ConnectionResetError: x"))],
               str(tmp_path), "run1")
    (old,) = tmp_path.glob("*.parquet")
    # A crash after the rewritten file was committed and before the old one was deleted:
    commit_file(fsspec.filesystem("file"), str(tmp_path / "part-run2-r0001.parquet"),
                to_output_table(table(row("/in/a.png"))), {REPLACES_KEY: json.dumps([old.name]).encode()})
    con = query.connect(str(tmp_path))
    assert con.sql("SELECT count(*) FROM annotations").fetchall() == [(1,)]  # query leaves the old file out
    assert old.exists()                                                       # ... and does not delete
    scan_output(str(tmp_path), HASHES)
    assert not old.exists() and ids_in(tmp_path) == ["/in/a.png"]


def test_outputs_without_run_id_and_error_kind_resume_and_query(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name not in ("run_id", "error_kind")])
    old = to_output_table(table(row("/in/a.png"), row("/in/b.png", "cannot read file: EndpointConnectionError: x"),
                                row("/in/c.png", "cannot decode image: x"))).select(old_schema.names)
    pq.write_table(old, tmp_path / "part-0.parquet")
    scan = scan_output(str(tmp_path), HASHES)
    assert scan.done["caption"] == {"/in/a.png", "/in/c.png"} and set(scan.retry) == {("caption", "/in/b.png")}
    write_rows([table(row("/in/b.png"))], str(tmp_path), "20261130T000000Z-aaaaaa")
    con = query.connect(str(tmp_path))
    latest = con.sql("SELECT id, error, run_id FROM annotations ORDER BY id").fetchall()
    assert latest == [("/in/a.png", None, None), ("/in/b.png", None, "20261130T000000Z-aaaaaa"),
                      ("/in/c.png", "cannot decode image: x", None)]  # the latest row per (id, task)
    assert con.sql("SELECT count(*) FROM annotations WHERE error_kind IS NULL").fetchall() == [(3,)]


def test_hidden_files_are_not_output(tmp_path: Path) -> None:
    write_rows([table(row("/in/a.png"))], str(tmp_path), "r")
    pq.write_table(to_output_table(table(row("/in/x.png"))), tmp_path / ".part-r-00002.parquet.tmp")
    pq.write_table(to_output_table(table(row("/in/y.png"))), tmp_path / ".uncommitted.parquet")
    assert scan_output(str(tmp_path), HASHES).done["caption"] == {"/in/a.png"}
    assert query.connect(str(tmp_path)).sql("SELECT id FROM annotations").fetchall() == [("/in/a.png",)]
    assert os.path.exists(tmp_path / ".uncommitted.parquet")


def test_a_commit_is_retried_through_a_brief_outage(s3: Any) -> None:
    """Real connection resets between s3fs and moto for the first ~2 s of the commit; it still lands, whole."""
    from faulty_proxy import FaultyProxy

    from media.storage import S3_CLIENT_CONFIG, filesystem

    bucket = s3.new_bucket()
    with FaultyProxy(int(s3.endpoint.rsplit(":", 1)[1]), "reset") as proxy:
        fs, root = filesystem(f"s3://{bucket}/out", {"endpoint_url": proxy.endpoint, "config_kwargs": S3_CLIENT_CONFIG,
                                                     "skip_instance_cache": True})
        timer = threading.Timer(2.0, lambda: setattr(proxy, "mode", "forward"))
        timer.start()
        try:
            commit_file(fs, f"{root}/part-r-00001.parquet", to_output_table(table(row("/in/a.png"))))
        finally:
            timer.cancel()
        assert proxy.seen["reset"] > 0 and proxy.seen["forward"] > 0
    written = pq.read_table(f"{bucket}/out/part-r-00001.parquet", filesystem=s3fs_for(s3))
    assert written.column("id").to_pylist() == ["/in/a.png"]


def s3fs_for(s3: Any) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key=s3.key, secret=s3.secret, client_kwargs={"endpoint_url": s3.endpoint})
