"""Native decoding in a child process: a decoder that crashes or hangs on untrusted bytes costs one item.

PIL and decord run on bytes nobody here wrote, and a corrupt file can make them segfault or loop. In the
caller's own process that would take the caller down (a Ray worker, which Ray would run again on the same
file; the `validate` command; a generation actor loading a task's demonstrations). `IsolatedDecoder` runs
`media.decode.decode_frames` in a forked child instead and turns a crash into "decoder crashed: signal 11
(SIGSEGV)" and a hang into "decoder timed out after N s".

The child is forked: it has the decoders imported already, so starting one costs about 10 ms. (A "spawn" or
"forkserver" child re-runs the parent's main script first, which in a Ray worker imports Ray: about 0.5 s.)
Forking a process that has threads is safe here because the child runs only PIL, decord and PyAV code, never
torch's thread pools or Ray's gRPC; should it still block on a lock it inherited, the timeout turns that into
an error. Only the standard library and numpy are imported here: no Ray, no torch.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType

import numpy as np

from media.decode import DecodeConfig, serve

# How long a fresh child may take to be ready before the caller gives up: this is not an item's fault, so it
# does not count against `DecodeConfig.timeout_s`.
_START_TIMEOUT_S = 120.0


class IsolatedDecoder:
    """`media.decode.decode_frames` in a child process: a decoder crash or hang costs one item, not the caller.

    The child is started on the first item and kept for the next ones; after a crash or a timeout the next
    item starts a new one. Use as a context manager (the child is stopped on exit)."""

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self._context = multiprocessing.get_context("fork")  # see the module's docstring
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None

    def decode(self, kind: str | None, data: bytes | None) -> tuple[list[np.ndarray] | None, str | None]:
        """`media.decode.decode_frames(kind, data, config)`'s answer, or `(None, "decoder crashed: ...")` /
        `(None, "decoder timed out after N s")`."""
        self.submit(kind, data)
        return self.result()

    def submit(self, kind: str | None, data: bytes | None) -> None:
        """Hand the child one item to decode (starting a child if there is none); `result()` gives the answer.
        Between the two the caller may do other work: the child decodes meanwhile."""
        connection = self._connection or self._start()
        try:
            connection.send((kind, data))
        except OSError:  # the child is dead already: `result()` reports it
            pass

    def result(self) -> tuple[list[np.ndarray] | None, str | None]:
        """The answer for the item last submitted, as `decode` gives it. It may take `timeout_s` from this call
        (at least that long since the item was submitted)."""
        connection = self._connection
        assert connection is not None, "result() without submit()"
        try:
            if connection.poll(self.config.timeout_s):  # an answer, or the end of the pipe when the child died
                answer: tuple[list[np.ndarray] | None, str | None] = connection.recv()
                return answer
        except (EOFError, OSError):  # the child died before it answered
            return None, self._crashed()
        self._stop(kill=True)
        return None, f"decoder timed out after {self.config.timeout_s:g} s"

    def close(self) -> None:
        """Stop the child (if any)."""
        self._stop()

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _start(self) -> Connection:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(ours, theirs, self.config), daemon=True,
                                        name="media-decoder")
        process.start()
        theirs.close()  # only the child holds its end now: when it dies, reading ours ends instead of blocking
        self._process, self._connection = process, ours
        try:
            if ours.poll(_START_TIMEOUT_S) and ours.recv() == "ready":
                return ours
        except EOFError:
            pass
        self._stop(kill=True)
        raise RuntimeError(f"the decoder process did not start within {_START_TIMEOUT_S:g} s")

    def _crashed(self) -> str:
        """The error text for the item the child was decoding when it died; the child is gone after this."""
        assert self._process is not None
        self._process.join(timeout=5)
        code = self._process.exitcode
        self._stop()
        return f"decoder crashed: {describe_exit(code)}"

    def _stop(self, kill: bool = False) -> None:
        """End the child: let it see the end of the pipe and exit, or `kill` it (hung, or busy with an item that
        was given up on)."""
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            if not kill:
                self._process.join(timeout=1)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process.close()
        self._process, self._connection = None, None


def describe_exit(code: int | None) -> str:
    """A child's exit code in words: "signal 11 (SIGSEGV)" for a negative code, "exit code N" otherwise."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _serve(parent_end: Connection, child_end: Connection, config: DecodeConfig) -> None:
    """The child: close the copy of the parent's end that the fork gave it (so that it sees the pipe end when
    the parent closes it or dies), then decode until then. A crash here is expected of bad files and the
    parent reports it as the item's error, so the fault handler a parent may have enabled (pytest, Ray
    workers) is turned off rather than dumping every thread's stack into the logs."""
    faulthandler.disable()
    parent_end.close()
    serve(child_end, config)
