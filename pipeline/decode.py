"""Decode + preprocess on CPU tasks: turn each item's encoded bytes into model-ready pixels.

Each row goes through `media.decode.decode_item` (PIL / decord, open_clip's eval transform). An item that
cannot be decoded gets `error` ("cannot decode image: ...", "cannot decode video: ...") and no pixels; the
rest of its batch is unaffected.

Crash isolation: the native decoders (PIL, decord) run on untrusted bytes, and a corrupt file can make them
segfault or hang. In the task's own process that would kill the Ray worker, Ray would run the task again on
the same file, and the job would never end. So the native half of decoding (`media.decode.decode_frames`)
runs in a child process (`IsolatedDecoder`), one per batch, one item at a time; the transform runs here, on
the 8-bit frames the child sends back. When the child dies, the item it was decoding gets "decoder crashed:
signal 11 (SIGSEGV)" and a fresh child decodes the rest; when an item takes longer than
`DecodeConfig.timeout_s`, the child is killed and the item gets "decoder timed out after N s". The map task
itself is retried at most `DECODE_TASK_RETRIES` times should it die anyway.

The child is forked from the task's process: it has the decoders imported already, so a batch pays about
10 ms for it. (A "spawn" or "forkserver" child re-runs the parent's main script first, which in a Ray worker
imports Ray: about 0.5 s a batch.) Forking a process that has threads is safe here because the child runs
only PIL, decord and PyAV code, never torch's thread pools or Ray's gRPC; should it still block on a lock it
inherited, the timeout turns that into an error row.

Pixels in the Ray dataset: Ray Data's tensor columns don't mix well with nulls (error rows) and with
a frame count that differs between rows, so the pixels travel as plain Arrow columns:
  pixels        large_binary   the C-order float16 bytes of an array of shape `pixels_shape`; null on error
  pixels_shape  list<int32>    [F, 3, H, W] (F = 1 for images, number of sampled frames for videos)
`media.decode.pixels_array(pixels, pixels_shape)` turns them back into the numpy array. Consumers should
take batches as "numpy" or "pyarrow" (pandas turns the null pixels of error rows into pd.NA) and skip rows
whose `error` is set. Every other input column
(`id`, `source`, `media_kind`, `caption`, `url`, ...) is kept, `error` is updated, `data` is dropped.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import signal
import warnings
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType

import numpy as np
import pyarrow as pa
import ray.data
import torch
from PIL import Image
from ray.util.annotations import RayDeprecationWarning

from media.decode import DecodeConfig, frames_to_pixels, image_transform, serve

DECODE_TASK_RETRIES = 3  # times a decode task whose worker died is run again before the job fails
# How long a fresh child may take to be ready (import the decoders, if the forkserver had not) before the
# batch fails: this is not an item's fault, so it does not count against `DecodeConfig.timeout_s`.
_START_TIMEOUT_S = 120.0


def decode_items(dataset: ray.data.Dataset, config: DecodeConfig, *, batch_size: int = 16) -> ray.data.Dataset:
    """`dataset` (rows as produced by `pipeline.read`) with `data` decoded into `pixels` on CPU tasks."""
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for task retries and warns that `ray_remote_args` will go.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return dataset.map_batches(partial(decode_batch, config=config), batch_format="pyarrow",
                                   batch_size=batch_size, max_retries=DECODE_TASK_RETRIES)


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Decode every row of `batch` (needs columns `media_kind`, `data`, `error`) in a child process; never
    raises for one bad item, whether it makes the decoder raise, crash or hang."""
    transform = image_transform(config)
    threads = torch.get_num_threads()
    # One thread for the transform: a frame is far too small to gain from torch's intra-op threads, and with
    # them the batch ran 14 times slower on 2 cores (they spin while this process waits for the child, so
    # the child and they fight over the cores).
    torch.set_num_threads(1)
    try:
        return _decode_batch(batch, config, transform)
    finally:
        torch.set_num_threads(threads)


def _decode_batch(batch: pa.Table, config: DecodeConfig, transform: Callable[[Image.Image], torch.Tensor]
                  ) -> pa.Table:
    items = list(zip(batch.column("media_kind").to_pylist(), batch.column("data").to_pylist()))
    errors: list[str | None] = batch.column("error").to_pylist()
    arrays: list[np.ndarray | None] = [None] * len(items)
    todo = [index for index, error in enumerate(errors) if error is None]
    with IsolatedDecoder(config) as decoder:
        # The child decodes the next item while this process transforms the one before: the two overlap.
        if todo:
            decoder.submit(*items[todo[0]])
        for position, index in enumerate(todo):
            frames, errors[index] = decoder.result()
            if position + 1 < len(todo):
                decoder.submit(*items[todo[position + 1]])
            if frames is not None:
                arrays[index], errors[index] = frames_to_pixels(items[index][0], frames, transform)
    pixels = [None if array is None else array.tobytes() for array in arrays]
    shapes = [None if array is None else list(array.shape) for array in arrays]
    out = batch.drop_columns(["data"])
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.append_column(pa.field("pixels", pa.large_binary()), pa.array(pixels, pa.large_binary()))
    return out.append_column(pa.field("pixels_shape", pa.list_(pa.int32())), pa.array(shapes, pa.list_(pa.int32())))


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
