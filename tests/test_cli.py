"""The command line (flamingo_annotate/cli.py), the query helpers behind it, the Ray job entrypoint and cluster.yaml."""

from __future__ import annotations

import copy
import dataclasses
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from flamingo_annotate.cli import PROJECT_ROOT, main
from flamingo_annotate.cluster import describe
from pipeline import job
from pipeline.job import JobConfig, JobSummary, StageResources
from pipeline.task import load_tasks
from pipeline.write import to_output_table

TASKS = PROJECT_ROOT / "jobs" / "tasks"
EXAMPLES = sorted(str(p) for p in TASKS.glob("*.yaml"))
CAPTION = str(TASKS / "caption.yaml")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def bad_task(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ngeneration: {num_beams: 0}\n")
    return path


def output_rows() -> pa.Table:
    """Six rows (3 items x 2 tasks, one failed) in pipeline/write.py's output schema."""
    items = ["/in/a.png", "/in/b.png", "/in/c.mp4"]
    return to_output_table(pa.table({
        "id": [i for i in items for _ in range(2)],
        "source": [i for i in items for _ in range(2)],
        "task": ["caption", "classify_shape"] * 3,
        "task_hash": ["h1", "h2"] * 3,
        "model": ["tiny-random"] * 6,
        "annotation": ["A red circle.", "circle", "A green square.", "square", None, "triangle"],
        "score": [-1.0, -0.5, -1.2, -0.4, None, -0.7],
        "label_scores": [None, [{"label": "circle", "score": -0.5}], None, [{"label": "square", "score": -0.4}],
                         None, [{"label": "triangle", "score": -0.7}]],
        "error": [None, None, None, None, "decode failed", None],
        "seconds": [0.1] * 6,
    }))


def write_output(folder: Path, table: pa.Table | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(output_rows() if table is None else table, folder / "part-0.parquet")
    return folder


# --- import cost and help ----------------------------------------------------------------------------------------

def test_cli_module_imports_no_heavy_libraries() -> None:
    code = ("import sys, flamingo_annotate.cli; "
            "print(sorted(m for m in ('ray', 'torch', 'duckdb', 'pyarrow', 'fsspec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_query_module_imports_no_ray() -> None:
    """`query` reads the output schema's column names (pipeline.schema) without starting Ray."""
    code = "import sys, pipeline.query; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "submit", "status", "logs", "validate", "query", "demo", "train", "recipe", "eval",
                    "bench"):
        assert f"  {command} " in result.output


# --- validate ----------------------------------------------------------------------------------------------------

def test_validate_ok(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate", *EXAMPLES])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(EXAMPLES)
    caption = next(line for line in lines if " caption " in line)
    assert "generate" in caption and "2 demos" in caption and "sha256:" in caption


def test_validate_reports_bad_files_and_still_lists_the_good_ones(runner: CliRunner, bad_task: Path) -> None:
    result = runner.invoke(main, ["validate", CAPTION, str(bad_task)])
    assert result.exit_code == 2
    assert " caption " in result.stdout
    assert f"{bad_task}: generation.num_beams: must be >= 1, got 0" in result.stderr
    assert "1 problem in task files" in result.stderr


def test_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["validate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'none.yaml'}: file not found" in result.stderr


# --- run ---------------------------------------------------------------------------------------------------------

def test_run_with_a_bad_task_exits_2_before_starting_anything(
        runner: CliRunner, bad_task: Path, run_job_calls: list[JobConfig]) -> None:
    result = runner.invoke(main, ["run", CAPTION, str(bad_task), "--input", "in", "--output", "out"])
    assert result.exit_code == 2
    assert f"{bad_task}: generation.num_beams" in result.stderr
    assert run_job_calls == []


def test_run_builds_the_job_config_from_the_options(
        runner: CliRunner, run_job_calls: list[JobConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, [
        "run", *EXAMPLES, "--input", "s3://bucket/images/", "--output", "out/run",
        "--model", "some/checkpoint", "--address", "ray://head:10001",
        "--vision-actors", "2", "--vision-batch-size", "16", "--vision-gpus", "0.25", "--vision-cpus", "1",
        "--generate-actors", "3", "--generate-batch-size", "4", "--generate-gpus", "0.5", "--generate-cpus", "0.5",
        "--num-frames", "4", "--fps", "1.5", "--s3-endpoint", "http://127.0.0.1:9000", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    (config,) = run_job_calls
    assert config == JobConfig(
        tasks=load_tasks(EXAMPLES),
        input_uri="s3://bucket/images/",
        output_uri=str(tmp_path / "out" / "run"),
        model="some/checkpoint",
        address="ray://head:10001",
        vision=StageResources(pool_size=2, batch_size=16, num_cpus=1.0, num_gpus=0.25),
        generation=StageResources(pool_size=3, batch_size=4, num_cpus=0.5, num_gpus=0.5),
        num_frames=4,
        fps=1.5,
        storage_options={"endpoint_url": "http://127.0.0.1:9000"},
        progress=False,
    )
    out = result.stdout
    assert "Annotated 10 items in 4.0 s (2.50 items/s)" in out
    assert "rows ok:           28" in out and "rows with errors:  2" in out and "skipped (resumed): 4" in out
    assert f"flamingo-annotate query {tmp_path / 'out' / 'run'} --s3-endpoint http://127.0.0.1:9000" in out


def test_run_without_options_keeps_the_job_defaults(runner: CliRunner, run_job_calls: list[JobConfig]) -> None:
    result = runner.invoke(main, ["run", CAPTION, "--input", "s3://b/in", "--output", "s3://b/out"])
    assert result.exit_code == 0, result.output
    (config,) = run_job_calls
    assert config == JobConfig(tasks=load_tasks([CAPTION]), input_uri="s3://b/in", output_uri="s3://b/out")


def test_run_passes_the_output_options(runner: CliRunner, run_job_calls: list[JobConfig]) -> None:
    result = runner.invoke(main, ["run", CAPTION, "--input", "s3://b/in", "--output", "s3://b/out", "--force",
                                  "--retry-errors", "--flush-rows", "500", "--flush-seconds", "5"])
    assert result.exit_code == 0, result.output
    (config,) = run_job_calls
    assert (config.force, config.retry_errors, config.flush_rows, config.flush_seconds) == (True, True, 500, 5.0)


def test_run_passes_the_decoding_limits(runner: CliRunner, run_job_calls: list[JobConfig]) -> None:
    result = runner.invoke(main, ["run", CAPTION, "--input", "s3://b/in", "--output", "s3://b/out",
                                  "--max-pixels", "1000000", "--decode-timeout", "5"])
    assert result.exit_code == 0, result.output
    (config,) = run_job_calls
    assert (config.max_pixels, config.decode_timeout_s) == (1_000_000, 5.0)
    from media.decode import DecodeConfig

    defaults = JobConfig(tasks=(), input_uri="", output_uri="")   # the job's defaults are the decoder's
    assert (defaults.max_pixels, defaults.decode_timeout_s) == (DecodeConfig.max_pixels, DecodeConfig.timeout_s)


def test_run_reports_job_errors_in_one_line(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(config: JobConfig) -> JobSummary:
        raise job.JobError("s3://b/out is being written by run R (host h, pid 1, heartbeat 2 s ago); "
                           "pass --force to take over", job.EXIT_OUTPUT_BUSY)

    monkeypatch.setattr(job, "run_job", refused)
    result = runner.invoke(main, ["run", CAPTION, "--input", "s3://b/in", "--output", "s3://b/out"])
    assert result.exit_code == 4
    assert result.stderr.splitlines() == ["Error: s3://b/out is being written by run R (host h, pid 1, heartbeat "
                                          "2 s ago); pass --force to take over"]


def test_run_exits_3_while_transient_errors_remain(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def outage(config: JobConfig) -> JobSummary:
        return JobSummary(items=5, rows_ok=3, rows_error=2, skipped=0, seconds=1.0, output=config.output_uri,
                          run_id="20261130T120000Z-abcdef", rows_error_by_kind={"transient": 2}, transient_items=2)

    monkeypatch.setattr(job, "run_job", outage)
    result = runner.invoke(main, ["run", CAPTION, "--input", "s3://b/in", "--output", "s3://b/out"])
    assert result.exit_code == 3
    assert "rows with errors:  2 (transient 2)" in result.stdout and "Run: 20261130T120000Z-abcdef" in result.stdout
    assert result.stderr.splitlines() == [
        "Error: 2 items failed with transient storage errors; run the same command again to retry them"]


@pytest.mark.parametrize("option, value", [("--vision-actors", "0"), ("--generate-gpus", "-1"), ("--fps", "0")])
def test_run_rejects_out_of_range_options(runner: CliRunner, run_job_calls: list[JobConfig],
                                          option: str, value: str) -> None:
    result = runner.invoke(main, ["run", CAPTION, "--input", "i", "--output", "o", option, value])
    assert result.exit_code == 2 and option in result.output
    assert run_job_calls == []


def test_job_entrypoint_reuses_run(bad_task: Path) -> None:
    """`python jobs/annotate.py` is `run --address auto`: same options, same validation before anything starts."""
    result = subprocess.run([sys.executable, "jobs/annotate.py", str(bad_task), "--input", "i", "--output", "o"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad_task}: generation.num_beams" in result.stderr


# --- submit, status, logs ----------------------------------------------------------------------------------------

@pytest.fixture
def job_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """Replaces Ray's JobSubmissionClient (a network client) with one that records its calls, and keeps a copy of
    the submitted working directory's `_tasks/` (links followed, as Ray's upload does) in tmp_path/cluster.
    tests/test_submit_cluster.py runs the real client against a real head."""
    import ray.job_submission

    from flamingo_annotate import cluster

    calls: list[tuple] = []

    class FakeClient:
        def __init__(self, address: str, headers: dict | None = None):
            calls.append(("connect", address, headers))

        def submit_job(self, *, entrypoint: str, runtime_env: dict) -> str:
            calls.append(("submit", entrypoint, runtime_env))
            shutil.copytree(Path(runtime_env["working_dir"]) / "_tasks", tmp_path / "cluster" / "_tasks")
            return "raysubmit_123"

        def get_job_info(self, job_id: str):
            calls.append(("info", job_id))
            state = "FAILED" if job_id.endswith("failed") else "RUNNING"
            return SimpleNamespace(status=state, message="Job is currently running.", start_time=1_700_000_000_000,
                                   end_time=None, entrypoint="python jobs/annotate.py t.yaml")

        def get_job_logs(self, job_id: str) -> str:
            calls.append(("logs", job_id))
            return "line 1\nline 2\n"

        async def tail_job_logs(self, job_id: str):
            calls.append(("tail", job_id))
            for chunk in ("a\n", "b\n"):
                yield chunk

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(cluster, "probe_dashboard", lambda address, token: None)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-token")
    return calls


def test_submit_sends_the_entrypoint_with_the_same_options(
        runner: CliRunner, job_client: list[tuple], tmp_path: Path) -> None:
    result = runner.invoke(main, ["submit", CAPTION, str(TASKS / "count.yaml"),
                                  "--input", "s3://b/in", "--output", "s3://b/out", "--address", "http://head:8265",
                                  "--generate-gpus", "0.5", "--vision-actors", "2", "--no-progress", "--force",
                                  "--retry-errors", "--flush-rows", "100", "--dtype", "bfloat16",
                                  "--generate-actors", "1-4"])
    assert result.exit_code == 0, result.output
    assert job_client[0] == ("connect", "http://head:8265", {"Authorization": "Bearer the-token"})
    _, entrypoint, runtime_env = job_client[1]
    assert shlex.split(entrypoint) == [
        "python", "jobs/annotate.py", "_tasks/0/tasks/caption.yaml", "_tasks/0/tasks/count.yaml",
        "--input", "s3://b/in", "--output", "s3://b/out", "--dtype", "bfloat16", "--vision-actors", "2",
        "--generate-actors", "1-4", "--generate-gpus", "0.5", "--no-progress", "--force", "--retry-errors",
        "--flush-rows", "100"]
    assert {"/.venv/", "/.git/", "/out/", "/.mypy_cache/"} <= set(runtime_env["excludes"])
    staged = tmp_path / "cluster" / "_tasks" / "0" / "tasks"
    assert (staged / "count.yaml").read_bytes() == (TASKS / "count.yaml").read_bytes()
    assert (staged / "demos" / "two.png").read_bytes() == (TASKS / "demos" / "two.png").read_bytes()
    assert "raysubmit_123" in result.stdout
    assert "flamingo-annotate logs raysubmit_123 --address http://head:8265 --follow" in result.stdout


def test_submitted_options_parse_back_to_the_same_job(
        runner: CliRunner, job_client: list[tuple], run_job_calls: list[JobConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--input", "s3://b/in", "--output", "s3://b/out", "--vision-cpus", "0.25", "--num-frames", "4",
            "--s3-endpoint", "http://minio:9000"]
    assert runner.invoke(main, ["submit", CAPTION, *args, "--address", "http://h:8265"]).exit_code == 0
    submitted = shlex.split(job_client[1][1])[2:]
    monkeypatch.chdir(tmp_path / "cluster")  # the entrypoint runs in the uploaded working directory
    assert runner.invoke(main, ["run", *submitted]).exit_code == 0
    assert runner.invoke(main, ["run", CAPTION, *args]).exit_code == 0
    on_cluster, here = run_job_calls
    assert on_cluster.tasks[0].sha256 == here.tasks[0].sha256  # so a re-run here resumes what the cluster wrote
    assert dataclasses.replace(on_cluster, tasks=here.tasks) == here


def test_submit_carries_task_files_from_anywhere_with_their_media(
        runner: CliRunner, job_client: list[tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "elsewhere"
    (folder / "demos" / "more").mkdir(parents=True)
    shutil.copy(TASKS / "demos" / "one.png", folder / "demos" / "one.png")
    shutil.copy(TASKS / "demos" / "two.png", folder / "demos" / "more" / "two.png")
    task = folder / "t.yaml"
    task.write_text("name: t\ndemonstrations:\n  - {media: demos/one.png, text: one}\n"
                    "  - {media: ./demos/more/../more/two.png, text: two}\n"
                    "  - {media: ../elsewhere/demos/one.png, text: one}\n"
                    f"  - {{media: {TASKS / 'demos' / 'two.png'}, text: two}}\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["submit", str(task), "--input", "in", "--output", "out", "--address", "h:8265"])
    assert result.exit_code == 0, result.output
    assert f"--input {tmp_path / 'in'} is a path on the cluster's nodes" in result.stderr
    assert f"{TASKS / 'demos' / 'two.png'} is an absolute path, which the job reads on the cluster's" in result.stderr
    assert job_client[0][1] == "http://h:8265"
    entrypoint = shlex.split(job_client[1][1])
    assert entrypoint[2:7] == ["_tasks/0/elsewhere/t.yaml", "--input", str(tmp_path / "in"),
                               "--output", str(tmp_path / "out")]
    staged = tmp_path / "cluster" / "_tasks" / "0" / "elsewhere"
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        "demos/more/two.png", "demos/one.png", "t.yaml"]
    assert load_tasks([staged / "t.yaml"])[0].sha256 == load_tasks([task])[0].sha256

    roundabout = folder / "roundabout.yaml"  # valid here, but names folders above its own
    roundabout.write_text(f"name: r\ndemonstrations:\n  - {{media: ../../{tmp_path.name}/elsewhere/demos/one.png, "
                          "text: one}\n")
    result = runner.invoke(main, ["submit", str(roundabout), "--input", "s3://b/i", "--output", "s3://b/o",
                                  "--address", "h:8265"])
    assert result.exit_code == 1 and "reaches outside the task's folder" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and sum(call[0] == "submit" for call in job_client) == 1


def test_submit_with_a_bad_task_submits_nothing(runner: CliRunner, job_client: list[tuple], bad_task: Path) -> None:
    result = runner.invoke(main, ["submit", str(bad_task), "--input", "i", "--output", "o", "--address", "http://h"])
    assert result.exit_code == 2 and job_client == []


def test_status_and_logs(runner: CliRunner, job_client: list[tuple]) -> None:
    status = runner.invoke(main, ["status", "raysubmit_123", "--address", "http://h:8265"])
    assert status.exit_code == 0, status.output
    assert status.stdout.splitlines() == ["raysubmit_123: RUNNING (Job is currently running.)",
                                          "  started:    2023-11-14 22:13:20 UTC",
                                          "  entrypoint: python jobs/annotate.py t.yaml"]
    failed_status = runner.invoke(main, ["status", "raysubmit_failed", "--address", "http://h:8265"])
    assert failed_status.exit_code == 1 and failed_status.stdout.startswith("raysubmit_failed: FAILED")
    logs = runner.invoke(main, ["logs", "raysubmit_123", "--address", "http://h:8265"])
    assert logs.stdout == "line 1\nline 2\n"
    failed = SimpleNamespace(status="FAILED", start_time=1_700_000_000_000, end_time=1_700_000_042_000,
                             entrypoint="python jobs/annotate.py t.yaml",
                             message="Job entrypoint command failed with exit code 1, last available logs:\n"
                                     "Running entrypoint ...\nError: no input files at /data/in\n")
    assert describe("raysubmit_9", failed).splitlines() == [
        "raysubmit_9: FAILED (Job entrypoint command failed with exit code 1, last available logs:)",
        "  started:    2023-11-14 22:13:20 UTC", "  ended:      2023-11-14 22:14:02 UTC (42 s)",
        "  entrypoint: python jobs/annotate.py t.yaml", "  last line:  Error: no input files at /data/in"]
    follow = runner.invoke(main, ["logs", "raysubmit_123", "--address", "http://h:8265", "--follow"])
    assert follow.stdout == "a\nb\n" and ("tail", "raysubmit_123") in job_client


# --- query -------------------------------------------------------------------------------------------------------

def test_query_summary(runner: CliRunner, tmp_path: Path) -> None:
    output = write_output(tmp_path / "out")
    result = runner.invoke(main, ["query", str(output)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{output}: 6 rows, 1 with errors"
    assert lines[1].split() == ["caption", "3", "rows", "1", "errors"]
    assert lines[2].split() == ["classify_shape", "3", "rows", "0", "errors"]
    assert "/in/a.png | caption | A red circle." in result.stdout
    assert "decode failed" not in result.stdout  # samples are ok rows


def test_query_summary_escapes_control_characters_in_annotations() -> None:
    from pipeline.query import OutputSummary

    summary = OutputSummary("out", 1, 0, (), ({"id": "a", "annotation": "\x1b[31mred\x02"},))
    assert summary.format().splitlines()[-1] == "  a | \\x1b[31mred\\x02"


def test_query_sql_over_the_annotations_view(runner: CliRunner, tmp_path: Path) -> None:
    output = write_output(tmp_path / "out")
    sql = "SELECT task, count(*) AS n, count(error) AS errors FROM annotations GROUP BY task ORDER BY task"
    result = runner.invoke(main, ["query", str(output), sql])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in rows][2:] == [["caption", "3", "1"],
                                                                    ["classify_shape", "3", "0"]]


def test_query_items_view_has_one_column_per_task(tmp_path: Path) -> None:
    from pipeline import query

    con = query.connect(str(write_output(tmp_path / "out")))
    relation = con.sql("SELECT * FROM items ORDER BY id")
    assert relation.columns == ["id", "source", "caption", "classify_shape"]
    assert relation.fetchall() == [("/in/a.png", "/in/a.png", "A red circle.", "circle"),
                                   ("/in/b.png", "/in/b.png", "A green square.", "square"),
                                   ("/in/c.mp4", "/in/c.mp4", None, "triangle")]


def test_query_items_columns_are_named_by_output_column(tmp_path: Path) -> None:
    from pipeline import query

    table = output_rows()
    table = table.set_column(table.schema.get_field_index("output_column"), "output_column",
                             pa.array(["caption", "shape"] * 3))
    con = query.connect(str(write_output(tmp_path / "out", table)))
    assert con.sql("SELECT * FROM items").columns == ["id", "source", "caption", "shape"]


@pytest.mark.parametrize("args, message", [
    (["SELECT nope FROM annotations"], "nope"),
    ([], "no 'task', 'error' column"),
])
def test_query_errors_are_reported_not_raised(runner: CliRunner, tmp_path: Path, args: list[str],
                                              message: str) -> None:
    output = tmp_path / "out"
    output.mkdir()
    pq.write_table(pa.table({"uri": ["a"]}), output / "part-0.parquet")
    result = runner.invoke(main, ["query", str(output), *args])
    assert result.exit_code == 1 and "Error:" in result.stderr and message in result.stderr


def test_query_missing_output(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["query", str(tmp_path / "none")])
    assert result.exit_code == 1 and "Error:" in result.stderr


def test_an_output_without_rows_yet_queries_as_an_empty_table(runner: CliRunner, tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / "_runs").mkdir(parents=True)              # a run stopped before its first commit
    summary = runner.invoke(main, ["query", str(output)])
    assert summary.exit_code == 0 and "0 rows, 0 with errors" in summary.output
    sql = runner.invoke(main, ["query", str(output), "SELECT count(*), count(DISTINCT task) FROM annotations"])
    assert sql.exit_code == 0, sql.output
    assert [cell.strip() for cell in sql.output.splitlines()[4].strip("│").split("│")] == ["0", "0"]


def test_query_an_output_on_s3(runner: CliRunner, tmp_path: Path, s3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.new_bucket()
    output = s3.upload_tree(bucket, "results/run1", write_output(tmp_path / "out"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint must come from --s3-endpoint
    result = runner.invoke(main, ["query", output, "--s3-endpoint", s3.endpoint,
                                  "SELECT count(*) AS n FROM annotations WHERE error IS NULL"])
    assert result.exit_code == 0, result.output
    box_rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert box_rows[0].strip("│ ") == "n" and box_rows[-1].strip("│ ") == "5"


# --- demo --------------------------------------------------------------------------------------------------------

def test_demo_runs_the_bundled_tasks_on_the_bundled_sample(
        runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    configs: list[JobConfig] = []

    def fake_run_job(config: JobConfig) -> JobSummary:
        configs.append(config)
        write_output(Path(config.output_uri))
        return JobSummary(items=3, rows_ok=5, rows_error=1, skipped=0, seconds=1.0, output=config.output_uri)

    monkeypatch.setattr(job, "run_job", fake_run_job)
    result = runner.invoke(main, ["demo", "--output", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    (config,) = configs
    assert config == JobConfig(tasks=load_tasks(EXAMPLES), input_uri=str(PROJECT_ROOT / "jobs" / "sample"),
                               output_uri=str(tmp_path / "demo"))
    assert "Annotated 3 items" in result.stdout and "/in/a.png | caption | A red circle." in result.stdout


# --- cluster.yaml ------------------------------------------------------------------------------------------------

def test_cluster_config_passes_rays_own_validation() -> None:
    """`ray up` fills in the provider's defaults and validates against ray/autoscaler/ray-schema.json; so do we
    (the AWS calls that follow in `ray up` need an account)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    head, workers = raw["available_node_types"][raw["head_node_type"]], raw["available_node_types"]["gpu_worker"]
    assert head["node_config"]["InstanceType"].startswith("m5")
    assert workers["node_config"]["InstanceType"].startswith("g5")
    assert (workers["min_workers"], workers["max_workers"]) == (0, 8)
    assert any("pip install" in c and "-e" in c for c in raw["setup_commands"])
    (remote, local), = raw["file_mounts"].items()
    assert (PROJECT_ROOT / local).resolve() == PROJECT_ROOT and remote in raw["setup_commands"][0]
