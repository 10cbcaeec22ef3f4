"""`flamingo-annotate`: validate task files, run or submit annotation jobs, query their output.

The commands only parse options and print; the work lives in pipeline.task, pipeline.job and pipeline.query.
The commands that make or measure a model (train, recipe, eval, bench) are in model_commands.py.
Ray, torch and DuckDB are imported inside the commands that need them, so `--help` is instant, and `validate`
loads only what decoding its tasks' demonstrations takes.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from flamingo_annotate.job_file import job_file_option
from flamingo_annotate.model_commands import MODEL_COMMANDS
from flamingo_annotate.options import PoolSize, PoolSizeType, dtype_option, trust_remote_code_option
from pipeline.task import MAX_FRAMES, Task, TaskError, check_tasks, is_uri

if TYPE_CHECKING:  # pipeline.job imports the model library (torch)
    from pipeline.job import JobConfig, JobSummary
    from pipeline.plan import JobPlan

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository root, which `submit` uploads
JOBS_DIR = PROJECT_ROOT / "jobs"
ENTRYPOINT = "jobs/annotate.py"
# Kept out of the working_dir uploaded with `submit` (Ray also honours .gitignore). Anchored at the project's
# root, so that task media in folders of these names (`_tasks/0-x/out/a.png`) still travel.
UPLOAD_EXCLUDES = ["/.venv/", "/.git/", "/out/", "/build/", "/.pytest_cache/", "/.mypy_cache/", "/.ruff_cache/",
                   "__pycache__/", "*.egg-info/"]
TASK_ERROR_EXIT = 2  # as click's own usage errors: nothing was started
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _task_options(command: Callable) -> Callable:
    """Options of every command that loads task files."""
    for option in reversed([
        click.argument("task_files", metavar="TASK...", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--s3-endpoint", metavar="URL",
                     help="S3-compatible endpoint (MinIO, moto, ...); credentials come from the usual AWS settings."),
        click.option("--no-remote-check", is_flag=True,
                     help="Do not check that s3://... demonstration media exist (e.g. no credentials here)."),
    ]):
        command = option(command)
    return command


def _check_keep_columns(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse, before anything starts, a kept column that would replace an output column."""
    from pipeline.kept_columns import check_keep_columns, parse_keep_columns

    if value is not None:
        try:
            check_keep_columns(parse_keep_columns(value))
        except ValueError as error:
            raise click.BadParameter(str(error).removeprefix("--keep-columns: ")) from None
    return value


