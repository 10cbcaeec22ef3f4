"""An item's encoded bytes -> model-ready pixels: the one preprocessing for annotation and training.

Images go through PIL (converted to RGB); videos through decord, frames sampled evenly or at a fixed
rate. Every picture is then resized / center-cropped / normalised by open_clip's own eval transform, so
the pixels match what the vision tower was trained with. An item that cannot be decoded gives an error
message ("cannot decode image: ...", "cannot decode video: ...") instead of pixels; nothing here raises
for bad bytes. Pixels are float16 arrays of shape (F, 3, H, W): F = 1 for images, the number of sampled
frames for videos.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import decord
import numpy as np
import open_clip
import torch
from PIL import Image

PIXELS_DTYPE = np.float16
# The PIL decoders for the image extensions that `media.files` accepts. Naming them keeps PIL from
# trying its other plugins on untrusted bytes (EPS, for one, runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# Box types that start an MP4 / QuickTime file, and the Matroska/WebM and AVI signatures. ffmpeg would
# also take a text playlist (HLS, concat) dressed up as a video and fetch whatever it points to.
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


@dataclass(frozen=True)
class DecodeConfig:
    """How to turn media into pixels. `image_size`, `mean`, `std` (and `interpolation`, `resize_mode`
    when the vision model's preprocess config has them) come from the model; None means open_clip's
    defaults. Videos: `num_frames` sampled evenly, or one frame every 1/`fps` seconds from the start
    when `fps` is set (at most `num_frames`)."""

    image_size: int | tuple[int, int] = 224
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    num_frames: int = 8
    fps: float | None = None

    @classmethod
    def for_model(cls, model_config, **video) -> DecodeConfig:
        """The preprocessing a model (its `FlamingoConfig`) expects; `video`: num_frames / fps."""
        return cls(model_config.image_size, tuple(model_config.image_mean), tuple(model_config.image_std), **video)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


def image_transform(config: DecodeConfig) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for `config`: the one preprocessing for items, demonstrations and training."""
    return open_clip.image_transform(config.image_size, is_train=False, mean=config.mean, std=config.std,
                                     interpolation=config.interpolation, resize_mode=config.resize_mode)


def decode_item(
    kind: str | None, data: bytes | None, transform: Callable[[Image.Image], torch.Tensor], config: DecodeConfig
) -> tuple[np.ndarray | None, str | None]:
    """`(pixels, None)` with pixels of shape (F, 3, H, W) float16, or `(None, error message)`."""
    if data is None:
        return None, "no data to decode"
    if kind == "image":
        try:
            return _decode_image(data, transform), None
        except Exception as exc:  # PIL raises many kinds; any of them means "not a usable image"
            return None, f"cannot decode image: {type(exc).__name__}: {exc}"
    if kind == "video":
        try:
            return _decode_video(data, transform, config), None
        except Exception as exc:  # decord raises RuntimeError, DECORDError, AssertionError, ...
            return None, f"cannot decode video: {type(exc).__name__}: {exc}"
    return None, f"cannot decode media kind {kind!r}"


def pixels_array(pixels: bytes, shape: Sequence[int]) -> np.ndarray:
    """The (F, 3, H, W) float16 array whose C-order bytes are `pixels` (a read-only view of them)."""
    return np.frombuffer(pixels, dtype=PIXELS_DTYPE).reshape(tuple(shape))


def sample_frame_indices(frame_starts: np.ndarray, duration: float | np.floating, num_frames: int,
                         fps: float | None) -> np.ndarray:
    """Which frames to decode, given each frame's start time (seconds) and the clip's duration.

    Evenly: the middle frame of each of `num_frames` equal segments (every frame when the clip has
    fewer). At `fps`: the frame nearest to each of the times 0, 1/fps, 2/fps, ... before the end,
    at most `num_frames` of them, each frame once."""
    total = len(frame_starts)
    if fps is None:
        count = min(num_frames, total)
        return ((np.arange(count) + 0.5) * total / count).astype(np.int64)
    # compare in the timestamps' own precision (decord's are float32): 1.2 s must not fall before a 1.2 s end
    times = (np.arange(num_frames) / fps).astype(frame_starts.dtype)
    times = times[times < np.asarray(duration, frame_starts.dtype)] if duration > 0 else times[:1]
    nearest = np.abs(frame_starts[None, :] - times[:, None]).argmin(axis=1)
    return np.unique(nearest)


def _decode_image(data: bytes, transform: Callable[[Image.Image], torch.Tensor]) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        return transform(image.convert("RGB")).numpy().astype(PIXELS_DTYPE)[None]


def _decode_video(data: bytes, transform: Callable[[Image.Image], torch.Tensor], config: DecodeConfig) -> np.ndarray:
    if not _is_video_container(data):
        raise ValueError("not an MP4/QuickTime, Matroska/WebM or AVI file")
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    timestamps = reader.get_frame_timestamp(list(range(len(reader))))  # (frames, 2): start, end seconds
    indices = sample_frame_indices(timestamps[:, 0], timestamps[-1, 1], config.num_frames, config.fps)
    frames = reader.get_batch(indices.tolist()).asnumpy()  # (F, H, W, 3) uint8 RGB
    return torch.stack([transform(Image.fromarray(frame)) for frame in frames]).numpy().astype(PIXELS_DTYPE)


def _is_video_container(data: bytes) -> bool:
    is_avi = data[:4] == b"RIFF" and data[8:12] == b"AVI "
    return data[4:8] in _MP4_FIRST_BOXES or data.startswith(_EBML_MAGIC) or is_avi
