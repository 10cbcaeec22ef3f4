"""A run you can see and control: `--dry-run` (counts, nothing started or written, local and S3), `--limit`
and `--sample` (deterministic, resumable), the progress line's total, a resume with nothing left that starts
neither Ray nor the model, and the run record `_runs/<run_id>.json` (its counts match the output's rows; no
credentials). The job runs for real with the tiny model on the session's local Ray instance."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from click.testing import CliRunner
from sample_media import image_bytes, img2dataset_parquet_bytes, tar_bytes

from flamingo_annotate.cli import main
from media.count import FileCount, count_items
from media.files import list_files
from pipeline import runs
from pipeline.job import JobConfig, JobError, plan_job, run_job
from pipeline.manifest import UnitState
from pipeline.plan import in_sample, make_plan, nothing_to_do
from pipeline.progress import ProgressLine
from pipeline.task import load_tasks
from pipeline.write import OutputWriteError

TASK = """name: {name}
demonstrations:
  - {{media: demo.png, text: "a shape."}}
query: "Output:"
generation: {{max_new_tokens: 2}}
"""
IMAGES, TAR_SAMPLES, PARQUET_ROWS = 4, 3, 2
ITEMS = IMAGES + TAR_SAMPLES + PARQUET_ROWS


def make_input(folder: Path) -> Path:
    """4 loose images, a WebDataset shard of 3 samples (one with a caption) and an img2dataset shard of 2 rows."""
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        (folder / f"{i}.png").write_bytes(image_bytes((i * 60, 90, 200)))
    (folder / "shard.tar").write_bytes(tar_bytes([
        ("a.png", image_bytes((10, 200, 10))), ("a.txt", b"green"),
        ("b.png", image_bytes((200, 200, 10))), ("c.jpg", image_bytes((5, 5, 5), fmt="JPEG"))]))
    (folder / "rows.parquet").write_bytes(img2dataset_parquet_bytes([
        {"key": "r0", "jpg": image_bytes((1, 2, 3), fmt="JPEG"), "status": "success"},
        {"key": "r1", "jpg": image_bytes((90, 2, 3), fmt="JPEG"), "status": "success"}]))
    return folder


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "demo.png").write_bytes(image_bytes((220, 20, 20)))
    for name in ("caption", "tag"):
        (folder / f"{name}.yaml").write_text(TASK.format(name=name))
    return [str(folder / "caption.yaml"), str(folder / "tag.yaml")]


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_input(tmp_path_factory.mktemp("in") / "data")


def config(task_files: list[str], input_uri: str, output_uri: str, **options: object) -> JobConfig:
    return JobConfig(load_tasks(task_files), input_uri, output_uri, model="tiny-random", **options)  # type: ignore[arg-type]


def rows(output: Path) -> pd.DataFrame:
    return pq.read_table(output).to_pandas()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Ray (or reading through it) fails the test: the code under test must return before."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


# --- counting and the dry run -----------------------------------------------------------------------------------

def test_items_are_counted_from_listing_footers_and_tar_headers(input_dir: Path, s3) -> None:
    local = {Path(c.uri).name: (c.kind, c.items) for c in count_items(list_files(str(input_dir)))}
    assert local == {**{f"{i}.png": ("file", 1) for i in range(IMAGES)},
                     "shard.tar": ("tar", TAR_SAMPLES), "rows.parquet": ("parquet", PARQUET_ROWS)}
    uri = s3.upload_tree(s3.new_bucket(), "data", input_dir)
    remote = count_items(list_files(uri))
    assert {c.uri.rsplit("/", 1)[1]: (c.kind, c.items) for c in remote} == local
    uncounted = count_items(list_files(uri), max_remote_tar_bytes=10)  # a remote shard too large to scan
    assert [c.items for c in uncounted if c.kind == "tar"] == [None]
    assert plan_items(uncounted) is None


def plan_items(counts: list) -> int | None:
    return make_plan("x", counts, {}, ["t"]).items


def test_a_count_not_read_or_stopped_leaves_the_shards_uncounted(input_dir: Path) -> None:
    files = list_files(str(input_dir))
    listed = {Path(c.uri).name: c.items for c in count_items(files, read=False)}  # what the listing alone tells
    assert listed == {**{f"{i}.png": 1 for i in range(IMAGES)}, "shard.tar": None, "rows.parquet": None}
    stop = threading.Event()
    stop.set()  # the job this count ran beside has ended
    assert {Path(c.uri).name: c.items for c in count_items(files, stop=stop)} == listed


def test_the_progress_total_counted_beside_the_job_reaches_the_line(task_files: list[str], input_dir: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    run_job(config(task_files, str(input_dir), str(tmp_path / "out")))
    lines = stderr.getvalue().splitlines()
    # The plan before the start counts no shard (its total is unknown); the count beside the job gives the total.
    assert lines and lines[-1].startswith(f"{ITEMS}/{ITEMS} items (100%)")


def test_dry_run_prints_the_plan_and_starts_and_writes_nothing(task_files: list[str], input_dir: Path,
                                                                tmp_path: Path, no_ray: None) -> None:
    out = tmp_path / "not-yet" / "out"
    result = CliRunner().invoke(main, ["run", *task_files, "--input", str(input_dir), "--output", str(out),
                                       "--model", "tiny-random", "--dry-run", "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert f"Items:   {ITEMS} (0 already in the output for every task, {ITEMS} new)" in result.output
    assert "6 files (4 media files, 1 Parquet shards, 1 WebDataset shards)" in result.output
    assert "To do:   5 items, --limit 5" in result.output
    assert "Dry run: nothing started, nothing written." in result.output
    assert not (tmp_path / "not-yet").exists()


def test_dry_run_refuses_what_the_run_would_refuse(task_files: list[str], input_dir: Path, tmp_path: Path,
                                                  no_ray: None) -> None:
    column = load_tasks(task_files)[0].output_column
    clashing = dataclasses.replace(config(task_files, str(input_dir), str(tmp_path / "out")), keep_columns=(column,))
    with pytest.raises(JobError, match=f"--keep-columns: {column} is also a task's output column"):
        plan_job(clashing)


def test_dry_run_on_s3_counts_and_leaves_the_output_empty(task_files: list[str], input_dir: Path, s3,
                                                           no_ray: None) -> None:
    bucket = s3.new_bucket()
    uri = s3.upload_tree(bucket, "in", input_dir)
    plan = plan_job(config(task_files, uri, f"s3://{bucket}/out"))
    assert (plan.items, plan.new, plan.files, plan.uncounted) == (ITEMS, ITEMS, 6, 0)
    assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
            if o["Key"].startswith("out")] == []
    with pytest.raises(JobError, match="cannot write to output s3://no-such-bucket-here/out"):
        plan_job(config(task_files, uri, "s3://no-such-bucket-here/out"))


# --- limit, resume, nothing to do, the record ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(ray_session: None, task_files: list[str], input_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One output filled in two runs: `limit=5` with the progress line on, then the rest."""
    out = tmp_path_factory.mktemp("limited") / "out"
    capture = pytest.MonkeyPatch()
    stderr = io.StringIO()
    capture.setattr("sys.stderr", stderr)
    try:
        first = run_job(config(task_files, str(input_dir), str(out), limit=5))
    finally:
        capture.undo()
    second = run_job(config(task_files, str(input_dir), str(out), progress=False))
    return out, first, second, stderr.getvalue()