def _check_media_keys(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from media.files import parse_media_keys

    if value is not None:
        try:
            parse_media_keys(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None
    return value


def _job_options(command: Callable) -> Callable:
    """Options shared by `run` and `submit`. Unset ones (None) keep pipeline.job's defaults."""
    count, fraction = click.IntRange(min=1), click.FloatRange(min=0)
    for option in reversed([
        job_file_option,
        click.option("--input", "input_uri", metavar="URI", required=True,
                     help="Folder, file or glob of images/videos: local path or s3://..."),
        click.option("--output", "output_uri", metavar="URI", required=True,
                     help="Folder for the Parquet output; a re-run resumes, skipping items already there."),
        click.option("--model", metavar="NAME_OR_PATH", help="Model name or checkpoint folder."),
        trust_remote_code_option,
        dtype_option,
        click.option("--vision-actors", type=PoolSizeType(),
                     help="Vision encoder actors: N, or MIN-MAX to autoscale (e.g. 1-8)."),
        click.option("--vision-batch-size", type=count, help="Items per vision encoder batch."),
        click.option("--vision-gpus", type=fraction, help="GPUs per vision encoder actor (fractions share one)."),
        click.option("--vision-cpus", type=fraction, help="CPUs per vision encoder actor."),
        click.option("--generate-actors", type=PoolSizeType(),
                     help="Language model actors: N, or MIN-MAX to autoscale."),
        click.option("--generate-batch-size", type=count, help="Items per language model batch."),
        click.option("--generate-gpus", type=fraction, help="GPUs per language model actor."),
        click.option("--generate-cpus", type=fraction, help="CPUs per language model actor."),
        click.option("--num-frames", type=click.IntRange(min=1, max=MAX_FRAMES),
                     help="Frames per video item (overrides the task files)."),
        click.option("--fps", type=click.FloatRange(min=0, min_open=True),
                     help="Sample video frames at this rate instead of evenly (overrides the task files)."),
        click.option("--max-pixels", type=count,
                     help="Largest picture decoded (width x height; default 50000000): larger ones are error rows."),
        click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True),
                     help="Seconds one item may take to decode before it is an error row (default 60)."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
        click.option("--force", is_flag=True,
                     help="Take over the output even while another run holds its lease (_lease.json)."),
        click.option("--retry-errors", is_flag=True,
                     help="Re-attempt every error row of the output, not only transient ones."),
        click.option("--flush-rows", type=count, help="Commit an output file every N rows (default 10000)."),
        click.option("--flush-seconds", type=click.FloatRange(min=0, min_open=True),
                     help="... or every S seconds, whichever comes first (default 30)."),
        click.option("--target-file-mb", type=click.FloatRange(min=0, min_open=True),
                     help="Merge the run's committed files into files of about N MB (default 128)."),
        click.option("--keep-columns", metavar="NAMES", callback=_check_keep_columns,
                     help="Input metadata to copy into output columns of the same name, e.g. url,caption,key "
                          "(Parquet columns, WebDataset .json fields, .txt as caption); default: key for "
                          "WebDataset/Parquet input; '' for none."),
        click.option("--media-key", metavar="EXTS", callback=_check_media_keys,
                     help="WebDataset: a sample's media is the first of these members it has, e.g. "
                          "'jpg;png;webp' (default: its first image/video member)."),
        click.option("--include-sidecars", is_flag=True,
                     help="Read img2dataset/video2dataset sidecar files (*_stats.json, .parquet beside a .tar, "
                          "...) as items too."),
        click.option("--limit", type=count, help="Annotate at most N new items this run; a re-run continues."),
        click.option("--sample", type=click.FloatRange(min=0, max=1, min_open=True), metavar="FRACTION",
                     help="Only this fraction of the items, picked by a hash of their id: every run picks the same."),
        click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
                     help="Console log level (default WARNING); INFO or DEBUG also shows Ray's own output."),
        click.option("-v", "--verbose", is_flag=True, help="Same as --log-level INFO."),
    ]):
        command = option(command)
    return command


def _dashboard_option(command: Callable) -> Callable:
    """Where the cluster's job server is, and its token (flamingo_annotate/cluster.py)."""
    command = click.option("--token-file", metavar="FILE",
                           help="The cluster's token (`ray get-auth-token` on the head prints it); default: "
                                "RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.")(command)
    return click.option("--address", metavar="URL", required=True, envvar="RAY_API_SERVER_ADDRESS",
                        help="The cluster's dashboard, e.g. http://HEAD:8265 (or RAY_API_SERVER_ADDRESS).")(command)


@click.group(commands=MODEL_COMMANDS)
@click.version_option(package_name="flamingo-annotate")
def main() -> None:
    """Annotate images and videos with a Flamingo model using few-shot task files, on Ray Data."""
    logging.basicConfig(format="%(levelname)s: %(message)s")


@main.command()
@_task_options
def validate(task_files: tuple[str, ...], s3_endpoint: str | None, no_remote_check: bool) -> None:
    """Check task files without running anything; exit status 2 if any is invalid."""
    tasks, problems = check_tasks(task_files, check_remote_media=not no_remote_check,
                                  storage_options=_storage_options(s3_endpoint))
    for task in tasks:
        click.echo(f"ok  {task.name:<20} {task.kind:<9} {len(task.demonstrations)} demos  "
                   f"sha256:{task.sha256[:12]}  {task.path}")
        for warning in task.warnings():  # allowed, so the exit status stays 0
            click.echo(f"Warning: {warning}", err=True)
    if problems:
        _exit_with_problems(TaskError(problems))


@main.command()
@_task_options
@_job_options
@click.option("--address", metavar="ADDR", help="Ray cluster to join ('auto', ray://...); default: a local one.")
@click.option("--dry-run", is_flag=True,
              help="List and count the input, check the output, print the plan; start nothing, write nothing.")
