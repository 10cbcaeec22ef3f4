"""Vision stage: a Ray actor that runs the frozen vision encoder + Perceiver Resampler once per item.

Its output, the item's visual tokens, is what every task's generation needs, so several tasks share
one encoding. The actor loads the model in the job's dtype (`flamingo.dtypes`), and the tokens travel to the
generation actors in that same dtype, never upcast: float32 stays exact, float16 and bfloat16 cost half the
bytes. Arrow and numpy have no bfloat16, so bfloat16 tokens travel as the raw bytes of their 16-bit patterns
and the row says which dtype they are:

  visual        large_binary   the C-order bytes of the [n, D] tokens; null on error
  visual_shape  list<int32>    [n, D]
  visual_dtype  string         float32 / float16 / bfloat16

`visual_tensor` turns them back into a torch tensor. Rows that already carry an error pass through untouched.

Pixels arrive as uint8, resized but not normalised (`pixels_dtype` "uint8", pipeline/decode.py): they move to
the actor's device at a quarter of the bytes of float32, and are normalised there with the model's own mean
and std (`media.normalize`: open_clip's arithmetic in float32, then cast to the model's dtype). A row whose
pixels say another encoding gets an error rather than a guess.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from media.decode import PIXELS_ENCODING, pixels_array
from media.normalize import normalize

# torch dtype -> (name in `visual_dtype`, numpy dtype of the bytes on the wire)
_WIRE = {torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16),
         torch.bfloat16: ("bfloat16", np.int16)}
_BY_NAME = {name: (dtype, wire) for dtype, (name, wire) in _WIRE.items()}


def pick_device(device: str | None) -> str:
    """`device` if given, else CUDA when this actor was given a GPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def tokens_to_bytes(tokens: torch.Tensor) -> tuple[bytes, str]:
    """(bytes, dtype name) of one item's tokens, in their own dtype (bfloat16 as its 16-bit patterns)."""
    name, wire = _WIRE[tokens.dtype]
    tokens = tokens.detach().contiguous().cpu()
    if tokens.dtype == torch.bfloat16:
        tokens = tokens.view(torch.int16)
    return tokens.numpy().astype(wire, copy=False).tobytes(), name


def visual_tensor(visual: bytes, shape, dtype: str) -> torch.Tensor:
    """The tokens `tokens_to_bytes` sent, as a tensor of shape `shape` and dtype `dtype`."""
    if dtype not in _BY_NAME:
        raise ValueError(f"visual tokens of unknown dtype {dtype!r}")
    torch_dtype, wire = _BY_NAME[dtype]
    array = np.frombuffer(visual, dtype=wire).reshape(tuple(shape))
    return torch.from_numpy(array.copy()).view(torch_dtype)  # a copy: Arrow's buffers are read-only


class VisionEncoder:
    """Loaded once per actor; called on batches of decoded rows."""

    def __init__(self, model: str, device: str | None = None, trust_remote_code: bool = False,
                 dtype: str = "auto"):
        from flamingo import load_model
        from flamingo.dtypes import resolve_dtype

        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # Loaded on the CPU, then only the vision part moves to the device: the LM is dropped here.
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        # The model's own mean and std (its tower was trained with them): pixels arrive not yet normalised.
        self.mean, self.std = tuple(loaded.config.image_mean), tuple(loaded.config.image_std)
        self.vision = loaded.vision_part().to(self.device, self.dtype)

    def model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, F, 3, H, W) uint8 pixels -> the vision part's input (B, 1, F, 3, H, W), normalised on the device
        in the model's dtype. Only the uint8 bytes cross to the device."""
        return normalize(torch.from_numpy(pixels).to(self.device), self.mean, self.std, self.dtype)[:, None]

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column("pixels").to_pylist()
        shapes = batch.column("pixels_shape").to_pylist()
        errors = batch.column("error").to_pylist()
        encodings = batch.column("pixels_dtype").to_pylist()
        visual: list[bytes | None] = [None] * len(pixels)
        visual_shape: list[list[int] | None] = [None] * len(pixels)
        visual_dtype: list[str | None] = [None] * len(pixels)
        # Items with the same frame count are encoded together: images in one batch, clips in another.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (p, shape, error, encoding) in enumerate(zip(pixels, shapes, errors, encodings)):
            if error is None and p is not None:
                if encoding != PIXELS_ENCODING:
                    errors[i] = f"pixels of unknown encoding {encoding!r}; expected {PIXELS_ENCODING!r}"
                    continue
                groups.setdefault(tuple(shape), []).append(i)
        for shape, rows in groups.items():
            x = np.stack([pixels_array(pixels[i], shape) for i in rows])
            try:
                tokens = self.vision(self.model_input(x))[:, 0]        # (B, n, D)
            except Exception as exc:  # a bad batch must not take the job down: its items get error rows
                for i in rows:
                    errors[i] = f"vision encoder failed: {type(exc).__name__}: {exc}"
                continue
            for i, t in zip(rows, tokens.cpu()):
                (visual[i], visual_dtype[i]), visual_shape[i] = tokens_to_bytes(t), list(t.shape)
        out = batch.drop_columns(["pixels", "pixels_shape", "pixels_dtype"])
        out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        out = out.append_column(pa.field("visual", pa.large_binary()), pa.array(visual, pa.large_binary()))
        out = out.append_column(pa.field("visual_shape", pa.list_(pa.int32())),
                                pa.array(visual_shape, pa.list_(pa.int32())))
        return out.append_column(pa.field("visual_dtype", pa.string()), pa.array(visual_dtype, pa.string()))
