"""The vision side on its own: frozen encoder + Perceiver Resampler, pixels in, visual tokens out.

`Flamingo` uses it for its media, and the pipeline's vision actors hold only this part (no LM), so a
GPU running the vision stage never holds the language model's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .resampler import PerceiverResampler


def encode_vision(vision_encoder: nn.Module, perceiver: PerceiverResampler, vision_x: torch.Tensor) -> torch.Tensor:
    """(B, T, F, C, H, W) pixels -> (B, T, num_latents, vis_dim) visual tokens. The encoder runs once per
    frame, under no_grad: it is frozen."""
    if vision_x.ndim != 6:
        raise ValueError("vision_x must be (batch, media, frames, channels, height, width), "
                         f"got {tuple(vision_x.shape)}")
    b, t, f = vision_x.shape[:3]
    dtype = perceiver.latents.dtype
    with torch.no_grad():
        patches = vision_encoder(vision_x.flatten(0, 2).to(dtype))[1]     # (B*T*F, v, D) patch tokens
    return perceiver(patches.unflatten(0, (b, t, f)))                     # (B, T, n, D)


class FlamingoVision(nn.Module):
    """Encoder + resampler sharing their weights with the Flamingo model they came from."""

    def __init__(self, vision_encoder: nn.Module, perceiver: PerceiverResampler):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.perceiver = perceiver

    def forward(self, vision_x: torch.Tensor) -> torch.Tensor:
        return encode_vision(self.vision_encoder, self.perceiver, vision_x)


# Facts of an open_clip vision tower that size the bridges and the image processor.

def patch_token_width(visual: nn.Module) -> int:
    """Width of the patch tokens an open_clip vision tower returns (before its projection)."""
    width = getattr(getattr(visual, "transformer", None), "width", None)
    if isinstance(width, int):
        return width
    ln_post = getattr(visual, "ln_post", None)
    if ln_post is not None:
        return ln_post.normalized_shape[0]
    raise ValueError(f"cannot tell the patch-token width of {type(visual).__name__}; pass vis_dim=")


def tower_image_size(visual: Any) -> int:
    """The input size of an open_clip vision tower (an untyped attribute of open_clip's)."""
    size = visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def tower_normalisation(visual: nn.Module) -> dict[str, tuple[float, ...]]:
    """The pixel mean / std a tower states (open_clip sets them on towers it creates by name), as config
    fields; empty when it states none."""
    mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
    return {} if mean is None or std is None else {"image_mean": tuple(mean), "image_std": tuple(std)}
