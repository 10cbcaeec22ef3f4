"""Decoding media that make decoders crash, hang, lie or eat memory (see faulty_media.py): each fault is
real (a clip that segfaults decord, a decompression bomb), and each test bounds how long it waits."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from faulty_media import (
    crashing_mp4,
    encode,
    exif_rotated_jpeg,
    grey16_png,
    quadrants,
    raw_decord_exit_code,
)
from PIL import Image
from sample_media import image_bytes, video_bytes

from media.decode import DecodeConfig, normalization, pixels_array
from media.normalize import normalize
from pipeline.decode import decode_batch, decode_items
from pipeline.read import read_items
from pipeline.schema import ITEM_SCHEMA

PLAIN = DecodeConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_frames=4)
CRASH = "decoder crashed: signal 11 (SIGSEGV)"


def item(kind: str | None, data: bytes | None, item_id: str) -> dict[str, Any]:
    return {"id": item_id, "source": item_id, "media_kind": kind, "data": data, "error": None, "caption": None,
            "url": None}


def decode_rows(rows: list[dict[str, Any]], config: DecodeConfig = PLAIN) -> dict[str, dict[str, Any]]:
    table = decode_batch(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), config)
    return {row["id"]: row for row in table.to_pylist()}


def pixels(row: dict[str, Any]) -> np.ndarray:
    assert row["error"] is None, row["error"]
    array = np.array(pixels_array(row["pixels"], row["pixels_shape"]))
    return normalize(torch.from_numpy(array), *normalization(PLAIN)).numpy()  # PLAIN: intensities in [0, 1]


def test_the_crashing_clip_really_crashes_decord() -> None:
    assert raw_decord_exit_code(crashing_mp4()) == -11  # SIGSEGV: the fault is real, not an exception
    assert raw_decord_exit_code(video_bytes()) == 0


def test_a_decoder_crash_costs_only_its_item() -> None:
    start = time.monotonic()
    rows = decode_rows([
        item("image", image_bytes(), "good-image"),
        item("video", crashing_mp4(), "crashing-clip"),
        item("video", video_bytes(), "good-clip"),
        item("video", crashing_mp4(), "crashing-again"),
        item("image", image_bytes(fmt="JPEG"), "good-after"),
    ])
    assert time.monotonic() - start < 60
    assert rows["crashing-clip"]["error"] == rows["crashing-again"]["error"] == CRASH
    assert rows["crashing-clip"]["pixels"] is None and rows["crashing-clip"]["pixels_shape"] is None
    assert pixels(rows["good-image"]).shape == (1, 3, 16, 16)
    assert pixels(rows["good-clip"]).shape == (4, 3, 16, 16)
    assert pixels(rows["good-after"]).shape == (1, 3, 16, 16)


def test_a_decoder_crash_in_a_ray_job_gives_one_error_row(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "b.mp4").write_bytes(crashing_mp4())
    (tmp_path / "c.mp4").write_bytes(video_bytes())
    dataset = decode_items(read_items(str(tmp_path)).dataset, PLAIN, batch_size=3)
    taken: list[dict[str, Any]] = []
    # A daemon thread: a job that never ends fails this test instead of hanging it (or the interpreter's exit).
    job = threading.Thread(target=lambda: taken.extend(dataset.take_all()), daemon=True)
    job.start()
    job.join(timeout=120)
    assert not job.is_alive(), "the job did not finish within 120 s"
    rows = {Path(row["id"]).name: row for row in taken}
    assert rows.keys() == {"a.png", "b.mp4", "c.mp4"}
    assert [name for name, row in rows.items() if row["error"] is not None] == ["b.mp4"]
    assert rows["b.mp4"]["error"] == CRASH
    assert pixels(rows["c.mp4"]).shape == (4, 3, 16, 16)


def test_a_decoder_that_takes_too_long_is_given_up() -> None:
    slow_clip = video_bytes(num_frames=12, size=512)  # tens of milliseconds to decode at least: 100 x the limit
    config = dataclasses.replace(PLAIN, timeout_s=0.0005)
    start = time.monotonic()
    rows = decode_rows([item("video", slow_clip, "slow"), item("video", slow_clip, "slow-again")], config)
    assert time.monotonic() - start < 30
    assert rows["slow"]["error"] == rows["slow-again"]["error"] == "decoder timed out after 0.0005 s"
    rows = decode_rows([item("video", slow_clip, "slow")], dataclasses.replace(config, timeout_s=60))
    assert pixels(rows["slow"]).shape == (4, 3, 16, 16)  # the same clip decodes with time enough


def test_a_demonstration_that_crashes_the_decoder_fails_the_task_not_the_actor(tmp_path: Path) -> None:
    """A generation actor decodes its tasks' demonstrations when it starts: media changed since `validate` must
    give the task a clear error there, not kill the actor (Ray would restart it on the same file)."""
    from pipeline.generate import load_demonstration_pixels
    from pipeline.task import load_task

    (tmp_path / "clip.mp4").write_bytes(video_bytes(num_frames=12, fps=10))
    (tmp_path / "task.yaml").write_text("name: t\ndemonstrations: [{media: clip.mp4, text: x}]\n")
    task = load_task(tmp_path / "task.yaml")
    assert load_demonstration_pixels(task, PLAIN, {}).shape[:3] == (1, 1, 8)  # the task's 8 frames
    (tmp_path / "clip.mp4").write_bytes(crashing_mp4())
    try:
        load_demonstration_pixels(task, PLAIN, {})
    except ValueError as error:
        assert str(error) == f"{task.path}: demonstration {tmp_path / 'clip.mp4'}: {CRASH}"
    else:
        raise AssertionError("a crashing demonstration was accepted")


def test_exif_orientation_is_applied() -> None:
    stored = quadrants((40, 20))
    jpeg = exif_rotated_jpeg(stored, orientation=6)  # "show it turned 90 degrees clockwise"
    as_stored = Image.open(io.BytesIO(jpeg)).convert("RGB")  # the JPEG's own pixels, unturned
    turned = encode(as_stored.transpose(Image.Transpose.ROTATE_270))  # turned clockwise, no EXIF: lossless PNG
    rows = decode_rows([item("image", jpeg, "exif"), item("image", turned, "turned"),
                        item("image", encode(as_stored), "unturned")])
    assert np.array_equal(pixels(rows["exif"]), pixels(rows["turned"]))
    assert not np.allclose(pixels(rows["exif"]), pixels(rows["unturned"]), atol=0.1)


def test_16_bit_images_are_scaled_not_clipped() -> None:
    rows = decode_rows([
        item("image", grey16_png(32768), "mid-grey-16"),
        item("image", grey16_png(65535), "white-16"),
        item("image", grey16_png(0), "black-16"),
        item("image", image_bytes(color=(128, 128, 128)), "mid-grey-8"),
    ])
    assert np.abs(pixels(rows["mid-grey-16"]) - pixels(rows["mid-grey-8"])).max() <= 1 / 255
    assert np.allclose(pixels(rows["white-16"]), 1.0) and np.allclose(pixels(rows["black-16"]), 0.0)


def test_too_many_pixels_are_refused_from_the_header() -> None:
    """A 32 KB PNG of 144 megapixels is refused without being decoded: fast, and without the 144 MB (as
    bilevel; 432 MB as RGB) that decoding it takes. Measured in a fresh process, whose peak memory says it."""
    script = textwrap.dedent("""
        import json, resource, sys, time
        import numpy as np
        from faulty_media import bomb_png
        from media.decode import DecodeConfig, decode_item

        class Pixels:  # what a transform returns, without loading torch into this process
            def numpy(self):
                return np.zeros((3, 2, 2), np.float32)

        bomb = bomb_png()
        decode_item("image", b"warm up PIL", lambda image: Pixels(), DecodeConfig())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        pixels, error = decode_item("image", bomb, lambda image: Pixels(), DecodeConfig())
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({"error": error, "seconds": time.monotonic() - start, "grown_mb": grown_mb,
                          "file_bytes": len(bomb)}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["error"] == "image too large: 12000 x 12000 = 144000000 pixels (limit 50000000)"
    assert measured["seconds"] < 1 and measured["grown_mb"] < 20 and measured["file_bytes"] < 100_000


def test_frame_size_limit_applies_to_videos_and_is_configurable() -> None:
    config = dataclasses.replace(PLAIN, max_pixels=32 * 32 - 1)
    rows = decode_rows([item("video", video_bytes(size=32), "clip"), item("image", image_bytes(size=(32, 32)),
                                                                              "image")], config)
    assert rows["clip"]["error"] == rows["image"]["error"] == "image too large: 32 x 32 = 1024 pixels (limit 1023)"
    rows = decode_rows([item("video", video_bytes(size=32), "clip")], dataclasses.replace(config, max_pixels=1024))
    assert pixels(rows["clip"]).shape == (4, 3, 16, 16)


def test_the_same_fault_gives_the_same_error_text() -> None:
    rows = decode_rows([
        item("image", b"not an image", "garbage-1"),
        item("image", b"\x00" * 300, "garbage-2"),
        item("image", image_bytes()[:60], "truncated-1"),
        item("image", image_bytes(color=(1, 2, 3), size=(50, 50))[:60], "truncated-2"),
    ])
    assert rows["garbage-1"]["error"] == rows["garbage-2"]["error"]
    assert rows["truncated-1"]["error"] == rows["truncated-2"]["error"]
    assert "0x" not in rows["garbage-1"]["error"] + rows["truncated-1"]["error"]
