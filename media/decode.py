"""An item's encoded bytes -> pixels: the one preprocessing for annotation and training.

Images go through PIL: turned upright by their EXIF orientation (as viewers show them), then to 8-bit
RGB, with 16-bit, 32-bit and float images scaled into 0..255 rather than clipped. Videos go through decord,
frames sampled evenly or at a fixed rate. Every picture is then resized / center-cropped by open_clip's own
eval transform, and normalised by its mean / std, so the pixels match what the vision tower was trained with.

An item that cannot be decoded gives an error message ("cannot decode image: ...", "cannot decode video:
...", "image too large: ...") instead of pixels; nothing here raises for bad bytes. The texts leave out
what differs between two items with the same fault (object addresses), so rows group by cause. Pictures
of more than `DecodeConfig.max_pixels` are refused from their header, before any pixel is decoded: a few
kilobytes of PNG can hold a 144-megapixel image.

Two halves: `decode_frames` runs the native decoders on the untrusted bytes and gives 8-bit RGB frames;
the transform turns them into pixels. `media.isolation` runs the first half in a child process (`serve`),
where a native decoder that crashes or hangs takes only the child with it. That half never uses torch or
open_clip (imported here only when a transform is built), so the child stays clear of torch's thread pools.

Two forms of pixels, both of shape (F, 3, H, W), F = 1 for images, the number of sampled frames for videos:
- `frames_to_uint8` (`resize_transform`): resized and cropped, not normalised, uint8 (`PIXELS_DTYPE`, named
  `PIXELS_ENCODING` where pixels travel). This is what the annotation job sends from its decode tasks to its
  vision actors: a quarter of the bytes of float32, half of float16. `media.normalize` then makes the model's
  input from them on the model's device, exactly as open_clip's ToTensor + Normalize would have.
- `frames_to_pixels` / `decode_item` (`image_transform`, the whole open_clip transform): normalised, float16,
  for callers that decode in their own process and use the pixels there (training).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import av
import decord
import numpy as np
from PIL import Image, ImageOps

from media.errors import describe_error

if TYPE_CHECKING:  # imported where a transform is built: a decoding child process never needs them
    import torch

PIXELS_DTYPE = np.uint8      # pixels as they travel: resized, 0..255, not normalised (`frames_to_uint8`)
PIXELS_ENCODING = "uint8"    # the name that says so, beside the bytes (pipeline/decode.py's `pixels_dtype`)
NORMALISED_DTYPE = np.float16  # `frames_to_pixels`: normalised in the calling process
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
    when `fps` is set (at most `num_frames`). `max_pixels`: the largest picture (width x height of an
    image or of a video frame) decoded at all; larger ones are error rows. `timeout_s`: how long one item may
    take to decode where decoding runs isolated (`pipeline.decode`) before it is given up as hung."""

    image_size: int | tuple[int, int] = 224
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    num_frames: int = 8
    fps: float | None = None
    max_pixels: int = 50_000_000
    timeout_s: float = 60.0

    @classmethod
    def for_model(cls, model_config, **video) -> DecodeConfig:
        """The preprocessing a model (its `FlamingoConfig`) expects; `video`: num_frames / fps."""
        return cls(model_config.image_size, tuple(model_config.image_mean), tuple(model_config.image_std), **video)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def image_transform(config: DecodeConfig) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for `config`: the one preprocessing for items, demonstrations and training."""
    import open_clip

    return open_clip.image_transform(config.image_size, is_train=False, mean=config.mean, std=config.std,
                                     interpolation=config.interpolation, resize_mode=config.resize_mode)


def resize_transform(config: DecodeConfig) -> Callable[[Image.Image], Image.Image]:
    """The steps of `image_transform` before its ToTensor (resize, crop, to RGB): 8-bit pictures in, 8-bit out.
    Cut from open_clip's own transform rather than rebuilt, so every `resize_mode` stays what open_clip does."""
    from torchvision import transforms

    steps, cut = _split_transform(config)
    return transforms.Compose(steps[:cut])


def normalization(config: DecodeConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of `image_transform`'s Normalize: `config`'s own, or open_clip's defaults where it has none."""
    steps, cut = _split_transform(config)
    normalize = steps[cut + 1]
    return tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)


def _split_transform(config: DecodeConfig) -> tuple[list[Any], int]:
    """The steps of open_clip's eval transform and where its ToTensor is, checking that only Normalize follows:
    the split into a uint8 half and a normalising half is exact only then."""
    steps = list(image_transform(config).transforms)  # type: ignore[attr-defined]  # a torchvision Compose
    names = [type(step).__name__ for step in steps]
    cut = next((i for i, name in enumerate(names) if name.endswith("ToTensor")), None)
    if cut is None or names[cut + 1:] != ["Normalize"]:
        raise ValueError(f"open_clip's eval transform is not resize..., ToTensor, Normalize but {names}")
    return steps, cut


def decode_item(
    kind: str | None, data: bytes | None, transform: Callable[[Image.Image], torch.Tensor], config: DecodeConfig
) -> tuple[np.ndarray | None, str | None]:
    """`(pixels, None)` with pixels of shape (F, 3, H, W) float16, normalised by `transform` (`image_transform`),
    or `(None, error message)`. Decodes in the calling process."""
    frames, error = decode_frames(kind, data, config)
    return (None, error) if frames is None else frames_to_pixels(kind, frames, transform)