def run(task_files: tuple[str, ...], address: str | None, no_remote_check: bool, dry_run: bool,
        **options: Any) -> None:
    """Annotate INPUT with the TASK files into OUTPUT.

    Exit status: 0 done (or nothing to do); 1 the job could not run or stopped (one line says why); 2 bad task
    files; 3 done, but items failed with transient storage errors (run it again); 4 another run is writing
    OUTPUT."""
    from pipeline import job

    tasks = _load_tasks_or_exit(task_files, s3_endpoint=options["s3_endpoint"], no_remote_check=no_remote_check)
    config = _job_config(tasks, address=address, **options)
    logging.getLogger().setLevel(config.log_level)
    if dry_run:
        try:
            plan = job.plan_job(config)
        except job.JobError as error:
            click.echo(f"Error: {error}", err=True)
            click.get_current_context().exit(error.exit_code)
        _print_plan(plan, config)
        return
    summary = _run_job_or_exit(config)
    _print_summary(summary, options["s3_endpoint"])
    if summary.transient_items:
        click.echo(f"Error: {summary.transient_items} items failed with transient storage errors; "
                   "run the same command again to retry them", err=True)
        click.get_current_context().exit(job.EXIT_TRANSIENT)


@main.command()
@_task_options
@_job_options
@_dashboard_option
@click.pass_context
def submit(ctx: click.Context, task_files: tuple[str, ...], address: str, token_file: str | None,
           no_remote_check: bool, **options: Any) -> None:
    """Send the same job to a Ray cluster: the project, the task files and the demonstration media they name by
    relative path are uploaded with it.

    INPUT, OUTPUT and absolute media paths are read on the cluster's nodes (use s3://... for what is here)."""
    from flamingo_annotate import cluster

    tasks = _load_tasks_or_exit(task_files, s3_endpoint=options["s3_endpoint"], no_remote_check=no_remote_check)
    server = cluster.JobServer(address, token_file)
    paths = {name: _absolute_if_local(options[name]) for name in ("input_uri", "output_uri")}
    for name, flag in (("input_uri", "--input"), ("output_uri", "--output")):
        if not is_uri(paths[name]):
            click.echo(f"Warning: {flag} {paths[name]} is a path on the cluster's nodes, not uploaded from here; "
                       "use s3://... to share data with the cluster.", err=True)
    with cluster.job_package(tasks, PROJECT_ROOT, UPLOAD_EXCLUDES) as package:
        for warning in package.warnings:
            click.echo(f"Warning: {warning}", err=True)
        options_given = _forwarded_options(ctx, exclude={"address", "token_file"}, values=paths)
        entrypoint = shlex.join(["python", ENTRYPOINT, *package.task_paths, *options_given])
        job_id = server.submit(entrypoint, {"working_dir": str(package.working_dir), "excludes": UPLOAD_EXCLUDES})
    again = f"--address {shlex.quote(server.address)}" + (f" --token-file {shlex.quote(token_file)}"
                                                          if token_file else "")
    click.echo(f"Submitted job {job_id} to {server.address}\n"
               f"  follow:  flamingo-annotate logs {job_id} {again} --follow\n"
               f"  status:  flamingo-annotate status {job_id} {again}")


@main.command()
@click.argument("job_id")
@_dashboard_option
def status(job_id: str, address: str, token_file: str | None) -> None:
    """Show a submitted job's status, when it started and ended, and its command line.

    Exit status: 0 pending, running or succeeded; 1 failed or stopped (so scripts can wait on it)."""
    from flamingo_annotate import cluster

    server = cluster.JobServer(address, token_file)
    info = server.info(job_id)
    click.echo(cluster.describe(job_id, info))
    if str(info.status).rsplit(".", 1)[-1] in ("FAILED", "STOPPED"):
        click.get_current_context().exit(1)


@main.command()
@click.argument("job_id")
@_dashboard_option
@click.option("--follow", is_flag=True, help="Keep printing new output until the job ends.")
def logs(job_id: str, address: str, token_file: str | None, follow: bool) -> None:
    """Print a submitted job's output."""
    from flamingo_annotate import cluster

    server = cluster.JobServer(address, token_file)
    if follow:
        server.follow(job_id, lambda lines: click.echo(lines, nl=False))
    else:
        click.echo(server.logs(job_id), nl=False)


