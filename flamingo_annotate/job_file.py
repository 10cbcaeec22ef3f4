"""`--config JOB.yaml`: a job as one reviewed file holding what the command-line options hold.

    # jobs/example-job.yaml
    tasks: [tasks/caption.yaml, tasks/count.yaml]     # relative to this file
    input: s3://my-bucket/shards/
    output: s3://my-bucket/annotations/
    model: openflamingo/OpenFlamingo-4B-vitl-rpj3b
    vision-gpus: 1
    generate-gpus: 1

Keys are the long option names of the command (`vision-gpus` or `vision_gpus`), plus `tasks` for the task
files. Options given on the command line win over the file, and task files given there replace its list.
Relative local paths in the file (`tasks`, `input`, `output`) are relative to the file, as media paths are in
a task file, so a job file means the same from any working directory.

The file is checked before anything runs: an unknown key, a value of the wrong type or out of range is
rejected as `FILE: FIELD: PROBLEM`, every problem at once. YAML is loaded safely (no tags that build objects).
The values then reach the command as click's own defaults (`Context.default_map`), so they go through
exactly the conversions and checks of the options themselves.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.task import is_uri

TASKS_KEY = "tasks"
PATH_KEYS = ("input", "output")  # relative local paths among the options, resolved against the file's folder
MAX_FILE_BYTES = 1024 * 1024     # a job file is a few lines; anything this large is not one


def job_file_option(command: Callable) -> Callable:
    """The `--config` option. Eager, so the file's values are in place before the other options are read."""
    return click.option(
        "--config", "job_file", metavar="JOB.yaml", type=click.Path(dir_okay=False), is_eager=True,
        expose_value=False, callback=_apply_job_file,
        help="A YAML file of this command's options (long names as keys, `tasks:` for task files); "
             "options given here win.")(command)


def _apply_job_file(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if path is None or ctx.resilient_parsing:
        return
    defaults, problems = read_job_file(Path(path), ctx.command)
    if problems:
        count = len(problems)
        click.echo(f"{count} problem{'s' if count > 1 else ''} in the job file:\n" + "\n".join(problems), err=True)
        ctx.exit(2)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def read_job_file(path: Path, command: click.Command) -> tuple[dict[str, Any], list[str]]:
    """(`default_map` for `command`, problems as `FILE: FIELD: PROBLEM` lines) of the job file at `path`."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return {}, [f"{path}: {path.stat().st_size} bytes, more than a job file may have ({MAX_FILE_BYTES})"]
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        return {}, [f"{path}: cannot read: {error.strerror or error}"]
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        return {}, [f"{path}: not valid YAML: {' '.join(str(error).split())}"]
    if not isinstance(document, dict):
        return {}, [f"{path}: must be a mapping of option names to values, got {type(document).__name__}"]

    params = _params_by_key(command)
    base = path.resolve().parent
    defaults: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in document.items():
        name = str(key).replace("_", "-")
        param = params.get(name)
        if param is None:
            close = difflib.get_close_matches(name, params, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{path}: {key}: not an option of `{command.name}`{hint}")
            continue
        if name == TASKS_KEY:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                problems.append(f"{path}: {key}: must be a task file path or a non-empty list of them")
                continue
            value = [_relative_to(base, v) for v in value]
        elif name in PATH_KEYS and isinstance(value, str):
            value = _relative_to(base, value)
        try:  # the option's own conversion and range check, so the file cannot hold what the flag would refuse
            param.type_cast_value(click.Context(command), value)
        except click.BadParameter as error:
            problems.append(f"{path}: {key}: {error.message}")
            continue
        assert param.name is not None
        defaults[param.name] = value
    return defaults, problems


def _params_by_key(command: click.Command) -> dict[str, click.Parameter]:
    """The command's parameters by their job-file key: an option's first long name without dashes; the task
    files argument as `tasks`."""
    params: dict[str, click.Parameter] = {}
    for param in command.params:
        if isinstance(param, click.Argument):
            params[TASKS_KEY] = param
        elif isinstance(param, click.Option) and param.expose_value:
            long_names = [opt for opt in param.opts if opt.startswith("--")]
            if long_names:
                params[long_names[0][2:]] = param
    return params


def _relative_to(base: Path, value: str) -> str:
    """A local relative path read from the file, as a path from the file's folder; URIs and absolute paths as
    they are."""
    if is_uri(value) or Path(value).is_absolute():
        return value
    return str(base / value)
