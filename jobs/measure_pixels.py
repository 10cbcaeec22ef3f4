"""How pixels travel from the decode stage to the vision actors, before and after they became uint8, in one run:

    .venv/bin/python jobs/measure_pixels.py [--items 64] [--rounds 9] [--device cpu] [--dtype float32] [--video]

Each item is a 640 x 480 photo-like JPEG (or, with --video, a 16-frame mp4 of which 8 frames are sampled),
decoded once: the native decoders are the same for both ways and are left out of the figures. Then, per way, on
the same frames, rounds alternating between the ways:
- decode stage: the transform that makes the pixels of a row and their bytes for Arrow. Before: open_clip's whole
  eval transform, normalised, float16 (`media.decode.frames_to_pixels`). Now: the transform up to its ToTensor,
  uint8 (`frames_to_uint8`). One torch thread, as the decode tasks run.
- vision actor: those bytes back into the model's input on `--device` in `--dtype`, in batches of 16 (the vision
  pool's default). Before: float16 to the device, cast. Now: uint8 to the device, normalised there
  (`media.normalize`), exactly as `pipeline.encode.VisionEncoder.model_input`.
Prints the bytes per item (exact) and the median seconds per item over the rounds, with after/before ratios.
Not measured here: the object store itself (bytes through Ray between processes and nodes), the vision tower.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from media.decode import (  # noqa: E402  (after the path: run as a script from anywhere)
    NORMALISED_DTYPE,
    DecodeConfig,
    decode_frames,
    frames_to_pixels,
    frames_to_uint8,
    image_transform,
    resize_transform,
)
from media.normalize import normalize  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenFlamingo's ViT-L-14 preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_BATCH = 16


def photo(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    """Smooth gradients plus noise: resizes and compresses like a photograph more than a flat colour does."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def jpeg(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def clip_bytes(seed: int, frames: int = 16) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(photo(seed * 100 + i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


Frames = list[np.ndarray]  # an item's decoded pictures, as `decode_frames` gives them


def decode_stage(make: Callable[[Frames], np.ndarray | None], frames: list[Frames]) -> tuple[list[bytes], float]:
    """The rows' pixel bytes, and the seconds they took, with one torch thread as pipeline.decode runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        pixels = [make(f) for f in frames]
        rows = [p.tobytes() for p in pixels if p is not None]
        return rows, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def actor_stage(rows: list[bytes], wire: type, shape: tuple[int, ...], prepare: Callable[[np.ndarray], torch.Tensor],
                device: str) -> float:
    """Seconds to turn `rows` into the model's input on `device`, a vision batch at a time."""
    start = time.perf_counter()
    for first in range(0, len(rows), VISION_BATCH):
        prepare(np.stack([np.frombuffer(r, dtype=wire).reshape(shape) for r in rows[first:first + VISION_BATCH]]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--video", action="store_true", help="16-frame clips (8 frames sampled) instead of images")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    kind = "video" if args.video else "image"
    config = DecodeConfig(args.image_size, CLIP_MEAN, CLIP_STD)
    data = [clip_bytes(i) if args.video else jpeg(photo(i)) for i in range(args.items)]
    frames: list[Frames] = []
    for item in data:
        decoded, error = decode_frames(kind, item, config)
        assert decoded is not None, error
        frames.append(decoded)

    normalising, resizing = image_transform(config), resize_transform(config)
    ways = {
        "before": (lambda f: frames_to_pixels(kind, f, normalising)[0], NORMALISED_DTYPE,
                   lambda x: torch.from_numpy(x).to(args.device).to(dtype)),
        "after": (lambda f: frames_to_uint8(kind, f, resizing)[0], np.uint8,
                  lambda x: normalize(torch.from_numpy(x).to(args.device), CLIP_MEAN, CLIP_STD, dtype)),
    }
    seconds: dict[str, dict[str, list[float]]] = {way: {"decode": [], "actor": []} for way in ways}
    sizes: dict[str, int] = {}
    shape = (len(frames[0]), 3, args.image_size, args.image_size)
    for _ in range(args.rounds):
        for way, (make, wire, prepare) in ways.items():
            rows, decode_seconds = decode_stage(make, frames)
            seconds[way]["decode"].append(decode_seconds)
            seconds[way]["actor"].append(actor_stage(rows, wire, shape, prepare, args.device))
            sizes[way] = len(rows[0])

    per_item = {way: {stage: statistics.median(s) / args.items for stage, s in stages.items()}
                for way, stages in seconds.items()}
    print(f"{args.items} {kind}s of 640 x 480 -> {args.image_size} px, {args.rounds} rounds (median), "
          f"vision input on {args.device} in {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads")
    print(f"{'':8} {'bytes/item':>11} {'decode ms/item':>15} {'actor ms/item':>14} {'total ms/item':>14}")
    for way, stage in per_item.items():
        print(f"{way:8} {sizes[way]:>11,} {1e3 * stage['decode']:>15.3f} {1e3 * stage['actor']:>14.3f} "
              f"{1e3 * (stage['decode'] + stage['actor']):>14.3f}")
    before, after = per_item["before"], per_item["after"]
    print(f"{'after/before':8} {sizes['after'] / sizes['before']:>11.3f} {after['decode'] / before['decode']:>15.3f} "
          f"{after['actor'] / before['actor']:>14.3f} "
          f"{(after['decode'] + after['actor']) / (before['decode'] + before['actor']):>14.3f}")


if __name__ == "__main__":
    main()