@main.command()
@click.argument("output", metavar="OUTPUT")
@click.argument("sql", required=False)
@click.option("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for an s3:// OUTPUT.")
@click.option("--max-rows", type=click.IntRange(min=1), default=40, show_default=True, help="Rows to print.")
def query(output: str, sql: str | None, s3_endpoint: str | None, max_rows: int) -> None:
    """Summarize OUTPUT, or run SQL over it: the view `annotations` has its rows, `items` one row per item.

    Example: flamingo-annotate query out/demo "SELECT task, count(*) FROM annotations GROUP BY task"
    """
    import duckdb

    from pipeline import query as output_query
    from pipeline.runs import read_records

    options = _storage_options(s3_endpoint)
    try:
        con = output_query.connect(output, options)
        text = (output_query.run_sql(con, sql, max_rows) if sql
                else output_query.summarize(con, output, records=read_records(output, options)).format())
    except (OSError, ValueError, duckdb.Error) as error:
        raise click.ClickException(str(error)) from None
    click.echo(text)


@main.command()
@click.argument("output", metavar="OUTPUT")
@click.option("--target-file-mb", type=click.FloatRange(min=0, min_open=True), default=128, show_default=True,
              help="Merge files smaller than this into files of about this size.")
@click.option("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for an s3:// OUTPUT.")
@click.option("--force", is_flag=True, help="Take over the output even while a run holds its lease (_lease.json).")
def compact(output: str, target_file_mb: float, s3_endpoint: str | None, force: bool) -> None:
    """Merge OUTPUT's small Parquet files into large ones, every row kept once (under the output's lease)."""
    from media.errors import describe_error
    from pipeline.compact import compact_output
    from pipeline.lease import LeaseHeld, LeaseLost

    try:
        stats = compact_output(output, target_file_mb=target_file_mb, storage_options=_storage_options(s3_endpoint),
                               force=force)
    except (LeaseHeld, LeaseLost) as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:
        raise click.ClickException(f"cannot compact {output}: {describe_error(error)}") from None
    unreadable = f"; {stats.unreadable} unreadable files left as they are" if stats.unreadable else ""
    click.echo(f"{output}: merged {stats.files_merged} files into {stats.files_written} ({stats.rows} rows); "
               f"{stats.files_before - stats.files_merged + stats.files_written} data files now{unreadable}")


@main.command()
@click.argument("output", metavar="OUTPUT")
@click.option("--html", "html_file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="The page to write; further pages go beside it as FILE-2.html, FILE-3.html, ...")
@click.option("--task", "tasks", multiple=True, metavar="NAME", help="Only this task's rows (repeat for several).")
@click.option("--errors-only", is_flag=True, help="Only error rows.")
@click.option("--where", metavar="SQL", help="Only rows where this condition over the `annotations` columns holds, "
                                             "e.g. \"annotation LIKE '%red%'\".")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="At most N items, in id order (0: all).")
@click.option("--page-size", type=click.IntRange(min=1), default=200, show_default=True, help="Items per page.")
@click.option("--thumbnail-size", type=click.IntRange(min=16, max=1024), default=192, show_default=True,
              help="Pictures (and each frame of a video's strip) fit in this many pixels square.")
@click.option("--video-frames", type=click.IntRange(min=1, max=16), default=4, show_default=True,
              help="Frames in a video's strip.")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=8, show_default=True,
              help="Sources read and decoded at once.")
@click.option("--media-key", metavar="EXTS", callback=_check_media_keys,
              help="WebDataset: the members that are a sample's media (default: as the last run read them).")