def decode_frames(kind: str | None, data: bytes | None, config: DecodeConfig) -> tuple[list[np.ndarray] | None,
                                                                                       str | None]:
    """`(frames, None)`, the picture(s) of an item as (H, W, 3) uint8 RGB arrays (one for an image, the sampled
    frames of a video), or `(None, error message)`: the part of decoding that runs native decoders."""
    if data is None:
        return None, "no data to decode"
    if kind not in ("image", "video"):
        return None, f"cannot decode media kind {kind!r}"
    try:
        if kind == "image":
            return [_decode_image(data, config)], None
        return list(_decode_video(data, config)), None
    except TooLarge as exc:
        return None, str(exc)
    except Exception as exc:  # PIL and decord raise many kinds; any of them means "not usable media"
        return None, f"cannot decode {kind}: {describe_error(exc)}"


def frames_to_pixels(kind: str | None, frames: Sequence[np.ndarray], transform: Callable[[Image.Image], torch.Tensor]
                     ) -> tuple[np.ndarray | None, str | None]:
    """`(pixels, None)`: `frames` (from `decode_frames`) through `transform` (`image_transform`), stacked as
    (F, 3, H, W) float16; or `(None, error message)`."""
    try:
        return np.stack([transform(Image.fromarray(frame)).numpy() for frame in frames]).astype(NORMALISED_DTYPE), None
    except Exception as exc:  # the transform on odd pictures (e.g. a 1-pixel-wide frame)
        return None, f"cannot decode {kind}: {describe_error(exc)}"


def frames_to_uint8(kind: str | None, frames: Sequence[np.ndarray], resize: Callable[[Image.Image], Image.Image]
                    ) -> tuple[np.ndarray | None, str | None]:
    """`(pixels, None)`: `frames` (from `decode_frames`) through `resize` (`resize_transform`), stacked as
    (F, 3, H, W) uint8, the very values open_clip's ToTensor would have divided by 255; or `(None, error
    message)`, the same as `frames_to_pixels` gives."""
    try:
        stacked = np.stack([np.asarray(resize(Image.fromarray(frame)), dtype=PIXELS_DTYPE) for frame in frames])
        return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)), None  # (F, H, W, 3) -> (F, 3, H, W)
    except Exception as exc:  # the transform on odd pictures (e.g. a 1-pixel-wide frame)
        return None, f"cannot decode {kind}: {describe_error(exc)}"


def serve(connection: Connection, config: DecodeConfig) -> None:
    """Decode in a child process: say "ready", then answer each `(kind, data)` received on `connection` with
    `decode_frames`'s answer, until the other end closes. (Here, beside the decoders, so that a
    child started by any method imports only what decoding needs.)"""
    connection.send("ready")
    while True:
        try:
            kind, data = connection.recv()
        except EOFError:
            return
        connection.send(decode_frames(kind, data, config))


class TooLarge(ValueError):
    """A picture with more pixels than `DecodeConfig.max_pixels`; its message is the whole error text."""

    def __init__(self, width: int, height: int, limit: int) -> None:
        super().__init__(f"image too large: {width} x {height} = {width * height} pixels (limit {limit})")


def check_size(width: int, height: int, limit: int) -> None:
    """Raise `TooLarge` when a `width` x `height` picture has more than `limit` pixels."""
    if width * height > limit:
        raise TooLarge(width, height, limit)


def pixels_array(pixels: bytes, shape: Sequence[int]) -> np.ndarray:
    """The (F, 3, H, W) uint8 array whose C-order bytes are `pixels` (`frames_to_uint8`'s; a read-only view)."""
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


def _decode_image(data: bytes, config: DecodeConfig) -> np.ndarray:
    with warnings.catch_warnings():
        # PIL warns about pictures above its own bomb threshold; `max_pixels` decides here instead. (Above twice
        # that threshold PIL refuses them at open, whatever `max_pixels` says.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    with image:
        check_size(image.width, image.height, config.max_pixels)  # from the header: nothing is decoded yet
        return np.asarray(to_rgb(upright(image)))


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says, as viewers show it. An unreadable EXIF block leaves the
    image as stored (it is metadata: the pixels themselves may be fine, and no viewer could turn them either)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF raises anything from KeyError to struct.error
        image.load()  # a fault in the pixel data itself still surfaces, as it would without EXIF
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. PIL's own conversion clips 16-bit and 32-bit greyscale at 255 (a mid-grey 16-bit
    PNG turns white); here their full range is scaled to 0..255: 0..65535 for 16-bit, 0..2**32-1 for 32-bit
    integers holding more than 16 bits, 0..1 for floating point."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 1.0
        elif image.mode == "I" and values.size and values.max() > 65535:
            scale = 2.0**32 - 1
        else:
            scale = 65535.0
        grey = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _decode_video(data: bytes, config: DecodeConfig) -> np.ndarray:
    if not _is_video_container(data):
        raise ValueError("not an MP4/QuickTime, Matroska/WebM or AVI file")
    width, height = _frame_size(data)
    check_size(width, height, config.max_pixels)
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    timestamps = reader.get_frame_timestamp(list(range(len(reader))))  # (frames, 2): start, end seconds
    indices = sample_frame_indices(timestamps[:, 0], timestamps[-1, 1], config.num_frames, config.fps)
    return reader.get_batch(indices.tolist()).asnumpy()  # (F, H, W, 3) uint8 RGB


def _frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first video stream, from the container's headers (decord has no way to tell it
    without decoding a frame)."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        codec = container.streams.video[0].codec_context
        return int(codec.width), int(codec.height)


def _is_video_container(data: bytes) -> bool:
    is_avi = data[:4] == b"RIFF" and data[8:12] == b"AVI "
    return data[4:8] in _MP4_FIRST_BOXES or data.startswith(_EBML_MAGIC) or is_avi
