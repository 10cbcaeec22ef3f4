"""`run --config JOB.yaml` (flamingo_annotate/job_file.py): a job file means exactly what the same options on the
command line mean, relative paths are relative to the file, flags win, and a bad file stops before anything runs."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from flamingo_annotate.cli import PROJECT_ROOT, main
from pipeline.job import JobConfig

TASKS = PROJECT_ROOT / "jobs" / "tasks"


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A folder holding a job file's task files (with their demonstrations), as a team keeps them."""
    shutil.copytree(TASKS, tmp_path / "tasks")
    return tmp_path


def write_job(folder: Path, text: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_a_job_file_means_what_the_same_options_mean(
        job_dir: Path, run_job_calls: list[JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    job_file = write_job(job_dir, """
        tasks: [tasks/caption.yaml, tasks/count.yaml]
        input: s3://bucket/shards/
        output: annotations
        model: some/checkpoint
        vision-actors: 2
        vision_batch_size: 8
        generate-gpus: 0.5
        num-frames: 4
        no-progress: true
        retry-errors: true
        s3-endpoint: http://127.0.0.1:9000
    """)
    monkeypatch.chdir(PROJECT_ROOT / "jobs")   # anywhere else: paths in the file are relative to the file
    code, output = invoke("run", "--config", str(job_file))
    assert code == 0, output
    code, output = invoke(
        "run", str(job_dir / "tasks" / "caption.yaml"), str(job_dir / "tasks" / "count.yaml"),
        "--input", "s3://bucket/shards/", "--output", str(job_dir / "annotations"), "--model", "some/checkpoint",
        "--vision-actors", "2", "--vision-batch-size", "8", "--generate-gpus", "0.5", "--num-frames", "4",
        "--no-progress", "--retry-errors", "--s3-endpoint", "http://127.0.0.1:9000")
    assert code == 0, output
    from_file, from_flags = run_job_calls
    assert from_file == from_flags
    assert [t.name for t in from_file.tasks] == ["caption", "count"]
    assert from_file.output_uri == str(job_dir / "annotations")
    assert (from_file.vision.pool_size, from_file.generation.num_gpus, from_file.progress) == (2, 0.5, False)


def test_options_on_the_command_line_win_over_the_file(job_dir: Path, run_job_calls: list[JobConfig]) -> None:
    job_file = write_job(job_dir, """
        tasks: tasks/caption.yaml
        input: s3://bucket/shards/
        output: s3://bucket/out/
        vision-actors: 2
    """)
    code, output = invoke("run", "--config", str(job_file), str(job_dir / "tasks" / "count.yaml"),
                          "--vision-actors", "3", "--output", "s3://bucket/other/")
    assert code == 0, output
    (config,) = run_job_calls
    assert [t.name for t in config.tasks] == ["count"]            # task files given replace the file's list
    assert (config.vision.pool_size, config.output_uri) == (3, "s3://bucket/other/")
    assert config.input_uri == "s3://bucket/shards/"              # what the command line leaves out comes from the file


def test_every_problem_of_a_bad_job_file_is_listed_and_nothing_runs(
        job_dir: Path, run_job_calls: list[JobConfig]) -> None:
    job_file = write_job(job_dir, """
        tasks: [tasks/caption.yaml]
        input: s3://bucket/shards/
        ouput: s3://bucket/out/
        vision-actors: 0
        generate-gpus: lots
        fps: -1
    """)
    code, output = invoke("run", "--config", str(job_file))
    assert code == 2 and run_job_calls == []
    lines = output.splitlines()
    assert lines[0] == "4 problems in the job file:"
    assert f"{job_file}: ouput: not an option of `run` (did you mean output?)" in lines
    assert f"{job_file}: vision-actors: '0': actor counts are at least 1, and MIN is at most MAX" in lines
    assert any(line.startswith(f"{job_file}: generate-gpus: 'lots' is not a valid float") for line in lines)
    assert f"{job_file}: fps: -1.0 is not in the range x>0." in lines


@pytest.mark.parametrize("text, problem", [
    ("- a list\n", "must be a mapping of option names to values, got list"),
    ("input: [unclosed\n", "not valid YAML: "),
    ("tasks: []\n", "tasks: must be a task file path or a non-empty list of them"),
    ("input: !!python/object/apply:os.system ['touch MARKER']\n", "not valid YAML: "),
])
def test_unreadable_job_files_are_one_line_each(
        job_dir: Path, run_job_calls: list[JobConfig], text: str, problem: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(job_dir)
    job_file = write_job(job_dir, text)
    code, output = invoke("run", "--config", str(job_file))
    assert code == 2 and run_job_calls == []
    assert output.splitlines()[1].startswith(f"{job_file}: {problem}")
    assert not (job_dir / "MARKER").exists()   # YAML tags never build objects or run code


def test_a_missing_job_file_is_a_usage_error(tmp_path: Path, run_job_calls: list[JobConfig]) -> None:
    code, output = invoke("run", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and run_job_calls == []
    assert f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory" in output