@click.option("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3:// outputs and sources.")
def report(output: str, html_file: str, tasks: tuple[str, ...], errors_only: bool, where: str | None, limit: int,
           page_size: int, thumbnail_size: int, video_frames: int, workers: int, media_key: str | None,
           s3_endpoint: str | None) -> None:
    """Write OUTPUT as static HTML pages: each item's picture (a strip of frames for a video) with every
    task's annotation, score, label scores or error; filter by task, text and errors in the page.

    Example: flamingo-annotate report out/demo --html out/demo.html
    """
    import duckdb

    from flamingo_annotate.report import ReportOptions, build_report
    from media.files import parse_media_keys
    from media.thumbnails import ThumbnailConfig

    options = ReportOptions(
        tasks=tasks, errors_only=errors_only, where=where, limit=limit or None, page_size=page_size,
        storage_options=_storage_options(s3_endpoint),
        thumbnail=ThumbnailConfig(size=thumbnail_size, video_frames=video_frames, workers=workers,
                                  media_keys=None if media_key is None else parse_media_keys(media_key)))
    try:
        summary = build_report(output, html_file, options,
                               on_page=lambda page, pages: click.echo(f"page {page}/{pages}", err=True))
    except (OSError, ValueError, duckdb.Error) as error:
        raise click.ClickException(str(error)) from None
    click.echo(summary.format())


@main.command()
@click.option("--output", "output_uri", default="out/demo", show_default=True, help="Where to write the result.")
@dtype_option
def demo(output_uri: str, dtype: str | None) -> None:
    """Annotate the bundled sample with the bundled example tasks and the default model."""
    from pipeline import job
    from pipeline import query as output_query

    task_files = sorted(str(path) for path in (JOBS_DIR / "tasks").glob("*.yaml"))
    tasks = _load_tasks_or_exit(task_files, s3_endpoint=None, no_remote_check=False)
    summary = _run_job_or_exit(job.JobConfig(tasks=tasks, input_uri=str(JOBS_DIR / "sample"),
                                             output_uri=_absolute_if_local(output_uri), dtype=dtype or "auto"))
    _print_summary(summary, None)
    con = output_query.connect(summary.output)
    click.echo(output_query.summarize(con, summary.output, samples=8).format())


@main.command()
@click.argument("task_files", nargs=-1, required=True, metavar="TASK...")
@click.option("--gold", "gold_uri", required=True, metavar="URI",
              help="Gold answers: Parquet, CSV or JSONL with columns item, answer and optionally task.")
@click.option("--output", "output_uri", default=None, metavar="DIR",
              help="Keep the job's output here (default: a temp dir).")
@click.option("--json", "json_file", default=None, type=click.Path(dir_okay=False),
              help="Also write the report as JSON.")
@click.option("--shots", default="all", show_default=True, metavar="K,...",
              help="Numbers of demonstrations to run each task with, e.g. 0,1,2,all: the shot curve.")
@click.option("--model", default=None, help="Model name or folder (default: the bundled one).")
@click.option("--item-column", default="item", show_default=True)
@click.option("--answer-column", default="answer", show_default=True)
@click.option("--task-column", default="task", show_default=True, help="Used when the gold file has it.")
@click.option("--s3-endpoint", default=None, metavar="URL", help="S3-compatible endpoint for s3:// URIs.")
@click.option("--no-progress", is_flag=True)
@dtype_option
def evaluate(task_files: tuple[str, ...], gold_uri: str, output_uri: str | None, json_file: str | None, shots: str,
             model: str | None, item_column: str, answer_column: str, task_column: str, s3_endpoint: str | None,
             no_progress: bool, dtype: str | None) -> None:
    """Run the TASK files on the items of a gold set, as `run` does, and score their answers (see
    flamingo_annotate/gold.py for the gold file's columns and the scores)."""
    import json

    from flamingo_annotate import gold
    from pipeline import job

    try:
        shot_list = gold.parse_shots(shots)
        rows = gold.read_gold(gold_uri, _storage_options(s3_endpoint), item_column=item_column,
                              answer_column=answer_column, task_column=task_column)
    except (ValueError, gold.GoldError) as error:
        raise click.ClickException(str(error)) from None
    tasks = _load_tasks_or_exit(task_files, s3_endpoint=s3_endpoint, no_remote_check=False)
    try:
        gold.check_tasks_against_gold(tasks, rows, gold_uri)
    except gold.GoldError as error:
        raise click.ClickException(str(error)) from None

    def config_for(job_tasks: tuple[Task, ...], files: tuple[str, ...], out: str) -> JobConfig:
        return job.JobConfig(tasks=job_tasks, input_uri=gold_uri, output_uri=_absolute_if_local(out), input_files=files,
                             storage_options=_storage_options(s3_endpoint), progress=not no_progress,
                             **_given(model=model, dtype=dtype))
    try:
        report = gold.evaluate_tasks(tasks, rows, config_for, output=output_uri, shots=shot_list,
                                     storage_options=_storage_options(s3_endpoint))
    except job.JobError as error:
        click.echo(f"Error: {error}", err=True)
        click.get_current_context().exit(error.exit_code)
    click.echo(gold.format_report(report))
    if json_file:
        Path(json_file).write_text(json.dumps(report, indent=1) + "\n")


