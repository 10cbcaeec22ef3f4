"""Vision stage: a Ray actor that runs the frozen vision encoder + Perceiver Resampler once per item.

Its output, the item's visual tokens, is what every task's generation needs, so several tasks share
one encoding. Tokens travel as compact float16 bytes (`visual`, shape in `visual_shape`: [n, D]); rows
that already carry an error pass through untouched.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from media.decode import pixels_array

VISUAL_DTYPE = np.float16


def pick_device(device: str | None) -> str:
    """`device` if given, else CUDA when this actor was given a GPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def visual_array(visual: bytes, shape) -> np.ndarray:
    return np.frombuffer(visual, dtype=VISUAL_DTYPE).reshape(tuple(shape))


class VisionEncoder:
    """Loaded once per actor; called on batches of decoded rows."""

    def __init__(self, model: str, device: str | None = None, trust_remote_code: bool = False):
        from flamingo import load_model

        self.device = pick_device(device)
        # Loaded on the CPU, then only the vision part moves to the device: the LM is dropped here.
        self.vision = load_model(model, trust_remote_code=trust_remote_code).vision_part().to(self.device)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column("pixels").to_pylist()
        shapes = batch.column("pixels_shape").to_pylist()
        errors = batch.column("error").to_pylist()
        visual: list[bytes | None] = [None] * len(pixels)
        visual_shape: list[list[int] | None] = [None] * len(pixels)
        # Items with the same frame count are encoded together: images in one batch, clips in another.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (p, shape, error) in enumerate(zip(pixels, shapes, errors)):
            if error is None and p is not None:
                groups.setdefault(tuple(shape), []).append(i)
        for shape, rows in groups.items():
            x = torch.from_numpy(np.stack([pixels_array(pixels[i], shape) for i in rows]).astype(np.float32))
            try:
                tokens = self.vision(x[:, None].to(self.device))[:, 0]               # (B, n, D)
            except Exception as exc:  # a bad batch must not take the job down: its items get error rows
                for i in rows:
                    errors[i] = f"vision encoder failed: {type(exc).__name__}: {exc}"
                continue
            tokens = tokens.float().cpu().numpy().astype(VISUAL_DTYPE)
            for i, t in zip(rows, tokens):
                visual[i], visual_shape[i] = t.tobytes(), list(t.shape)
        out = batch.drop_columns(["pixels", "pixels_shape"])
        out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        out = out.append_column(pa.field("visual", pa.large_binary()), pa.array(visual, pa.large_binary()))
        return out.append_column(pa.field("visual_shape", pa.list_(pa.int32())),
                                 pa.array(visual_shape, pa.list_(pa.int32())))
