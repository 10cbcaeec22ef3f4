"""uint8 pixels -> the model's input, on whatever device the pixels are on.

The decode stage sends pixels resized but not normalised, as uint8 (`media.decode.frames_to_uint8`): a
quarter of the bytes of float32 through Ray's object store and onto the accelerator. The vision actor
normalises them where the model runs. The arithmetic is open_clip's eval transform's own (torchvision's
ToTensor then Normalize: divide by 255, subtract the mean, divide by the std, in float32), so the values
are the ones that transform gives, bit for bit on the CPU; only then are they cast to the model's dtype.
Float32 rather than the model's dtype for the arithmetic itself: a float16 model then sees exactly what it
saw when the decode stage normalised on the CPU and sent float16, and a float32 model the unrounded values.
(Separate from `media.decode`, whose decoding child process must never import torch.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`pixels` (..., 3, H, W) uint8 as the model's input: `(pixels / 255 - mean) / std` per channel, in
    `dtype`, on `pixels`' device."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels to normalise must be uint8, not {pixels.dtype}")
    channel = (-1, 1, 1)
    mean_ = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(channel)
    std_ = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(channel)
    return pixels.to(torch.float32).div_(255).sub_(mean_).div_(std_).to(dtype)  # in place: one new tensor
