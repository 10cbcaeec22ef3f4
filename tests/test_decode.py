"""Decoding on real images and mp4s (media.decode, and pipeline.decode's batches and Ray map): shapes,
the uint8 pixels that travel and their normalisation, which video frames are sampled (frame i is a solid grey
of level frame_level(i)), and bad items turned into error rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from sample_media import frame_level, image_bytes, tar_bytes, video_bytes

from media.decode import DecodeConfig, normalization, pixels_array, sample_frame_indices
from media.normalize import normalize
from pipeline.decode import decode_batch, decode_items
from pipeline.read import read_items
from pipeline.schema import ITEM_SCHEMA

# mean 0 / std 1: pixel values are plain intensities in [0, 1], easy to check
PLAIN = DecodeConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_frames=4)
VIDEO = video_bytes(num_frames=12, fps=10)  # frame i starts at i / 10 s


def item(kind: str | None, data: bytes | None, error: str | None = None, item_id: str = "x") -> dict[str, Any]:
    return {"id": item_id, "source": item_id, "media_kind": kind, "data": data, "error": error, "caption": None,
            "url": None}


def decode_rows(rows: list[dict[str, Any]], config: DecodeConfig = PLAIN) -> list[dict[str, Any]]:
    return decode_batch(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), config).to_pylist()


def pixels(row: dict[str, Any], config: DecodeConfig = PLAIN) -> np.ndarray:
    """The row's pixels as the model sees them: normalised with `config`'s mean and std, float32."""
    assert row["error"] is None, row["error"]
    assert row["pixels_dtype"] == "uint8"
    array = np.array(pixels_array(row["pixels"], row["pixels_shape"]))
    return normalize(torch.from_numpy(array), *normalization(config)).numpy()


def noise_jpeg(size: tuple[int, int] = (40, 30)) -> bytes:
    """A JPEG of random pixels: every value of the resize and the normalisation differs from its neighbours."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()


def sampled_frames(row: dict[str, Any]) -> list[int]:
    """Which source frames a decoded video row holds, told apart by their grey level."""
    levels = pixels(row).astype(np.float32).mean(axis=(1, 2, 3)) * 255
    frames = [int(np.abs(np.array([frame_level(i) for i in range(12)]) - level).argmin()) for level in levels]
    assert all(abs(level - frame_level(f)) < 6 for level, f in zip(levels, frames))
    return frames


def test_image_becomes_one_frame_of_uint8_pixels() -> None:
    [row] = decode_rows([item("image", image_bytes(color=(255, 0, 128), size=(64, 32)))])
    assert row["pixels_dtype"] == "uint8" and row["pixels_shape"] == [1, 3, 16, 16]
    assert len(row["pixels"]) == 3 * 16 * 16  # one byte a value: not normalised yet
    assert pixels_array(row["pixels"], row["pixels_shape"])[0, :, 8, 8].tolist() == [255, 0, 128]
    array = pixels(row)
    assert array.shape == (1, 3, 16, 16)
    assert np.allclose(array[0].mean(axis=(1, 2)), [1.0, 0.0, 128 / 255], atol=0.01)
    assert "data" not in row and row["id"] == "x"


