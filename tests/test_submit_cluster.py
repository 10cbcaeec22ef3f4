"""`submit`, `status` and `logs` against a real Ray head (flamingo_annotate/cluster.py).

The module starts its own head on 127.0.0.1 with the dashboard (Ray's job server), token authentication on
and a token of its own, every port picked free and its own temp dir and HOME, so that it shares nothing with
other Ray instances on the machine (the `ray_session` fixture's, or anyone else's). It is stopped by its own
process ids, never with `ray stop`, which stops every Ray on the machine.

A job is submitted the way a user does it: a task file outside the project folder with its demonstration
image next to it, relative --input and --output, then `status` until it ends and `logs`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from click.testing import CliRunner, Result
from sample_media import image_bytes

from flamingo_annotate import cluster
from flamingo_annotate.cli import PROJECT_ROOT, main
from pipeline.task import load_task

VENV_BIN = Path(sys.executable).parent
START_SECONDS = 120  # `ray start` takes ~25 s on 2 busy cores
JOB_SECONDS = 240


@dataclass(frozen=True)
class Head:
    address: str
    token_file: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(session: int) -> list[int]:
    """Processes of the session `ray start` was started in (setsid): the head's processes, and only those."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:  # stat's 6th field: session id
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A Ray head with its dashboard on loopback, token authentication on; stopped after the module."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fa-head-", dir="/tmp"))  # short: Ray's socket paths < 108 chars
    (temp_dir / "home").mkdir()
    token_file = temp_dir / "token"
    token_file.write_text(os.urandom(16).hex())
    dashboard = free_port()
    env = {**os.environ, "HOME": str(temp_dir / "home"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token_file.read_text(), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python` is the venv's
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    ports = {option: str(free_port()) for option in (
        "--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port")}
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
               "--temp-dir", str(temp_dir / "ray"), "--num-cpus", "2", "--disable-usage-stats",
               *[arg for pair in ports.items() for arg in pair]]
    log = open(temp_dir / "ray-start.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_job_server(address, token_file.read_text(), process, temp_dir / "ray-start.log")
        yield Head(address=address, token_file=token_file)
    finally:
        stop_head(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_server(address: str, token: str, process: subprocess.Popen, log: Path) -> None:
    """Until the job server answers and its agent takes jobs (bounded)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            response = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                                    timeout=5)
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"the job server at {address} did not answer within {START_SECONDS} s:\n{log.read_text()[-3000:]}")


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM to each process of the head's session (the session `ray start` began), SIGKILL to any left after
    5 s. `ray start --block`'s own shutdown waits on each process in turn, which takes half a minute."""
    for pid in session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        process.poll()  # reaps `ray start` itself
    for pid in session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def task_outside_project(tmp_path: Path) -> Path:
    """A classify task in tmp_path (outside the project folder), its demonstration image next to it."""
    folder = tmp_path / "my tasks"
    (folder / "demos").mkdir(parents=True)
    (folder / "demos" / "red.png").write_bytes(image_bytes((220, 20, 20), (64, 64)))
    task = folder / "colour.yaml"
    task.write_text('name: colour\nkind: classify\ndemonstrations:\n  - {media: demos/red.png, text: " red"}\n'
                    'query: "Colour:"\nlabels: [" red", " blue"]\n')
    assert not task.resolve().is_relative_to(PROJECT_ROOT)
    return task


def test_a_job_submitted_from_outside_the_project_runs_to_the_end(
        head: Head, task_outside_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    for name, colour in (("a.png", (220, 20, 20)), ("b.png", (20, 20, 220)), ("c.png", (20, 200, 20))):
        (work / "images" / name).write_bytes(image_bytes(colour, (64, 64)))
    monkeypatch.chdir(work)
    auth = ["--address", head.address, "--token-file", str(head.token_file)]

    submitted = invoke("submit", str(task_outside_project), "--input", "images", "--output", "annotations",
                       "--no-progress", *auth)
    assert submitted.exit_code == 0, submitted.output
    assert f"--output {work / 'annotations'} is a path on the cluster's nodes" in submitted.stderr
    job_id = submitted.stdout.split()[2]
    assert job_id.startswith("raysubmit_")

    deadline = time.monotonic() + JOB_SECONDS
    while True:
        status = invoke("status", job_id, *auth)
        state = status.stdout.split()[1]
        assert status.exit_code == (1 if state in ("FAILED", "STOPPED") else 0), status.output
        if state in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    logs = invoke("logs", job_id, *auth)
    assert state == "SUCCEEDED", f"{status.stdout}\n{logs.stdout[-4000:]}"
    lines = status.stdout.splitlines()
    assert lines[0] == f"{job_id}: SUCCEEDED (Job finished successfully.)"
    assert lines[1].startswith("  started:") and lines[2].startswith("  ended:")
    assert lines[3].startswith("  entrypoint: python jobs/annotate.py '_tasks/0/my tasks/colour.yaml' --input ")

    assert logs.exit_code == 0 and "Annotated 3 items" in logs.stdout
    assert f"Output: {work / 'annotations'}" in logs.stdout
    table = pq.read_table(work / "annotations").to_pandas()
    assert sorted(table["id"]) == sorted(str(work / "images" / name) for name in ("a.png", "b.png", "c.png"))
    assert set(table["task"]) == {"colour"} and table["error"].isna().all()
    assert set(table["annotation"]) <= {"red", "blue"}
    assert set(table["task_hash"]) == {load_task(task_outside_project).sha256}  # a re-run from here resumes it

    followed = invoke("logs", job_id, "--follow", *auth)
    assert followed.exit_code == 0 and "Annotated 3 items" in followed.stdout


def test_an_unknown_job_is_one_line(head: Head) -> None:
    for command in ("status", "logs"):
        result = invoke(command, "raysubmit_nosuchjob", "--address", head.address,
                        "--token-file", str(head.token_file))
        assert result.exit_code == 1
        assert result.stderr == f"Error: no job raysubmit_nosuchjob on {head.address}\n"


def test_a_missing_or_wrong_token_is_one_line(head: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    missing = invoke("status", "raysubmit_x", "--address", head.address)
    assert missing.exit_code == 1
    assert missing.stderr.startswith(f"Error: {head.address} asks for a token and none was found; pass the "
                                     "cluster's token with --token-file FILE")
    assert len(missing.stderr.splitlines()) == 1

    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    refused = invoke("logs", "raysubmit_x", "--address", head.address, "--token-file", str(wrong))
    assert refused.exit_code == 1 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith(f"Error: {head.address} refused the token from --token-file {wrong}")

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))  # Ray's own variable is found too
    assert invoke("status", "raysubmit_x", "--address", head.address).stderr.startswith("Error: no job")


def test_an_unreachable_address_is_one_line_within_seconds(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = invoke("submit", str(PROJECT_ROOT / "jobs" / "tasks" / "caption.yaml"), "--input", "s3://b/i",
                    "--output", "s3://b/o", "--address", f"127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: cannot reach the Ray dashboard at http://127.0.0.1:{port} (")
    assert "Connection refused" in result.stderr


def test_an_address_that_never_answers_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 2.0)  # 10 s by default
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = invoke("status", "raysubmit_x", "--address", address)
    assert time.monotonic() - started < 10
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: no answer from {address} within 2 s")
