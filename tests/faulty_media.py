"""Media that make decoders misbehave, made on the spot: an mp4 that segfaults decord, an EXIF-rotated JPEG,
a 16-bit PNG, a decompression bomb. Each comes with what a test needs to prove the fault is real (e.g. that a
plain decord read of the clip dies by a signal).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
from sample_media import video_bytes

# The boxes on the way from the top of an mp4 to its chunk offset table.
_STCO_PATH = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stco")


def crashing_mp4() -> bytes:
    """A small mp4 whose first chunk offset (in `moov/.../stco`) points 2 GB past its end: decord 0.6 reads
    the "sample" from there without checking and dies with SIGSEGV. Four bytes differ from a good clip."""
    data = bytearray(video_bytes(num_frames=12, fps=10))
    stco = _box_offset(bytes(data), _STCO_PATH)
    # stco: size, type, version + flags, entry count, then the offsets
    data[stco + 16:stco + 20] = struct.pack(">I", 0x7FFFFFFF)
    return bytes(data)


def _box_offset(data: bytes, path: tuple[bytes, ...]) -> int:
    """Offset of the box reached by following `path` (box types) from the top of an ISO media file."""
    start, end = 0, len(data)
    for index, wanted in enumerate(path):
        while start + 8 <= end:
            size, kind = struct.unpack(">I4s", data[start:start + 8])
            if kind == wanted:
                break
            if size < 8:
                raise ValueError(f"unexpected box size {size} at {start}")
            start += size
        else:
            raise ValueError(f"no {wanted!r} box")
        if index < len(path) - 1:
            start, end = start + 8, start + size
    return start


_RAW_DECORD_READ = """
import io, sys, decord
reader = decord.VideoReader(io.BytesIO(sys.stdin.buffer.read()), ctx=decord.cpu(0), num_threads=1)
reader.get_frame_timestamp(list(range(len(reader))))
reader.get_batch([0, len(reader) - 1]).asnumpy()
"""


def raw_decord_exit_code(data: bytes, timeout: float = 60) -> int:
    """The exit code of a fresh Python that reads every frame timestamp and the first and last frame of `data`
    with decord: negative (-signal) when decord crashed it."""
    return subprocess.run([sys.executable, "-c", _RAW_DECORD_READ], input=data, capture_output=True,
                          timeout=timeout).returncode


def quadrants(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """An RGB picture whose four quadrants differ (red, green / blue, white): any turn or flip changes it."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2:] = (0, 255, 0)
    pixels[height // 2:, : width // 2] = (0, 0, 255)
    pixels[height // 2:, width // 2:] = (255, 255, 255)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image, orientation: int) -> bytes:
    """`image` stored as it is, as a JPEG whose EXIF says viewers must show it turned (`orientation`: 6 is
    "turn 90 degrees clockwise")."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encode(image, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def grey16_png(value: int, size: tuple[int, int] = (24, 24)) -> bytes:
    """A 16-bit greyscale PNG of one level `value` (0..65535)."""
    return encode(Image.fromarray(np.full(size[::-1], value, np.uint16)))


def bomb_png(side: int = 12_000) -> bytes:
    """A `side` x `side` one-colour PNG: 144 megapixels in a few kilobytes (bilevel, so it is cheap to make)."""
    return encode(Image.new("1", (side, side), 1), optimize=True)
