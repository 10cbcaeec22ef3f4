"""`submit`, `status` and `logs` against a Ray cluster: the job's package, the job server's client, and its
failures as one line each.

A job goes to the cluster's dashboard (Ray's job submission server, `http://HEAD:8265`) as a working directory
and a command line. The working directory is built for each job (`job_package`): the project (so the cluster
runs this very code) and a `_tasks/` folder holding the task files and the demonstration media they name by
relative path, laid out as they are here. Task files travel byte for byte: their hash (`Task.sha256`, of the
file's bytes) is how a re-run finds what the output already holds, so the job must see the same bytes, and the
relative paths inside them then stay valid as they are. Absolute and s3:// media are left where they are.

Ray 2.60 heads ask for a token (token authentication is on whenever the head has one). The client sends the
cluster's token as an `Authorization: Bearer` header, read from `--token-file`, else where Ray's own tools look
(`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`).

Ray's client reports a missing token, an unknown job or an unreachable head as tracebacks; here each becomes a
`ClusterError`, which click prints as one line and exits 1. Ray is imported inside the functions, so that
`--help` stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from pipeline.task import Task, is_uri

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TASKS_FOLDER = "_tasks"  # in the job's working directory
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
# A head that is down refuses at once; one behind a firewall, or an address that is not a head, may never
# answer: give up after this long.
CONNECT_SECONDS = 10.0
TOKEN_HELP = (f"pass the cluster's token with --token-file FILE (or {TOKEN_PATH_ENV}=FILE, {TOKEN_ENV}=TOKEN); "
              "`ray get-auth-token` on the head prints it")


# Log at INFO each file they leave out and each package they build; their warnings (a very large file) still show.
RAY_PACKAGING_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk")


class ClusterError(click.ClickException):
    """The cluster could not be used; the message is one line saying why and, where it can, what to do."""


@dataclass(frozen=True)
class Token:
    """The cluster's authentication token and where it was found (named in errors, never the token itself)."""

    value: str
    source: str


@dataclass(frozen=True)
class JobPackage:
    """A job's working directory, ready to upload, and what goes on its command line."""

    working_dir: Path
    task_paths: tuple[str, ...]  # relative to working_dir, in the order the tasks were given
    warnings: tuple[str, ...]


def find_token(token_file: str | None) -> Token | None:
    """The token in `token_file`, else where Ray's own tools find it; None when there is none (a head without
    token authentication needs none)."""
    if token_file:
        source = f"--token-file {token_file}"
        return Token(_read_token(Path(token_file).expanduser(), source), source)
    if os.environ.get(TOKEN_ENV, "").strip():
        return Token(os.environ[TOKEN_ENV].strip(), TOKEN_ENV)
    if os.environ.get(TOKEN_PATH_ENV):
        source = f"{TOKEN_PATH_ENV}={os.environ[TOKEN_PATH_ENV]}"
        return Token(_read_token(Path(os.environ[TOKEN_PATH_ENV]).expanduser(), source), source)
    default = Path(DEFAULT_TOKEN_FILE).expanduser()
    if default.is_file():
        return Token(_read_token(default, DEFAULT_TOKEN_FILE), DEFAULT_TOKEN_FILE)
    return None


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise ClusterError(f"cannot read the token ({source}): {error.strerror or error}") from None
    if not token:
        raise ClusterError(f"the token file is empty ({source})")
    return token


