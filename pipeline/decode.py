"""Decode + preprocess on CPU tasks: turn each item's encoded bytes into model-ready pixels.

Each row goes through `media.decode.decode_item` (PIL / decord, open_clip's eval transform). An item that
cannot be decoded gets `error` ("cannot decode image: ...", "cannot decode video: ...") and no pixels; the
rest of its batch is unaffected.

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

import pyarrow as pa
import ray.data

from media.decode import DecodeConfig, decode_item, image_transform


def decode_items(dataset: ray.data.Dataset, config: DecodeConfig, *, batch_size: int = 16) -> ray.data.Dataset:
    """`dataset` (rows as produced by `pipeline.read`) with `data` decoded into `pixels` on CPU tasks."""
    return dataset.map_batches(decode_batch, batch_format="pyarrow", batch_size=batch_size,
                               fn_kwargs={"config": config})


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Decode every row of `batch` (needs columns `media_kind`, `data`, `error`); never raises for one
    bad item."""
    transform = image_transform(config)
    pixels: list[bytes | None] = []
    shapes: list[list[int] | None] = []
    errors: list[str | None] = []
    for kind, data, error in zip(
        batch.column("media_kind").to_pylist(), batch.column("data").to_pylist(), batch.column("error").to_pylist()
    ):
        array, error = (None, error) if error is not None else decode_item(kind, data, transform, config)
        pixels.append(None if array is None else array.tobytes())
        shapes.append(None if array is None else list(array.shape))
        errors.append(error)
    out = batch.drop_columns(["data"])
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.append_column(pa.field("pixels", pa.large_binary()), pa.array(pixels, pa.large_binary()))
    return out.append_column(pa.field("pixels_shape", pa.list_(pa.int32())), pa.array(shapes, pa.list_(pa.int32())))
