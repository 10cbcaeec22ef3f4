"""pipeline.lease: one writer per output, locally and on moto S3; stale leases taken over, live ones refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, read_lease


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/out"


def test_a_second_run_is_refused_while_the_first_holds_the_lease(output: str) -> None:
    with Lease(output, "run-a") as first:
        info = read_lease(output)
        assert info is not None and (info.run_id, info.pid, info.host) == ("run-a", os.getpid(), socket.gethostname())
        with pytest.raises(LeaseHeld) as refused:
            Lease(output, "run-b").acquire()
        message = str(refused.value)
        assert message.startswith(f"{output} is being written by run run-a (host {socket.gethostname()}, "
                                  f"pid {os.getpid()}, heartbeat ")
        assert message.endswith(" s ago); pass --force to take over")
        first.confirm()  # still ours
    assert read_lease(output) is None  # released
    with Lease(output, "run-b"):  # free again
        pass


def test_force_takes_over_and_the_old_holder_stops(output: str) -> None:
    first = Lease(output, "run-a")
    first.acquire()
    try:
        with Lease(output, "run-b", force=True):
            with pytest.raises(LeaseLost, match="another run took over"):
                first.confirm()
            assert read_lease(output).run_id == "run-b"
    finally:
        first.release()
    assert read_lease(output) is None  # run-a did not remove run-b's lease; run-b removed its own


def write_lease(output: str, **fields: Any) -> None:
    """A lease as another run would have left it."""
    if "://" not in output:
        Path(output).mkdir(parents=True, exist_ok=True)
    lease = {"run_id": "old", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
             "heartbeat": time.time(), **fields}
    with fsspec.open(f"{output}/{LEASE_FILE}", "w") as f:
        f.write(json.dumps(lease))


def test_a_lease_whose_process_is_gone_is_taken_over(output: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    write_lease(output, pid=int(dead.stdout))
    with Lease(output, "new"):
        assert read_lease(output).run_id == "new"
    assert "taking over the stale lease of run old" in caplog.text


def test_a_lease_without_heartbeat_is_taken_over_but_a_fresh_one_on_another_host_is_not(output: str) -> None:
    write_lease(output, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(LeaseHeld, match="host elsewhere, pid 1, heartbeat 5 s ago"):
        Lease(output, "new").acquire()
    write_lease(output, host="elsewhere", pid=1, heartbeat=time.time() - 120)
    with Lease(output, "new"):
        assert read_lease(output).run_id == "new"


def test_the_heartbeat_refreshes_the_lease(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    with Lease(output, "run-a", heartbeat_seconds=0.2):
        first = read_lease(output).heartbeat
        deadline = time.monotonic() + 10
        while read_lease(output).heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_lease(output).heartbeat > first