class JobServer:
    """A Ray cluster's job submission server, each call's failure a ClusterError."""

    def __init__(self, address: str, token_file: str | None = None):
        """Connects to `address` (the dashboard, http://HEAD:8265) with the cluster's token, if one is found."""
        self.address = address if "://" in address else f"http://{address}"
        self.token = find_token(token_file)
        probe_dashboard(self.address, self.token)
        from ray.job_submission import JobSubmissionClient

        with self._errors():
            self.client: JobSubmissionClient = JobSubmissionClient(self.address,
                                                                       headers=auth_headers(self.token))

    def submit(self, entrypoint: str, runtime_env: dict[str, Any]) -> str:
        """Uploads the runtime_env's working directory and starts `entrypoint` in it; the job's id."""
        with self._errors(doing="submit the job"), _quiet(*RAY_PACKAGING_LOGGERS):
            return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def info(self, job_id: str) -> Any:
        """Ray's JobDetails of `job_id` (status, message, start_time, end_time, entrypoint, ...)."""
        with self._errors(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        """The job's output so far."""
        self.info(job_id)  # an unknown job is one line, as for `status`
        with self._errors(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> None:
        """Writes the job's output as it comes, until the job ends."""
        self.info(job_id)

        async def tail() -> None:
            async for lines in self.client.tail_job_logs(job_id):
                write(lines)

        with self._errors(job_id), _quiet("ray.dashboard.modules.job.sdk"):  # "WebSocket closed ..." at INFO
            asyncio.run(tail())

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None, doing: str = "") -> Iterator[None]:
        """Ray's client errors as one line: the token, the address or the job that is wrong."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            raise ClusterError(_auth_problem(self.address, self.token)) from None
        except (requests.ConnectionError, requests.Timeout, aiohttp.ClientError, ConnectionError) as error:
            raise ClusterError(f"lost the connection to {self.address}: {_reason(error)}") from None
        except (RuntimeError, ValueError) as error:
            message = _first_line(str(error))
            if job_id is not None and re.search(r"status code 404\b", message):
                raise ClusterError(f"no job {job_id} on {self.address}") from None
            raise ClusterError(f"{self.address} could not {doing or 'answer'}: {message}") from None


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """These loggers show warnings only, for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def probe_dashboard(address: str, token: Token | None) -> None:
    """One request to the dashboard with a bounded wait, so that a wrong address fails in seconds (Ray's client
    waits without limit) and a refused token is told apart from an address that is not a Ray dashboard."""
    import requests

    try:
        response = requests.get(f"{address}/api/version", headers=auth_headers(token), timeout=CONNECT_SECONDS)
    except requests.Timeout:
        raise ClusterError(f"no answer from {address} within {CONNECT_SECONDS:.0f} s; is it the Ray head's "
                           "dashboard address (port 8265 by default)?") from None
    except requests.RequestException as error:
        raise ClusterError(f"cannot reach the Ray dashboard at {address} ({_reason(error)}); is the head running, "
                           "and is this its dashboard address (port 8265 by default)?") from None
    if response.status_code in (401, 403):
        raise ClusterError(_auth_problem(address, token))
    if response.status_code != 200 or "ray_version" not in response.text:
        raise ClusterError(f"{address} is not a Ray dashboard (HTTP {response.status_code} for /api/version)")


def auth_headers(token: Token | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def _auth_problem(address: str, token: Token | None) -> str:
    if token is None:
        return f"{address} asks for a token and none was found; {TOKEN_HELP}"
    return f"{address} refused the token from {token.source} (not this cluster's?); {TOKEN_HELP}"


def _reason(error: BaseException) -> str:
    """The root cause of a connection error, without urllib3's object reprs."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    text = str(reason if reason is not None else error)
    return _first_line(re.sub(r"^(<[^>]*>|\w+\([^)]*\)):\s*", "", text))  # `HTTPConnection(host=...): `


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def describe(job_id: str, info: Any) -> str:
    """`status`'s report: the status line, then when the job started and ended and what it runs."""
    status = getattr(info.status, "value", info.status)
    message = (info.message or "").strip()
    headline = f"{job_id}: {status}" + (f" ({_first_line(message)})" if message else "")
    lines = [headline]
    if getattr(info, "start_time", None):
        lines.append(f"  started:    {_utc(info.start_time)}")
    if getattr(info, "end_time", None):
        elapsed = (info.end_time - info.start_time) / 1000 if info.start_time else None
        lines.append(f"  ended:      {_utc(info.end_time)}" + (f" ({elapsed:.0f} s)" if elapsed is not None else ""))
    if getattr(info, "entrypoint", None):
        lines.append(f"  entrypoint: {info.entrypoint}")
    if len(message.splitlines()) > 1:  # a failed job's message ends with its last output: the error line
        lines.append(f"  last line:  {message.splitlines()[-1].strip()}")
    return "\n".join(lines)


def _utc(milliseconds: int) -> str:
    return datetime.fromtimestamp(milliseconds / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@contextlib.contextmanager
def job_package(tasks: Sequence[Task], project_root: Path, excludes: Sequence[str] = ()) -> Iterator[JobPackage]:
    """A temporary working directory for the job: the project's entries (linked: Ray's upload reads through
    links and applies the project's .gitignore and `excludes` as usual; entries that `excludes` names whole,
    `/NAME/`, are left out from the start) and `_tasks/N/FOLDER/`, one per folder of task files, with the task
    files (their bytes as hashed) and their relative demonstration media. FOLDER keeps the folder's own name, so
    that a path written `../FOLDER/demo.png` still leads back into it."""
    with tempfile.TemporaryDirectory(prefix="flamingo-annotate-job-") as temporary:
        root = Path(temporary)
        for entry in sorted(project_root.iterdir()):
            if entry.name != TASKS_FOLDER and f"/{entry.name}/" not in excludes:
                (root / entry.name).symlink_to(entry)
        folders: dict[Path, Path] = {}
        task_paths, warnings = [], []
        for task in tasks:
            source = Path(task.path)
            folder = folders.setdefault(source.parent,
                                        root / TASKS_FOLDER / str(len(folders)) / (source.parent.name or "root"))
            folder.mkdir(parents=True, exist_ok=True)
            warnings += _stage_task(task, folder)
            task_paths.append((folder / source.name).relative_to(root).as_posix())
        yield JobPackage(working_dir=root, task_paths=tuple(task_paths), warnings=tuple(warnings))


def _stage_task(task: Task, folder: Path) -> list[str]:
    """Writes the task file into `folder` and links its relative media at the same relative paths; warnings for
    absolute media paths, which the job reads on the cluster's nodes."""
    raw = Path(task.path).read_bytes()
    if hashlib.sha256(raw).hexdigest() != task.sha256:
        raise ClusterError(f"{task.path} changed while it was being submitted; submit again")
    (folder / Path(task.path).name).write_bytes(raw)
    written = [demo["media"] for demo in (yaml.safe_load(raw).get("demonstrations") or [])]
    warnings = []
    for as_written, demo in zip(written, task.demonstrations):
        if is_uri(as_written):
            continue
        if os.path.isabs(as_written):
            warnings.append(f"{task.path}: {as_written} is an absolute path, which the job reads on the cluster's "
                            "nodes; write it relative to the task file to send it with the job")
            continue
        target = Path(os.path.normpath(folder / as_written))
        if not target.is_relative_to(folder):
            raise ClusterError(f"{task.path}: {as_written} reaches outside the task's folder by name; write the "
                               "path from the task's folder down, as it resolves")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(demo.media)
    return warnings
