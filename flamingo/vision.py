"""The vision side on its own: frozen encoder + Perceiver Resampler, pixels in, visual tokens out.

`Flamingo` uses it for its media, and the pipeline's vision actors hold only this part (no LM), so a
GPU running the vision stage never holds the language model's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .resampler import PerceiverResampler


def encode_vision(vision_encoder: nn.Module, perceiver: PerceiverResampler, vision_x: torch.Tensor) -> torch.Tensor:
    """(B, T, F, C, H, W) pixels -> (B, T, num_latents, vis_dim) visual tokens. The encoder runs once per
    frame, under no_grad: it is frozen."""
    if vision_x.ndim != 6:
        raise ValueError(f"vision_x must be (batch, media, frames, channels, height, width), got {tuple(vision_x.shape)}")
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