def test_limit_then_rerun_gives_one_row_per_item_and_task(limited) -> None:
    out, first, second, _ = limited
    assert (first.items, second.items) == (5, ITEMS - 5)
    table = rows(out)
    assert len(table) == 2 * ITEMS and not table.duplicated(["id", "task"]).any()
    assert table.groupby("task").id.nunique().to_dict() == {"caption": ITEMS, "tag": ITEMS}


def test_the_progress_line_counts_against_the_planned_total(limited) -> None:
    *_, stderr = limited
    assert "0/5 items (0%)" in stderr and "5/5 items (100%)" in stderr


def test_run_records_count_the_rows_each_run_wrote(limited) -> None:
    out, first, second, _ = limited
    records = runs.read_records(str(out))
    assert [r["run_id"] for r in records] == [first.run_id, second.run_id]
    table = rows(out)
    for record in records:
        mine = table[table.run_id == record["run_id"]]
        assert record["status"] == "complete" and record["counts"]["items"] == mine.id.nunique()
        assert record["counts"]["rows_ok"] + record["counts"]["rows_error"] == len(mine)
        assert record["input"]["files"] == 6 and record["settings"]["model"] == "tiny-random"
        assert set(record["versions"]) == {"flamingo-annotate", "torch", "ray", "transformers", "python"}
    assert [r["read_all"] for r in records] == [False, True]
    assert records[1]["input"]["items_seen"] == ITEMS


