"""pipeline.lease: one writer per output, locally and on moto S3; stale leases taken over, live ones refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
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


def take_at_once(output: str, runs: int, **options: Any) -> tuple[list[Lease], int]:
    """`runs` leases acquired at the same moment from threads: (the ones that got it, how many were refused)."""
    leases = [Lease(output, f"run-{i}", **options) for i in range(runs)]
    start = threading.Barrier(runs)
    won: list[Lease] = []
    refused = []

    def take(lease: Lease) -> None:
        start.wait(timeout=30)
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return won, len(refused)


@pytest.mark.parametrize("existing", ["none", "stale"])
def test_of_runs_starting_at_the_same_moment_exactly_one_gets_the_lease(output: str, existing: str) -> None:
    """Taking the lease is one atomic step: create-if-absent (or replace-if-unchanged, for a stale lease), by a
    conditional PUT on S3 and a file lock locally. Read, check, then write would let several runs through."""
    for attempt in range(3):   # each round is a fresh race
        if existing == "stale":
            write_lease(output, host="elsewhere", pid=1, heartbeat=time.time() - 120)
        won, refused = take_at_once(output, runs=6)
        try:
            assert len(won) == 1 and refused == 5, f"round {attempt}: {[lease.info.run_id for lease in won]}"
            assert read_lease(output).run_id == won[0].info.run_id
        finally:
            for lease in won:
                lease.release()


def test_a_heartbeat_never_overwrites_a_lease_taken_over_meanwhile(output: str) -> None:
    """The holder's heartbeat rewrites the lease only if it is still the one it wrote: a run that took over
    (`--force`) is never overwritten by the run it displaced, which then stops."""
    first = Lease(output, "run-a", heartbeat_seconds=0.1)
    first.acquire()
    try:
        with Lease(output, "run-b", force=True):
            deadline = time.monotonic() + 10
            while not first.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.lost
            assert read_lease(output).run_id == "run-b"
    finally:
        first.release()


@pytest.mark.parametrize("existing", ["none", "stale"])
def test_runs_that_all_read_the_same_lease_cannot_all_take_it(
        s3: Any, existing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst interleaving on S3, forced: every run reads the lease before any writes, then they write one
    after the other, each finishing (write and confirming read) before the next starts. Only a write
    conditional on what was read refuses all but the first. (Locally the folder's flock makes each run's
    read, check and write one step, so this interleaving cannot happen.)"""
    output = f"s3://{s3.new_bucket()}/out"
    runs = 4
    all_read = threading.Barrier(runs)
    one_at_a_time = threading.Lock()
    racers: set[int] = set()   # the threads below, until their first read
    plain_read = Lease._read

    def read_then_wait(self: Lease) -> Any:
        result = plain_read(self)
        if threading.get_ident() in racers:
            racers.discard(threading.get_ident())
            all_read.wait(timeout=30)
            one_at_a_time.acquire(timeout=30)   # released when this run's acquire() is over
        return result

    monkeypatch.setattr(Lease, "_read", read_then_wait)
    if existing == "stale":
        write_lease(output, host="elsewhere", pid=1, heartbeat=time.time() - 120)
    won: list[Lease] = []

    def take(lease: Lease) -> None:
        racers.add(threading.get_ident())
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            pass
        finally:
            one_at_a_time.release()

    threads = [threading.Thread(target=take, args=(Lease(output, f"run-{i}"),)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert [lease.info.run_id for lease in won] == [read_lease(output).run_id]
    finally:
        for lease in won:
            lease.release()
