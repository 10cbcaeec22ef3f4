"""Pixels travel from the decode stage to the vision actors as uint8 and are normalised on the actor: what the
model sees is what it saw when the decode stage normalised on the CPU and sent float16 (the same bits in a
float16 model, the same tokens within float16 rounding in a float32 one), demonstrations and items alike."""

from __future__ import annotations

import copy
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import flamingo
from media.decode import DecodeConfig, decode_item, image_transform
from pipeline.decode import decode_batch
from pipeline.encode import VisionEncoder, visual_tensor
from pipeline.generate import load_demonstration_pixels
from pipeline.task import load_task

MODEL = "tiny-random"


def photo_like(seed: int, size: tuple[int, int] = (57, 41)) -> bytes:
    """A JPEG of smooth gradients and noise, not square: the resize, the crop and every channel matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    smooth = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    picture = np.clip(smooth + rng.normal(0, 30, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> flamingo.Flamingo:
    return flamingo.load_model(MODEL)


@pytest.fixture(scope="module")
def decode(model: flamingo.Flamingo) -> DecodeConfig:
    return DecodeConfig.for_model(model.config)


def decoded(images: list[bytes], decode: DecodeConfig) -> pa.Table:
    rows = pa.table({"id": [f"item{i}" for i in range(len(images))], "source": ["test"] * len(images),
                     "media_kind": ["image"] * len(images), "data": images,
                     "error": pa.array([None] * len(images), pa.string())})
    return decode_batch(rows, decode)


def tokens_of(encoded: pa.Table) -> list[torch.Tensor]:
    return [visual_tensor(r["visual"], r["visual_shape"], r["visual_dtype"]) for r in encoded.to_pylist()]


def old_path_tokens(model: flamingo.Flamingo, data: bytes, decode: DecodeConfig, dtype: torch.dtype) -> torch.Tensor:
    """Normalised on the CPU, float16 on the wire, cast to the model's dtype: how pixels travelled before."""
    pixels, error = decode_item("image", data, image_transform(decode), decode)
    assert error is None and pixels is not None and pixels.dtype == np.float16
    vision = copy.deepcopy(model.vision_part()).to(dtype)  # a copy: `.to` would convert the shared model
    with torch.inference_mode():
        return vision(torch.from_numpy(pixels)[None, None].to(dtype))[0, 0]


def test_pixels_travel_as_uint8_at_a_quarter_of_float32(decode: DecodeConfig) -> None:
    rows = decoded([photo_like(0)], decode).to_pylist()
    size = decode.image_size
    assert rows[0]["pixels_dtype"] == "uint8" and rows[0]["pixels_shape"] == [1, 3, size, size]
    assert len(rows[0]["pixels"]) == 3 * size * size  # float16 was twice that, float32 four times


def test_a_float32_model_sees_the_same_image_within_float16_rounding(model: flamingo.Flamingo,
                                                                     decode: DecodeConfig) -> None:
    images = [photo_like(seed) for seed in range(3)]
    new = tokens_of(VisionEncoder(MODEL, device="cpu", dtype="float32")(decoded(images, decode)))
    for data, tokens in zip(images, new):
        old = old_path_tokens(model, data, decode, torch.float32)
        assert tokens.dtype is torch.float32
        # Tokens here reach about 3.3 in size; the float16 rounding of the old path's pixels moved them by at most
        # 7e-5 when this was written. A wrong mean, std or crop moves them by whole units.
        torch.testing.assert_close(tokens, old, rtol=0, atol=3e-4)
        assert not torch.equal(tokens, old)  # the float32 path no longer rounds the pixels through float16


def test_a_float16_model_sees_exactly_the_same_bits(model: flamingo.Flamingo, decode: DecodeConfig) -> None:
    images = [photo_like(seed) for seed in range(2)]
    new = tokens_of(VisionEncoder(MODEL, device="cpu", dtype="float16")(decoded(images, decode)))
    for data, tokens in zip(images, new):
        assert torch.equal(tokens, old_path_tokens(model, data, decode, torch.float16))


def test_a_demonstration_and_an_item_give_the_same_tokens(model: flamingo.Flamingo, decode: DecodeConfig,
                                                          tmp_path) -> None:
    (tmp_path / "demo.jpg").write_bytes(photo_like(7))
    (tmp_path / "task.yaml").write_text('name: t\ndemonstrations:\n  - {media: demo.jpg, text: " x"}\nquery: "Q:"\n')
    demos = load_demonstration_pixels(load_task(tmp_path / "task.yaml"), decode, {})
    assert demos.dtype is torch.float32 and demos.shape == (1, 1, 1, 3, decode.image_size, decode.image_size)
    with torch.inference_mode():
        demo_tokens = model.vision_part()(demos[0][:, None])[0, 0]
    [item_tokens] = tokens_of(VisionEncoder(MODEL, device="cpu", dtype="float32")(decoded([photo_like(7)], decode)))
    assert torch.equal(demo_tokens, item_tokens)


def test_pixels_of_another_encoding_are_an_error_row_not_a_guess(decode: DecodeConfig) -> None:
    batch = decoded([photo_like(0), photo_like(1)], decode)
    batch = batch.set_column(batch.schema.get_field_index("pixels_dtype"), "pixels_dtype",
                             pa.array(["float16", "uint8"], pa.string()))
    rows = VisionEncoder(MODEL, device="cpu", dtype="float32")(batch).to_pylist()
    assert rows[0]["error"] == "pixels of unknown encoding 'float16'; expected 'uint8'" and rows[0]["visual"] is None
    assert rows[1]["error"] is None and rows[1]["visual"] is not None
