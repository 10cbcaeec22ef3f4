"""Decode + resize on CPU tasks: turn each item's encoded bytes into compact pixels for the vision actors.

Each row is decoded by PIL / decord and resized / cropped by open_clip's eval transform up to, not including,
its normalisation (`media.decode.frames_to_uint8`): the pixels stay uint8, a quarter of the bytes of float32
and half of float16 in Ray's object store, and the vision actor normalises them on its own device
(`media.normalize`, pipeline/encode.py). An item that
cannot be decoded gets `error` ("cannot decode image: ...", "cannot decode video: ...") and no pixels; the
rest of its batch is unaffected.

Crash isolation: the native decoders (PIL, decord) run on untrusted bytes, and a corrupt file can make them
segfault or hang. In the task's own process that would kill the Ray worker, Ray would run the task again on
the same file, and the job would never end. So the native half of decoding (`media.decode.decode_frames`)
runs in a child process (`media.isolation.IsolatedDecoder`), one per batch, one item at a time; the
resize runs here, on the 8-bit frames the child sends back. An item that crashes the child gets "decoder
crashed: signal 11 (SIGSEGV)" and a fresh child decodes the rest; one that takes longer than
`DecodeConfig.timeout_s` gets "decoder timed out after N s". The map task itself is retried at most
`DECODE_TASK_RETRIES` times should it die anyway.

Pixels in the Ray dataset: Ray Data's tensor columns don't mix well with nulls (error rows) and with
a frame count that differs between rows, so the pixels travel as plain Arrow columns:
  pixels        large_binary   the C-order bytes of an array of shape `pixels_shape`; null on error
  pixels_shape  list<int32>    [F, 3, H, W] (F = 1 for images, number of sampled frames for videos)
  pixels_dtype  string         "uint8": values 0..255, resized and cropped, not normalised; null on error
`media.decode.pixels_array(pixels, pixels_shape)` turns them back into the numpy array, and
`media.normalize.normalize(torch.from_numpy(array), mean, std)` into the model's input. Consumers should
take batches as "numpy" or "pyarrow" (pandas turns the null pixels of error rows into pd.NA) and skip rows
whose `error` is set. Every other input column
(`id`, `source`, `media_kind`, `caption`, `url`, ...) is kept, `error` is updated, `data` is dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa
import ray.data
import torch
from PIL import Image
from ray.util.annotations import RayDeprecationWarning

from media.decode import PIXELS_ENCODING, DecodeConfig, frames_to_uint8, resize_transform
from media.isolation import IsolatedDecoder

DECODE_TASK_RETRIES = 3  # times a decode task whose worker died is run again before the job fails


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
    transform = resize_transform(config)
    threads = torch.get_num_threads()
    # One thread for the transform: a frame is far too small to gain from torch's intra-op threads, and with
    # them the batch ran 14 times slower on 2 cores (they spin while this process waits for the child, so
    # the child and they fight over the cores).
    torch.set_num_threads(1)
    try:
        return _decode_batch(batch, config, transform)
    finally:
        torch.set_num_threads(threads)


def _decode_batch(batch: pa.Table, config: DecodeConfig, transform: Callable[[Image.Image], Image.Image]
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
                arrays[index], errors[index] = frames_to_uint8(items[index][0], frames, transform)
    pixels = [None if array is None else array.tobytes() for array in arrays]
    shapes = [None if array is None else list(array.shape) for array in arrays]
    encodings = [None if array is None else PIXELS_ENCODING for array in arrays]
    out = batch.drop_columns(["data"])
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.append_column(pa.field("pixels", pa.large_binary()), pa.array(pixels, pa.large_binary()))
    out = out.append_column(pa.field("pixels_shape", pa.list_(pa.int32())), pa.array(shapes, pa.list_(pa.int32())))
    return out.append_column(pa.field("pixels_dtype", pa.string()), pa.array(encodings, pa.string()))