def _load_tasks_or_exit(task_files: Sequence[str], *, s3_endpoint: str | None,
                        no_remote_check: bool) -> tuple[Task, ...]:
    """The tasks, or exit with every problem before anything has started."""
    tasks, problems = check_tasks(task_files, check_remote_media=not no_remote_check,
                                  storage_options=_storage_options(s3_endpoint))
    if problems:
        _exit_with_problems(TaskError(problems))
    return tasks


def _run_job_or_exit(config: JobConfig) -> JobSummary:
    """pipeline.job.run_job, its JobError shown as one line and turned into the exit status."""
    from pipeline import job

    try:
        return job.run_job(config)
    except job.JobError as error:
        click.echo(f"Error: {error}", err=True)
        click.get_current_context().exit(error.exit_code)


def _exit_with_problems(error: TaskError) -> NoReturn:
    count = len(error.problems)
    click.echo(f"{count} problem{'s' if count > 1 else ''} in task files:\n{error}", err=True)
    click.get_current_context().exit(TASK_ERROR_EXIT)


def _job_config(tasks: Sequence[Task], *, input_uri: str, output_uri: str, address: str | None, model: str | None,
                dtype: str | None, vision_actors: PoolSize | None, vision_batch_size: int | None,
                vision_gpus: float | None, vision_cpus: float | None, generate_actors: PoolSize | None,
                generate_batch_size: int | None,
                generate_gpus: float | None, generate_cpus: float | None, num_frames: int | None,
                fps: float | None, max_pixels: int | None, decode_timeout: float | None, s3_endpoint: str | None,
                no_progress: bool, force: bool, retry_errors: bool,
                flush_rows: int | None, flush_seconds: float | None, target_file_mb: float | None,
                trust_remote_code: bool, keep_columns: str | None, media_key: str | None, include_sidecars: bool,
                limit: int | None,
                sample: float | None, log_level: str | None, verbose: bool) -> JobConfig:
    """A pipeline.job.JobConfig from the command line; options not given keep JobConfig's defaults."""
    from media.files import parse_media_keys
    from pipeline.job import JobConfig, StageResources, default_generation_resources
    from pipeline.kept_columns import parse_keep_columns

    vision = StageResources(**_given(batch_size=vision_batch_size, num_gpus=vision_gpus, num_cpus=vision_cpus),
                            **_pool(vision_actors))
    generation = dataclasses.replace(default_generation_resources(), **_given(
        batch_size=generate_batch_size, num_gpus=generate_gpus, num_cpus=generate_cpus), **_pool(generate_actors))
    return JobConfig(tasks=tuple(tasks), input_uri=_absolute_if_local(input_uri),
                     output_uri=_absolute_if_local(output_uri), vision=vision, generation=generation,
                     storage_options=_storage_options(s3_endpoint), progress=not no_progress, force=force,
                     retry_errors=retry_errors, flush_rows=flush_rows, flush_seconds=flush_seconds,
                     target_file_mb=target_file_mb, trust_remote_code=trust_remote_code,
                     include_sidecars=include_sidecars,
                     keep_columns=None if keep_columns is None else parse_keep_columns(keep_columns),
                     media_keys=None if media_key is None else parse_media_keys(media_key),
                     limit=limit, sample=sample,
                     log_level=(log_level or ("INFO" if verbose else "WARNING")).upper(),
                     **_given(model=model, dtype=dtype, address=address, num_frames=num_frames, fps=fps,
                              max_pixels=max_pixels, decode_timeout_s=decode_timeout))


