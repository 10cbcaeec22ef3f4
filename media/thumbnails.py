"""Small pictures of items, for people to look at: each item read back from its source and shrunk to a JPEG.

An annotation row names its item by `id` and the file it came from by `source` (media/files.py): a plain file,
a `shard.tar::key` member of a WebDataset shard, a `part.parquet::key` row of an img2dataset file. Reading
goes through `media.files.file_rows`, the same reader the job used, so every kind of input and every storage
(local, s3://) reads here as it did there; decoding goes through `media.isolation.IsolatedDecoder`, so a file
that crashes or hangs a native decoder costs one picture, not the caller. An image becomes one picture
fitted into a `size` x `size` box; a video a strip of a few evenly sampled frames side by side.

An item whose picture cannot be made gets a `problem` instead, in one line: the reader's or the decoder's
error ("cannot decode image: ...", "member 0005.jpg: empty file (0 bytes)"), "not found in SOURCE" when the
file no longer holds it, or, for a row that stands for a whole file that failed, that there is no one item
to show. Nothing here raises for a bad item.

Bounded work: at most `workers` sources are read at once (one thread and one decoder child each), a source is
read only until every wanted item of it is found, each item's bytes are capped by `max_item_bytes`, and each
decode by `DecodeConfig.timeout_s` and `max_pixels`.
"""

from __future__ import annotations

import io
import queue
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from media.decode import DecodeConfig
from media.errors import describe_error
from media.files import DEFAULT_MAX_ITEM_BYTES, file_rows, is_container
from media.isolation import IsolatedDecoder

THUMBNAIL_SIZE = 192       # pixels: the box an image, or each frame of a video, is fitted into
VIDEO_FRAMES = 4           # frames in a video's strip
JPEG_QUALITY = 80
READ_WORKERS = 8


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG of the item (`frames` pictures side by side: 1 for an image), or the `problem` why there is none."""

    jpeg: bytes | None = None
    frames: int = 0
    problem: str | None = None


@dataclass(frozen=True)
class ThumbnailConfig:
    size: int = THUMBNAIL_SIZE
    video_frames: int = VIDEO_FRAMES
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES
    max_pixels: int = 50_000_000
    decode_timeout_s: float = 30.0
    media_keys: Sequence[str] | None = None   # WebDataset media extensions, as the run used them
    workers: int = READ_WORKERS

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(num_frames=self.video_frames, max_pixels=self.max_pixels, timeout_s=self.decode_timeout_s)


class ThumbnailReader:
    """Makes thumbnails with `config.workers` threads, each with its decoder child while it is in use. A context
    manager: the children are stopped on exit. Keep one for many calls: children are started once."""

    def __init__(self, config: ThumbnailConfig | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.config = config or ThumbnailConfig()
        self.storage_options = storage_options
        self._pool = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="thumbnails")
        self._decoders: queue.SimpleQueue[IsolatedDecoder] = queue.SimpleQueue()
        self._all: list[IsolatedDecoder] = []  # a child starts on its first item, not here
        for _ in range(self.config.workers):
            decoder = IsolatedDecoder(self.config.decode_config())
            self._all.append(decoder)
            self._decoders.put(decoder)

    def thumbnails(self, items: Mapping[str, str]) -> dict[str, Thumbnail]:
        """A Thumbnail for every item of `items` (id -> source), each source read once, several in parallel."""
        by_source: dict[str, list[str]] = {}
        for item_id, source in items.items():
            by_source.setdefault(source, []).append(item_id)
        found: dict[str, Thumbnail] = {}
        for result in self._pool.map(lambda pair: self._one_source(*pair), by_source.items()):
            found.update(result)
        return found

    def _one_source(self, source: str, ids: list[str]) -> dict[str, Thumbnail]:
        decoder = self._decoders.get()  # never waits: there are as many decoders as threads
        try:
            return _source_thumbnails(source, ids, self.config, self.storage_options, decoder)
        finally:
            self._decoders.put(decoder)

    def close(self) -> None:
        self._pool.shutdown()
        with ThreadPoolExecutor(max_workers=len(self._all) or 1) as closing:  # each child may take a moment to exit
            list(closing.map(IsolatedDecoder.close, self._all))

    def __enter__(self) -> ThumbnailReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _source_thumbnails(source: str, ids: list[str], config: ThumbnailConfig,
                       storage_options: Mapping[str, Any] | None, decoder: IsolatedDecoder) -> dict[str, Thumbnail]:
    found: dict[str, Thumbnail] = {}
    wanted = set(ids)
    if source in wanted and is_container(source):  # the row of a shard that failed as a whole
        found[source] = Thumbnail(problem="no picture: the row stands for the whole file, not one item of it")
        wanted.discard(source)
    try:
        for row in file_rows(source, None, storage_options, config.max_item_bytes, media_keys=config.media_keys):
            if row["id"] not in wanted:
                continue
            wanted.discard(row["id"])
            found[row["id"]] = _thumbnail(row, config, decoder)
            if not wanted:
                break  # the rest of a shard is never read
    except Exception as exc:  # file_rows reports bad files as rows; anything else still costs only pictures
        problem = f"cannot read {source}: {describe_error(exc)}"
        return {**found, **{item_id: Thumbnail(problem=problem) for item_id in wanted}}
    return {**found, **{item_id: Thumbnail(problem=f"not found in {source} (changed since the run?)")
                        for item_id in wanted}}


def _thumbnail(row: Mapping[str, Any], config: ThumbnailConfig, decoder: IsolatedDecoder) -> Thumbnail:
    if row["error"] is not None:
        return Thumbnail(problem=row["error"])
    frames, error = decoder.decode(row["media_kind"], row["data"])
    if frames is None:
        return Thumbnail(problem=error or "cannot decode")
    try:
        return Thumbnail(jpeg=strip_jpeg(frames, config.size), frames=len(frames))
    except Exception as exc:  # a degenerate picture (0 pixels wide, ...) is still only one item
        return Thumbnail(problem=f"cannot make a thumbnail: {describe_error(exc)}")


def strip_jpeg(frames: Sequence[np.ndarray], size: int, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 RGB frames, each fitted into a `size` x `size` box, side by side in one JPEG."""
    pictures = []
    for frame in frames:
        picture = Image.fromarray(frame)
        picture.thumbnail((size, size), Image.Resampling.BICUBIC)
        pictures.append(picture)
    strip = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)), (0, 0, 0))
    x = 0
    for picture in pictures:
        strip.paste(picture, (x, (strip.height - picture.height) // 2))
        x += picture.width
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
