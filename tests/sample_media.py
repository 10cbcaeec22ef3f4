"""Small, real test media made on the spot: images (PIL), mp4 videos (PyAV, no system ffmpeg needed),
WebDataset shards (tarfile) and img2dataset-style Parquet files (pyarrow), and `input_tree`, one input
folder with every kind of item, good and bad, for the reader's and the whole job's tests.

Video frame `i` is a solid grey of level `frame_level(i)`, so a test can tell from the decoded pixels
which frames were sampled.

(Not named `media`: tests import the project's `media` package.)
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(color: tuple[int, int, int] = (200, 30, 90), size: tuple[int, int] = (40, 30),
                fmt: str = "PNG") -> bytes:
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


# --- one input folder with every kind of item ------------------------------------------------------------------

MAX_ITEM_BYTES = 60_000  # read `input_tree` with this limit: one image in it is larger

JPG = image_bytes(fmt="JPEG")
PNG = image_bytes(fmt="PNG")
MP4 = video_bytes(num_frames=6)
GOOD_SHARD = tar_bytes(
    [
        ("0001.jpg", JPG),
        ("0001.txt", b"a cat"),
        ("0001.json", json.dumps({"url": "http://example.com/1.jpg", "caption": "not used: .txt wins"}).encode()),
        ("0002.mp4", MP4),
        ("0002.json", json.dumps({"url": "http://example.com/2.mp4", "caption": "a clip"}).encode()),
        ("0003.txt", b"caption without media"),
        ("0004.png", PNG),
        ("0004.cls", b"7"),
        ("0004.pyd", b"never unpickled"),
        ("0005.jpg", b""),
    ]
)
PARQUET = img2dataset_parquet_bytes(
    [
        {"key": "000", "url": "http://example.com/a.jpg", "caption": "first", "jpg": JPG, "status": "success"},
        {"key": "001", "url": "http://example.com/b.jpg", "caption": "second", "jpg": PNG, "status": "success"},
        {"key": "002", "url": "http://example.com/c.jpg", "status": "failed_to_download", "error_message": "HTTP 404"},
        {"key": "003", "url": "http://example.com/d.jpg", "status": "success"},
    ]
)
TRUNCATED_SHARD = GOOD_SHARD[: tar_member_offsets(GOOD_SHARD)["0002.mp4"] + 512 + 100]


@dataclass(frozen=True)
class Expected:
    """What becomes of one item of `input_tree`."""

    kind: str | None                  # its media_kind
    data: bytes | None = None         # the bytes read, where the test knows them (else: any, if no error)
    read_error: str | None = None     # part of the reader's error message; None when it reads fine
    decode_error: str | None = None   # part of the decoder's error message, for an item that reads fine

    @property
    def error(self) -> str | None:
        """Part of the error that the item's output rows carry; None when it is annotated."""
        return self.read_error or self.decode_error


def input_tree(root: Path) -> dict[str, Expected]:
    """Write one file of every kind the reader handles, good and bad, under `root`. Returns what each item
    becomes, by its id below `root` (the item id is `<root>/<key>`), read with max_item_bytes=MAX_ITEM_BYTES.
    `images/.hidden.png` is never listed, so it is no item."""
    files = {
        "images/red.png": PNG,
        "images/photo.jpg": JPG,
        "images/pic.webp": image_bytes(fmt="WEBP"),
        "images/pic.bmp": image_bytes(fmt="BMP"),
        "images/anim.gif": image_bytes(fmt="GIF"),
        "images/big.bmp": image_bytes(size=(200, 200), fmt="BMP"),  # 120 kB > MAX_ITEM_BYTES
        "images/empty.png": b"",
        "images/corrupt.jpg": b"this is not a jpeg",  # read fine; decoding fails later
        "images/.hidden.png": PNG,
        "videos/clip.mp4": MP4,
        "videos/cut.mp4": MP4[:300],  # read fine; decoding fails later
        "notes.xyz": b"what is this",
        "shards/good.tar": GOOD_SHARD,
        "shards/truncated.tar": TRUNCATED_SHARD,
        "shards/garbage.tar": b"not a tar archive " * 100,
        "parquet/part.parquet": PARQUET,
        "parquet/broken.parquet": b"PAR1 but not really",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    cut_tar = "cannot read tar shard: ReadError: unexpected end of data"
    return {
        "images/red.png": Expected("image", PNG),
        "images/photo.jpg": Expected("image", JPG),
        "images/pic.webp": Expected("image"),
        "images/pic.bmp": Expected("image"),
        "images/anim.gif": Expected("image"),
        "images/big.bmp": Expected("image", read_error=f"larger than max_item_bytes={MAX_ITEM_BYTES}"),
        "images/empty.png": Expected("image", read_error="empty file (0 bytes)"),
        "images/corrupt.jpg": Expected("image", b"this is not a jpeg", decode_error="cannot decode image"),
        "videos/clip.mp4": Expected("video", MP4),
        "videos/cut.mp4": Expected("video", MP4[:300], decode_error="cannot decode video"),
        "notes.xyz": Expected(None, read_error="unsupported file type .xyz"),
        "shards/good.tar::0001": Expected("image", JPG),
        "shards/good.tar::0002": Expected("video", MP4),
        "shards/good.tar::0003": Expected(None, read_error="no image or video member"),
        "shards/good.tar::0004": Expected("image", PNG),
        "shards/good.tar::0005": Expected("image", read_error="member 0005.jpg: empty file (0 bytes)"),
        "shards/truncated.tar::0001": Expected("image", JPG),
        "shards/truncated.tar::0002": Expected("video", read_error=cut_tar),
        "shards/truncated.tar": Expected(None, read_error=f"{cut_tar} (after 1 complete samples)"),
        "shards/garbage.tar": Expected(None, read_error="cannot read tar shard: ReadError"),
        "parquet/part.parquet::000": Expected("image", JPG),
        "parquet/part.parquet::001": Expected("image", PNG),
        "parquet/part.parquet::002": Expected("image", read_error="img2dataset status failed_to_download: HTTP 404"),
        "parquet/part.parquet::003": Expected("image", read_error="no image bytes in column jpg"),
        "parquet/broken.parquet": Expected(None, read_error="cannot read Parquet file"),
    }
