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
That row handling, apart from the model, is `pipeline.actor_rows.encode_rows`, which this actor calls with its
model.

Pixels arrive as uint8, resized but not normalised (`pixels_dtype` "uint8", pipeline/decode.py): they move to
the actor's device at a quarter of the bytes of float32, and are normalised there with the model's own mean
and std (`media.normalize`: open_clip's arithmetic in float32, then cast to the model's dtype). A row whose
pixels say another encoding gets an error rather than a guess.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from media.normalize import normalize
from pipeline.actor_rows import VisualTokens, encode_rows

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
        return encode_rows(batch, self.encode)

    def encode(self, pixels: np.ndarray) -> list[VisualTokens]:
        """(B, F, 3, H, W) uint8 pixels of items of one shape -> each item's tokens, in the model's dtype."""
        tokens = self.vision(self.model_input(pixels))[:, 0]        # (B, n, D)
        encoded = []
        for t in tokens.cpu():
            data, dtype = tokens_to_bytes(t)
            encoded.append(VisualTokens(data, list(t.shape), dtype))
        return encoded
