"""Small, real test media made on the spot: images (PIL), mp4 videos (PyAV, no system ffmpeg needed),
WebDataset shards (tarfile) and img2dataset-style Parquet files (pyarrow).

Video frame `i` is a solid grey of level `frame_level(i)`, so a test can tell from the decoded pixels
which frames were sampled.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(color: tuple[int, int, int] = (200, 30, 90), size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A solid-colour image of `size` (width, height) encoded as `fmt` (PNG, JPEG, WEBP, BMP, GIF)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def frame_level(index: int) -> int:
    """Grey level of frame `index` in `video_bytes` videos (20 apart: far more than codec error)."""
    return 8 + 20 * index


def video_bytes(num_frames: int = 12, fps: int = 10, size: int = 32, container_format: str = "mp4") -> bytes:
    """A video of `num_frames` (at most 12) solid grey frames at `fps`: MPEG-4 part 2 in an `mp4`
    (index last, so any truncation makes it undecodable), `mov`, `matroska` or `avi` container, or VP8
    in `webm`."""
    if num_frames > 12:
        raise ValueError("frame levels are distinct for at most 12 frames")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream("libvpx" if container_format == "webm" else "mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2", "crf": "4", "b": "2M"}  # near-lossless: grey levels survive within a few units
        for index in range(num_frames):
            pixels = np.full((size, size, 3), frame_level(index), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar archive (WebDataset shard) holding `members` as (name, bytes), in that order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_member_offsets(data: bytes) -> dict[str, int]:
    """Member name -> offset of its header in the archive `data` (to cut archives at exact places)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {member.name: member.offset for member in tar.getmembers()}


def img2dataset_parquet_bytes(rows: Sequence[dict[str, Any]], image_column: str = "jpg") -> bytes:
    """A Parquet file with img2dataset's columns (`key`, `url`, `caption`, `<image_column>` bytes,
    `status`, `error_message`, `width`, `height`); missing fields are null."""
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            (image_column, pa.binary()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
        ]
    )
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
