"""Runs against one output, for real: `flamingo-annotate run` with the tiny model on a real local Ray instance,
in this process (CliRunner) or as its own process. A second run on a busy output refuses; a driver killed
midway keeps what it committed and the same command completes it exactly; transient storage failures (a
real TCP proxy in front of moto that resets connections) are retried by the next run and the rows they
replace disappear; the summary counts the run's own rows; a bad input or endpoint is one line, in seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from faulty_proxy import FaultyProxy
from sample_media import image_bytes, tar_bytes

from flamingo_annotate.cli import main
from pipeline.lease import LEASE_FILE, Lease, LeaseLost
from pipeline.write import to_output_table

CLI = str(Path(sys.executable).with_name("flamingo-annotate"))
TASK = """name: caption
demonstrations:
  - {media: demo.png, text: "a shape."}
query: "Output:"
generation: {max_new_tokens: 2}
"""


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("task")
    (folder / "demo.png").write_bytes(image_bytes((220, 20, 20)))
    (folder / "caption.yaml").write_text(TASK)
    return str(folder / "caption.yaml")


def images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:04d}.png").write_bytes(image_bytes((i * 7 % 256, 90, 200 - i % 150)))
    return folder


def command(task_file: str, input_uri: str, output_uri: str, *extra: str) -> list[str]:
    return ["run", task_file, "--input", input_uri, "--output", output_uri, "--model", "tiny-random",
            "--no-progress", *extra]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def rows(output: Path) -> pd.DataFrame:
    return pq.read_table(output).to_pandas()  # as pyarrow / pandas read the folder, nothing filtered


def assert_exact(table: pd.DataFrame, ids: set[str]) -> None:
    """One row per item (one task), no other rows, none of them an error."""
    assert len(table) == len(ids) and set(table["id"]) == ids, sorted(set(table["id"]) ^ ids)
    assert table["error"].isna().all(), table[table["error"].notna()][["id", "error"]]


# --- one writer per output -------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_on_a_busy_output_refuses(ray_session: None, task_file: str, tmp_path: Path, where: str,
                                               request: pytest.FixtureRequest) -> None:
    source = images(tmp_path / "in", 3)
    ids = {str(p) for p in source.iterdir()}
    output = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3').new_bucket()}/out"
    with Lease(output, "20261130T120000Z-abcdef"):  # another run, alive in this process
        refused = run(*command(task_file, str(source), output))
        assert refused.exit_code == 4, refused.output
        (line,) = refused.stderr.splitlines()
        assert line.startswith(f"Error: {output} is being written by run 20261130T120000Z-abcdef (host ")
        assert line.endswith(" s ago); pass --force to take over")
    from pipeline.write import existing_ids

    assert existing_ids(output, "caption") == set()  # the refused run wrote nothing
    done = run(*command(task_file, str(source), output))
    assert done.exit_code == 0, done.output
    assert existing_ids(output, "caption", include_errors=False) == ids
    if where == "local":
        assert_exact(rows(tmp_path / "out"), ids)
        assert not (tmp_path / "out" / LEASE_FILE).exists()  # given back


def test_force_takes_over_a_busy_output(ray_session: None, task_file: str, tmp_path: Path) -> None:
    source = images(tmp_path / "in", 2)
    with Lease(str(tmp_path / "out"), "20261130T120000Z-abcdef") as other:
        forced = run(*command(task_file, str(source), str(tmp_path / "out"), "--force"))
        assert forced.exit_code == 0, forced.output
        with pytest.raises(LeaseLost):
            other.confirm()
    assert_exact(rows(tmp_path / "out"), {str(p) for p in source.iterdir()})


# --- the summary is the run's own ------------------------------------------------------------------------------

def test_the_summary_counts_only_the_rows_this_run_wrote(ray_session: None, task_file: str, tmp_path: Path) -> None:
    source = images(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    # Rows of other items from another machine whose clock runs an hour ahead.
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    other = [{"id": f"/elsewhere/{i}.png", "source": f"/elsewhere/{i}.png", "task": "caption", "task_hash": "h",
              "model": "m", "annotation": "x", "score": -1.0, "label_scores": None, "error": None, "seconds": 0.1,
              "created_at": later} for i in range(5)]
    pq.write_table(to_output_table(pa.Table.from_pylist(other)), out / "part-other.parquet")

    first = run(*command(task_file, str(source), str(out)))
    assert first.exit_code == 0, first.output
    assert "Annotated 3 items" in first.stdout and "rows ok:           3\n" in first.stdout
    # the run's record has items/s per stage, and `query` shows the run
    (record,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    stages = {stage["stage"].split("(")[-1].rstrip(")"): stage for stage in record["stages"]}
    for name in ("VisionEncoder", "Annotator"):  # each took the 3 items and spent time on them
        assert stages[name]["rows_in"] == 3 and stages[name]["busy_s"] > 0, record["stages"]
        assert stages[name]["items_per_busy_second"] == pytest.approx(3 / stages[name]["busy_s"], rel=1e-2)
    summary = run("query", str(out))
    assert f"Runs (1, newest last):\n  {record['run_id']} complete 3 items (3 ok, 0 errors)" in summary.stdout
    again = run(*command(task_file, str(source), str(out)))
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"Nothing to do: all 3 items of {source} are in {out}")  # not the other 5
    assert len(rows(out)) == 3 + 5


# --- a killed driver -------------------------------------------------------------------------------------------

@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """A short temporary folder for a Ray instance started by a subprocess (Ray's socket paths must stay
    under 108 characters)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def process_group() -> Iterator[list[subprocess.Popen]]:
    """Processes started in a session of their own; whatever they leave (Ray's daemons) is killed at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def test_a_driver_killed_midway_keeps_its_files_and_the_same_command_completes_exactly(
        task_file: str, tmp_path: Path, ray_dir: Path, process_group: list[subprocess.Popen]) -> None:
    source = images(tmp_path / "in", 60)
    out = tmp_path / "out"
    args = [CLI, *command(task_file, str(source), str(out), "--flush-rows", "2", "--vision-batch-size", "2",
                          "--generate-batch-size", "2", "--vision-cpus", "0.25", "--generate-cpus", "0.25")]
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir)}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    process_group.append(first)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    committed = rows(out) if list(out.glob("part-*.parquet")) else pd.DataFrame({"id": []})
    log_text = (tmp_path / "first.log").read_text()
    assert 0 < len(committed) < 60, f"kill landed outside the write ({len(committed)} rows):\n{log_text[-3000:]}"
    assert (out / LEASE_FILE).exists()  # left behind by the killed driver

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400, start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "taking over the stale lease" in second.stderr
    assert f"skipped (resumed): {len(committed)}" in second.stdout
    assert_exact(rows(out), {str(p) for p in source.iterdir()})
    assert not (out / LEASE_FILE).exists()


# --- transient storage failures --------------------------------------------------------------------------------

def test_transient_failures_are_retried_and_the_rows_they_replace_disappear(
        ray_session: None, task_file: str, tmp_path: Path, s3: Any) -> None:
    bucket = s3.new_bucket()
    shard = tar_bytes([("0001.png", image_bytes((10, 200, 10))), ("0002.png", image_bytes((10, 10, 200)))])
    s3.upload(bucket, {"in/a.png": image_bytes((200, 10, 10)), "in/b.png": image_bytes((90, 90, 10)),
                       "in/s.tar": shard})
    input_uri = f"s3://{bucket}/in"
    ids = {f"{input_uri}/a.png", f"{input_uri}/b.png", f"{input_uri}/s.tar::0001", f"{input_uri}/s.tar::0002"}
    out = tmp_path / "out"
    port = int(s3.endpoint.rsplit(":", 1)[1])
    # Listing the bucket works; every new connection that reads an object is reset.
    with FaultyProxy(port, "reset", fault_if=lambda head: f" /{bucket}/in/".encode() in head.split(b"\r\n")[0]) \
            as proxy:
        failed = run(*command(task_file, input_uri, str(out), "--s3-endpoint", proxy.endpoint))
        assert proxy.seen["reset"] > 0
        assert failed.exit_code == 3, failed.output
        assert failed.stderr.strip() == \
            "Error: 3 items failed with transient storage errors; run the same command again to retry them"
        first = rows(out)
        assert set(first["error_kind"]) == {"transient"}
        assert set(first["id"]) == {f"{input_uri}/a.png", f"{input_uri}/b.png", f"{input_uri}/s.tar"}

        proxy.mode = "forward"  # the outage is over
        again = run(*command(task_file, input_uri, str(out), "--s3-endpoint", proxy.endpoint))
        assert again.exit_code == 0, again.output
        assert "Annotated 4 items" in again.stdout and "earlier error rows replaced: 3" in again.stdout
    assert_exact(rows(out), ids)                    # pyarrow / pandas see no superseded row
    assert_exact(pd.read_parquet(out), ids)


# --- fail fast -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["input typo", "unreachable input", "unreachable output"])
def test_a_bad_input_or_endpoint_is_one_line_within_seconds(task_file: str, tmp_path: Path, ray_dir: Path,
                                                            case: str) -> None:
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port
    source = images(tmp_path / "in", 1)
    args, expected = {
        "input typo": ([str(tmp_path / "inn"), str(tmp_path / "out")], f"Error: no input files match {tmp_path}/inn"),
        "unreachable input": (["s3://bucket/in", str(tmp_path / "out"), "--s3-endpoint", closed],
                              "Error: cannot list input s3://bucket/in: EndpointConnectionError"),
        "unreachable output": ([str(source), "s3://bucket/out", "--s3-endpoint", closed],
                               "Error: cannot write to output s3://bucket/out: EndpointConnectionError"),
    }[case]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "RAY_TMPDIR": str(ray_dir)}
    start = time.monotonic()
    result = subprocess.run([CLI, *command(task_file, args[0], args[1], *args[2:])], capture_output=True, text=True,
                            env=env, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(expected), line
    assert seconds < 20, seconds
    assert not any(ray_dir.iterdir())  # Ray never started