def test_image_normalises_with_the_models_mean_and_std() -> None:
    config = DecodeConfig(image_size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    [row] = decode_rows([item("image", image_bytes(color=(255, 0, 255), fmt="JPEG"))], config)
    assert normalization(config) == ((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert np.allclose(pixels(row, config)[0].mean(axis=(1, 2)), [1.0, -1.0, 0.5], atol=0.02)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_every_image_format_decodes(fmt: str) -> None:
    [row] = decode_rows([item("image", image_bytes(fmt=fmt))])
    assert pixels(row).shape == (1, 3, 16, 16)


def test_palette_and_alpha_images_become_rgb() -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 255, 0, 10)).save(buffer, format="PNG")
    [row] = decode_rows([item("image", buffer.getvalue())])
    assert np.allclose(pixels(row)[0].mean(axis=(1, 2)), [0.0, 1.0, 0.0], atol=0.01)


@pytest.mark.parametrize("config", [PLAIN, DecodeConfig(image_size=24, num_frames=4),  # open_clip's mean / std
                                    DecodeConfig(image_size=24, num_frames=4, resize_mode="squash")])
def test_in_process_decoding_gives_the_same_pixels(config: DecodeConfig) -> None:
    """Training decodes with `decode_item` in its own process, normalised there as float16; annotation sends
    uint8 from a child process per batch and normalises later. Rounded to float16 both are the same bits."""
    from media.decode import decode_item, image_transform

    image = noise_jpeg()
    rows = decode_rows([item("image", image, item_id="i"), item("video", VIDEO, item_id="v")], config)
    for row, kind, data in zip(rows, ("image", "video"), (image, VIDEO)):
        array, error = decode_item(kind, data, image_transform(config), config)
        assert error is None and array is not None
        assert np.array_equal(array, pixels(row, config).astype(np.float16))


def test_video_frames_sampled_evenly() -> None:
    [row] = decode_rows([item("video", VIDEO)])
    assert pixels(row).shape == (4, 3, 16, 16) and row["pixels_dtype"] == "uint8"
    assert sampled_frames(row) == [1, 4, 7, 10]  # middle of each quarter of 12 frames


def test_video_frames_sampled_at_fixed_rate() -> None:
    [row] = decode_rows([item("video", VIDEO)], dataclasses.replace(PLAIN, num_frames=8, fps=2.5))
    assert sampled_frames(row) == [0, 4, 8]  # t = 0, 0.4, 0.8 s; 1.2 s is past the end
    [row] = decode_rows([item("video", VIDEO)], dataclasses.replace(PLAIN, num_frames=3, fps=5))
    assert sampled_frames(row) == [0, 2, 4]  # capped at num_frames


@pytest.mark.parametrize("container_format", ["mov", "matroska", "webm", "avi"])
def test_every_video_container_decodes(container_format: str) -> None:
    [row] = decode_rows([item("video", video_bytes(num_frames=8, container_format=container_format))])
    assert sampled_frames(row) == [1, 3, 5, 7]


def test_playlist_posing_as_video_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(VIDEO)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()
    [row] = decode_rows([item("video", playlist)])
    assert row["error"] == "cannot decode video: ValueError: not an MP4/QuickTime, Matroska/WebM or AVI file"


def test_short_video_gives_fewer_frames() -> None:
    [row] = decode_rows([item("video", video_bytes(num_frames=3))], dataclasses.replace(PLAIN, num_frames=8))
    assert sampled_frames(row) == [0, 1, 2]


def test_sample_frame_indices() -> None:
    starts = np.arange(100) / 25.0  # 4 s at 25 fps
    assert sample_frame_indices(starts, 4.0, 4, None).tolist() == [12, 37, 62, 87]
    assert sample_frame_indices(starts, 4.0, 8, 1.0).tolist() == [0, 25, 50, 75]
    assert sample_frame_indices(starts, 4.0, 8, 100.0).tolist() == [0, 1, 2]  # 8 samples within 0.07 s: each frame once
    assert sample_frame_indices(starts[:1], 0.04, 8, None).tolist() == [0]


def test_config_is_checked_up_front() -> None:
    with pytest.raises(ValueError, match="fps must be positive"):
        DecodeConfig(fps=0)
    with pytest.raises(ValueError, match="num_frames"):
        DecodeConfig(num_frames=0)


def test_bad_items_get_errors_and_leave_the_rest_alone() -> None:
    good = image_bytes()
    rows = decode_rows(
        [
            item("image", good, item_id="good"),
            item("image", b"not an image", item_id="corrupt-image"),
            item("image", good[: len(good) // 2], item_id="truncated-image"),
            item("video", VIDEO[: len(VIDEO) // 2], item_id="truncated-video"),
            item("video", b"\x00" * 500, item_id="garbage-video"),
            item("image", VIDEO, item_id="video-labelled-image"),
            item("image", image_bytes(fmt="TIFF"), item_id="tiff-posing-as-jpeg"),  # only the listed formats
            item("video", good, item_id="image-labelled-video"),
            item(None, None, "unsupported file type .xyz", item_id="read-error"),
            item("video", VIDEO, item_id="good-video"),
        ]
    )
    by_id = {row["id"]: row for row in rows}
    assert pixels(by_id["good"]).shape == (1, 3, 16, 16)
    assert pixels(by_id["good-video"]).shape == (4, 3, 16, 16)
    for item_id in ("corrupt-image", "truncated-image", "video-labelled-image", "tiff-posing-as-jpeg"):
        assert by_id[item_id]["error"].startswith("cannot decode image: "), by_id[item_id]["error"]
    for item_id in ("truncated-video", "garbage-video", "image-labelled-video"):
        assert by_id[item_id]["error"].startswith("cannot decode video: "), by_id[item_id]["error"]
    assert by_id["read-error"]["error"] == "unsupported file type .xyz"
    for item_id in by_id.keys() - {"good", "good-video"}:
        assert by_id[item_id]["pixels"] is None and by_id[item_id]["pixels_shape"] is None
        assert by_id[item_id]["pixels_dtype"] is None


def test_decode_in_ray_with_mixed_frame_counts(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "b.mp4").write_bytes(VIDEO)
    (tmp_path / "c.mp4").write_bytes(video_bytes(num_frames=2))
    (tmp_path / "d.jpg").write_bytes(b"broken")
    (tmp_path / "s.tar").write_bytes(tar_bytes([("k.mp4", VIDEO), ("k.txt", b"cap")]))
    dataset = decode_items(read_items(str(tmp_path)).dataset, PLAIN, batch_size=2)
    rows = {row["id"]: row for row in dataset.take_all()}
    ok = {key.removeprefix(str(tmp_path)): row for key, row in rows.items() if row["error"] is None}
    frames = {key: pixels(row).shape[0] for key, row in ok.items()}
    assert frames == {
        "/a.png": 1,
        "/b.mp4": 4,
        "/c.mp4": 2,
        "/s.tar::k": 4,
    }
    assert rows[f"{tmp_path}/s.tar::k"]["caption"] == "cap"
    assert rows[f"{tmp_path}/d.jpg"]["error"].startswith("cannot decode image")
    assert sampled_frames(rows[f"{tmp_path}/b.mp4"]) == [1, 4, 7, 10]
    assert "data" not in dataset.schema().names
