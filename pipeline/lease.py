"""One writer per output: a lease file, `_lease.json`, in the output folder.

A run takes the lease before any work and gives it back at the end. Two runs writing one output would each
resume from what the other had not written yet and write the same rows twice, so a second run refuses:

    OUTPUT is being written by run RUN_ID (host H, pid P, heartbeat N s ago); pass --force to take over

The lease holds {run_id, host, pid, started, heartbeat}. A thread rewrites it every `HEARTBEAT_SECONDS`. A
lease is stale, and taken over with a warning, when its holder is gone: same host and its pid is not alive,
or its heartbeat is older than `STALE_SECONDS` (a killed driver, a lost machine). `force` takes over a live
lease too; the run that held it notices at its next heartbeat or commit and stops (`LeaseLost`).

Taking the lease is one atomic step, so of runs that start at the same moment exactly one gets it. On S3
the lease is written with a conditional PUT: `If-None-Match: *` creates it only if there is none, and
`If-Match: <ETag read>` replaces a stale one (or, for the heartbeat, this run's own) only if nobody changed it
since it was read; the loser gets 412 Precondition Failed. (AWS S3, MinIO and moto honour both; a store that
answers 501 Not Implemented gets plain PUTs, with a warning, and the confirming read that follows every write
then settles all but a race of the same second.) Locally the read, check and write happen under an exclusive
`flock` on the output folder, and a fresh lease is created with O_EXCL. The heartbeat age is measured with the
reader's clock against the writer's: clocks more than a few seconds apart make a lease look fresher or staler
than it is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from media.storage import filesystem, is_local, is_s3

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
        self._plain_puts = False  # the store refused conditional writes (501): plain ones from then on

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld (see the module docstring). Storage errors propagate: failing
        here is how a run finds out, before any work, that it cannot write to the output."""
        with self._exclusive():
            current, version = self._read()
            if current is not None and current.run_id != self.info.run_id:
                gone = current.holder_gone(stale_seconds=self.stale_seconds)
                if not (self.force or gone):
                    raise LeaseHeld(current.describe(self.output_uri) + "; pass --force to take over")
                log.warning("taking over the %s lease of run %s on %s (host %s, pid %s, heartbeat %.0f s ago)",
                            "stale" if gone else "forced", current.run_id, self.output_uri, current.host,
                            current.pid, current.age())
            if not self._write(expected=version, create=current is None):
                winner, _ = self._read()
                holder = winner.describe(self.output_uri) if winner else f"{self.output_uri}: lease vanished"
                raise LeaseHeld(holder + "; pass --force to take over")
        confirmed, _ = self._read()
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
            with self._exclusive():
                current, _ = self._read()
                if current is not None and current.run_id == self.info.run_id:
                    self.fs.rm_file(self.path)
        except Exception as exc:  # a lease left behind goes stale and is taken over; never fail the run for it
            log.warning("could not remove the lease %s: %s: %s", self.path, type(exc).__name__, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                with self._exclusive():
                    current, version = self._read()
                    mine = current is not None and current.run_id == self.info.run_id
                    if mine:
                        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
                    # Conditional on the lease read being the one in storage: a takeover in between wins.
                    if not (mine and self._write(expected=version, create=False)):
                        self.lost = True
                        log.error("%s: the output's lease was taken over by another run", self.output_uri)
                        return
            except Exception as exc:  # storage hiccup: try again at the next beat; the lease goes stale if not
                log.warning("lease heartbeat on %s failed: %s: %s", self.output_uri, type(exc).__name__, exc)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Locally, an exclusive `flock` on the output folder around a read-check-write; on object storage the
        conditional writes do that job, so nothing."""
        if not is_local(self.fs):
            yield
            return
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read(self) -> tuple[LeaseInfo | None, str | None]:
        """(the lease, its version): the object's ETag on S3, read before its body, so that a write conditional
        on it fails if the lease changed at any time after. None for a local file (the lock guards it)."""
        version = None
        if self._conditional_puts():
            bucket, key = self._bucket_key()
            try:
                version = str(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"])
            except FileNotFoundError:
                return None, None
        return read_lease(self.output_uri, fs=self.fs, path=self.path), version

    def _write(self, *, expected: str | None, create: bool) -> bool:
        """Write this run's lease: only if there is none (`create`), or only if the lease in storage is still
        the version `expected` (S3). False when another run's write came first."""
        data = json.dumps(asdict(self.info)).encode()
        if self._conditional_puts():
            bucket, key = self._bucket_key()
            condition = {"IfNoneMatch": "*"} if create else {"IfMatch": expected} if expected else {}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except FileExistsError:  # If-None-Match failed: s3fs's own translation
                return False
            except OSError as exc:
                code = _s3_error_code(exc)
                if code == "PreconditionFailed":
                    return False
                if code != "NotImplemented":
                    raise
                log.warning("%s: the store does not support conditional writes; using plain ones",
                            self.output_uri)
                self._plain_puts = True
                self.fs.pipe_file(self.path, data)
            finally:
                self.fs.invalidate_cache(self.path)
            return True
        if not is_local(self.fs):  # another object store: one plain PUT, and the confirming read decides
            self.fs.pipe_file(self.path, data)
            return True
        if create:  # O_EXCL: belt and braces under the lock, for a folder on storage where flock is advisory only
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        temporary = f"{os.path.dirname(self.path)}/.{LEASE_FILE}.{self.info.run_id}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, self.path)
        return True

    def _conditional_puts(self) -> bool:
        return is_s3(self.fs) and not self._plain_puts

    def _bucket_key(self) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path)
        return bucket, key


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


def _s3_error_code(error: BaseException) -> str | None:
    """The S3 error code (`PreconditionFailed`, ...) behind an error s3fs translated, if any."""
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None