def _forwarded_options(ctx: click.Context, exclude: set[str], values: Mapping[str, str] | None = None) -> list[str]:
    """The command's options as given, as command-line arguments again (to run the same job elsewhere); `values`
    replaces some (absolute paths for relative ones)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = (values or {}).get(param.name or "", ctx.params.get(param.name))
        if not isinstance(param, click.Option) or param.name in exclude or value is None or value is False:
            continue
        args += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return args


def _print_summary(summary: JobSummary, s3_endpoint: str | None) -> None:
    if summary.nothing_to_do:
        click.echo(f"Nothing to do: {summary.nothing_to_do}")
        return
    endpoint = f" --s3-endpoint {shlex.quote(s3_endpoint)}" if s3_endpoint else ""
    click.echo(f"Annotated {summary.items} items in {summary.seconds:.1f} s "
               f"({summary.items_per_second:.2f} items/s)\n"
               f"  rows ok:           {summary.rows_ok}\n"
               f"  rows with errors:  {summary.rows_error}{_by_kind(summary.rows_error_by_kind)}\n"
               f"  skipped (resumed): {summary.skipped}\n"
               + (f"  earlier error rows replaced: {summary.superseded}\n" if summary.superseded else "")
               + (f"  sidecar files left out: {summary.sidecars}\n" if summary.sidecars else "")
               + (f"Run: {summary.run_id}\n" if summary.run_id else "")
               + f"Output: {summary.output}\n"
               f"Query it: flamingo-annotate query {shlex.quote(summary.output)}{endpoint} "
               "[\"SELECT ... FROM annotations\"]")


def _print_plan(plan: JobPlan, config: JobConfig) -> None:
    """The dry run's plan: what the input holds, what the output already has, what a run would do."""
    kinds = ", ".join(f"{n} {_KIND_NAMES.get(kind, kind)}" for kind, n in sorted(plan.kinds().items()))
    if plan.items is not None:
        items = f"{plan.items} ({plan.done_everywhere} already in the output for every task, {plan.new} new)"
    else:
        items = (f"{sum(c.items or 0 for c in plan.counts)} counted, {plan.done_everywhere} already in the output; "
                 f"{plan.uncounted} shards, items counted when read")
    width = max(len(t.name) for t in config.tasks)
    tasks = "\n         ".join(f"{t.name:<{width}}  sha256:{t.sha256[:12]}  {plan.done.get(t.name, 0)} done"
                                for t in config.tasks)
    to_do = plan.to_do
    narrowed = "".join([f", --sample {config.sample}" if config.sample is not None else "",
                        f", --limit {config.limit}" if config.limit is not None else ""])
    click.echo(f"Input:   {config.input_uri}: {plan.files} files ({kinds})\n"
               f"Items:   {items}\n"
               f"Tasks:   {tasks}\n"
               + (f"Retry:   {plan.retry} error rows\n" if plan.retry else "")
               + f"To do:   {'unknown' if to_do is None else (('about ' if config.sample else '') + str(to_do))} "
               f"items{narrowed}\n"
               f"Model:   {config.model}\n"
               f"Output:  {config.output_uri}: writable\n"
               "Dry run: nothing started, nothing written.")


_KIND_NAMES = {"file": "media files", "tar": "WebDataset shards", "parquet": "Parquet shards"}


def _by_kind(rows_by_kind: Mapping[str, int]) -> str:
    kinds = ", ".join(f"{kind} {rows}" for kind, rows in sorted(rows_by_kind.items()) if rows)
    return f" ({kinds})" if kinds else ""


def _storage_options(s3_endpoint: str | None) -> dict[str, Any]:
    return {"endpoint_url": s3_endpoint} if s3_endpoint else {}


def _pool(size: PoolSize | None) -> dict[str, Any]:
    """StageResources' pool fields for `--vision-actors` / `--generate-actors` (None: the defaults)."""
    if size is None:
        return {}
    return {"pool_size": size.minimum, "max_pool_size": None if size.maximum == size.minimum else size.maximum}


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _absolute_if_local(uri: str) -> str:
    """Local paths become absolute, as Ray's workers do not share the driver's working directory."""
    return uri if is_uri(uri) else str(Path(uri).absolute())
