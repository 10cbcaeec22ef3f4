"""One writer per output: a lease file, `_lease.json`, in the output folder.

A run takes the lease before any work and gives it back at the end. Two runs writing one output would each
resume from what the other had not written yet and write the same rows twice, so a second run refuses:

    OUTPUT is being written by run RUN_ID (host H, pid P, heartbeat N s ago); pass --force to take over

The lease holds {run_id, host, pid, started, heartbeat}. A thread rewrites it every `HEARTBEAT_SECONDS`. A
lease is stale, and taken over with a warning, when its holder is gone: same host and its pid is not alive,
or its heartbeat is older than `STALE_SECONDS` (a killed driver, a lost machine). `force` takes over a live
lease too; the run that held it notices at its next heartbeat or commit and stops (`LeaseLost`).

What is guaranteed, and what is not. Taking the lease is read, check, write, then read again to confirm; a
fresh local lease is created with O_EXCL, so two local runs cannot both create one. On S3 (and when taking
over a stale lease) two runs that start within the same moment can both pass the confirming read: the one
whose write came first then sees the other's lease at its next check -- `confirm()`, which the writer calls
before every commit, or the heartbeat -- and stops. So at most the files one of them committed in that
short window can overlap; readers (`pipeline.query`) keep one row per (id, task) in any case. The heartbeat
age is measured with the reader's clock against the writer's: clocks more than a few seconds apart make a
lease look fresher or staler than it is.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from media.storage import filesystem, is_local

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0


class LeaseHeld(Exception):
    """Another live run holds the output's lease; the message is the one line to show."""


class LeaseLost(Exception):
    """This run's lease was taken over by another run (`--force`) while it ran."""


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    started: float    # Unix time
    heartbeat: float  # Unix time of the holder's last heartbeat

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def holder_gone(self, *, stale_seconds: float = STALE_SECONDS) -> bool:
        """Whether the run that wrote this lease has stopped: same host and its process is gone, or no
        heartbeat for `stale_seconds`."""
        if self.age() > stale_seconds:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)

    def describe(self, output_uri: str) -> str:
        return (f"{output_uri} is being written by run {self.run_id} (host {self.host}, pid {self.pid}, "
                f"heartbeat {self.age():.0f} s ago)")


class Lease:
    """This run's lease on `output_uri`: `acquire()` (or `with Lease(...)`) before any work, `release()` at the
    end. `lost` turns true when another run took it over; `confirm()` raises LeaseLost then."""

    def __init__(self, output_uri: str, run_id: str, *, storage_options: Mapping[str, Any] | None = None,
                 force: bool = False, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.output_uri = output_uri
        self.fs, root = filesystem(output_uri, storage_options)
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"
        self.force = force
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        now = time.time()
        self.info = LeaseInfo(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld (see the module docstring). Storage errors propagate: failing
        here is how a run finds out, before any work, that it cannot write to the output."""
        current = read_lease(self.output_uri, fs=self.fs, path=self.path)
        if current is not None and current.run_id != self.info.run_id:
            if not (self.force or current.holder_gone(stale_seconds=self.stale_seconds)):
                raise LeaseHeld(current.describe(self.output_uri) + "; pass --force to take over")
            why = "forced" if self.force and not current.holder_gone(stale_seconds=self.stale_seconds) else "stale"
            log.warning("taking over the %s lease of run %s on %s (host %s, pid %s, heartbeat %.0f s ago)",
                        why, current.run_id, self.output_uri, current.host, current.pid, current.age())
        self._write(create=current is None)
        confirmed = read_lease(self.output_uri, fs=self.fs, path=self.path)
        if confirmed is None or confirmed.run_id != self.info.run_id:
            holder = confirmed.describe(self.output_uri) if confirmed else f"{self.output_uri}: lease vanished"
            raise LeaseHeld(holder + "; pass --force to take over")
        self._thread = threading.Thread(target=self._beat, name="output-lease-heartbeat", daemon=True)
        self._thread.start()

    def confirm(self) -> None:
        """Raise LeaseLost unless the output's lease is still this run's (read again from storage)."""
        if not self.lost:
            current = read_lease(self.output_uri, fs=self.fs, path=self.path)
            self.lost = current is None or current.run_id != self.info.run_id
        if self.lost:
            raise LeaseLost(f"{self.output_uri}: another run took over the output while this one ran "
                            f"(run {self.info.run_id} stopped)")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_seconds + 5)
        try:
            current = read_lease(self.output_uri, fs=self.fs, path=self.path)
            if current is not None and current.run_id == self.info.run_id:
                self.fs.rm_file(self.path)
        except Exception as exc:  # a lease left behind goes stale and is taken over; never fail the run for it
            log.warning("could not remove the lease %s: %s: %s", self.path, type(exc).__name__, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                current = read_lease(self.output_uri, fs=self.fs, path=self.path)
                if current is None or current.run_id != self.info.run_id:
                    self.lost = True
                    log.error("%s: the output's lease was taken over by %s", self.output_uri,
                              current.run_id if current else "nobody (removed)")
                    return
                self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
                self._write(create=False)
            except Exception as exc:  # storage hiccup: try again at the next beat; the lease goes stale if not
                log.warning("lease heartbeat on %s failed: %s: %s", self.output_uri, type(exc).__name__, exc)

    def _write(self, *, create: bool) -> None:
        data = json.dumps(asdict(self.info)).encode()
        if not is_local(self.fs):
            self.fs.pipe_file(self.path, data)  # one PUT: readers see the old or the new lease, whole
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if create:  # O_EXCL: of two runs creating the lease at once, one fails here
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # the other run won; the confirming read says so
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        temporary = f"{os.path.dirname(self.path)}/.{LEASE_FILE}.{self.info.run_id}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, self.path)


def read_lease(output_uri: str, *, storage_options: Mapping[str, Any] | None = None, fs: Any = None,
               path: str | None = None) -> LeaseInfo | None:
    """The lease on `output_uri`, or None when there is none (or it is unreadable: a lease cut short by a
    crash is no lease)."""
    if fs is None or path is None:
        fs, root = filesystem(output_uri, storage_options)
        path = f"{root.rstrip('/')}/{LEASE_FILE}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(data)
        return LeaseInfo(run_id=str(fields["run_id"]), host=str(fields["host"]), pid=int(fields["pid"]),
                         started=float(fields["started"]), heartbeat=float(fields["heartbeat"]))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable lease file %s", path)
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