def test_a_resume_with_nothing_left_starts_neither_ray_nor_the_model(limited, task_files: list[str],
                                                                     input_dir: Path, no_ray: None) -> None:
    out, *_ = limited
    before = sorted(p.name for p in out.rglob("*"))
    result = CliRunner().invoke(main, ["run", *task_files, "--input", str(input_dir), "--output", str(out),
                                       "--model", "tiny-random"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Nothing to do: all {ITEMS} items of {input_dir} are in {out}")
    assert sorted(p.name for p in out.rglob("*")) == before  # no new record, no lease left behind


def test_records_hold_no_credentials() -> None:
    cfg = JobConfig((), "s3://b/in", "s3://b/out",
                    storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "AKIA-KEY", "secret": "S3CR3T",
                                     "token": "T0KEN"})
    text = json.dumps(runs.new_record(cfg, "r", []))
    assert "http://127.0.0.1:9" in text and not any(s in text for s in ("AKIA-KEY", "S3CR3T", "T0KEN"))


def test_a_run_that_fails_after_taking_the_lease_records_why(ray_session: None, task_files: list[str],
                                                             input_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OutputWriteError("cannot write part-1.parquet: disk full")

    monkeypatch.setattr("pipeline.write.write_rows", fail)
    with pytest.raises(JobError):
        run_job(config(task_files, str(input_dir), str(tmp_path / "out"), progress=False))
    [record] = runs.read_records(str(tmp_path / "out"))
    assert (record["status"], record["reason"]) == ("failed", "cannot write part-1.parquet: disk full")
    assert record["ended_at"] and record["seconds"] >= 0


# --- sampling -------------------------------------------------------------------------------------------------------

def test_a_sample_is_the_same_items_on_every_run(ray_session: None, task_files: list[str], input_dir: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    first = run_job(config(task_files, str(input_dir), str(out), sample=0.5, progress=False))
    ids = set(rows(out).id)
    all_ids = {*(str(input_dir / f"{i}.png") for i in range(IMAGES)),
               *(f"{input_dir}/shard.tar::{k}" for k in "abc"), *(f"{input_dir}/rows.parquet::r{i}" for i in range(2))}
    assert ids == {i for i in all_ids if in_sample(i, 0.5)} and 0 < len(ids) < ITEMS
    assert first.items == len(ids)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    again = run_job(config(task_files, str(input_dir), str(out), sample=0.5, progress=False))
    assert again.nothing_to_do and set(rows(out).id) == ids


def test_finished_files_are_judged_by_their_manifests_alone() -> None:
    """A file with a manifest is done (its count is the manifest's); one without is left to do, counted or not."""
    counts = [FileCount("s3://b/a.tar", "tar", 3), FileCount("s3://b/b.tar", "tar", None),
              FileCount("s3://b/x.png", "file", 1)]
    plan = make_plan("s3://b", counts, {"s3://b/a.tar": UnitState("m", "k", "r", 3, 0, 0)}, ["t"])
    assert (plan.items, plan.done_everywhere, plan.unfinished, plan.to_do) == (None, 3, 2, None)
    assert not nothing_to_do(plan)
    every = {c.uri: UnitState("m", "k", "r", c.items or 2, 0, 0) for c in counts}
    assert nothing_to_do(make_plan("s3://b", counts, every, ["t"]))
    flaky = make_plan("s3://b", counts, {**every, "s3://b/a.tar": UnitState("m", "k", "r", 3, 1, 0)}, ["t"])
    assert (flaky.retry, flaky.done_everywhere) == (1, 2 + 2 + 1) and not nothing_to_do(flaky)
    failed = {**every, "s3://b/a.tar": UnitState("m", "k", "r", 3, 0, 2)}
    assert nothing_to_do(make_plan("s3://b", counts, failed, ["t"]))  # input / model errors stay ...
    assert not nothing_to_do(make_plan("s3://b", counts, failed, ["t"], retry_errors=True))  # ... unless retried


# --- the progress line ----------------------------------------------------------------------------------------------

def test_progress_line_shows_total_rate_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    line = ProgressLine(10, stream=stream, interval=0, clock=lambda: now[0])
    now[0] = 4.0
    line.update(2)
    assert line.format() == "2/10 items (20%)  0.50 items/s  ETA 16s  4s elapsed"
    assert stream.getvalue().splitlines()[-1] == line.format()  # not a terminal: plain lines
    assert ProgressLine(None, stream=stream, clock=lambda: 2.0).format().startswith("0 items")

