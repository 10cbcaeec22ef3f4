"""Perceiver Resampler: a fixed number of learned latents cross-attend to any number of visual features,
so every image or clip becomes the same small set of visual tokens (Flamingo, section 2.1).

Parameter names follow OpenFlamingo's so its checkpoints load key for key.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm MLP used by the resampler and the gated blocks (OpenFlamingo's `FeedForward`)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to [visual features; latents] (the paper concatenates the latents to the keys)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (B, T, v, D) visual features; latents: (B, T, n, D)
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)                                            # (B, T, n, h*dh)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, -1)   # (B, T, v+n, h*dh)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-3, -2) for t in (q, k, v))  # (B, T, h, *, dh)
        out = F.scaled_dot_product_attention(q, k, v)                     # (B, T, h, n, dh)
        return self.to_out(out.transpose(-3, -2).flatten(-2))             # (B, T, n, D)


class PerceiverResampler(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        max_num_frames: int | None = 8,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # Time embeddings for video frames. Zero at init: a single image (frame 0) is then resampled exactly
        # as OpenFlamingo does, and its checkpoints (which have no frame embeddings) load unchanged.
        self.frame_embs = nn.Parameter(torch.zeros(max_num_frames, dim)) if max_num_frames else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, F, v, D) patch features of T media with F frames each -> (B, T, num_latents, D)."""
        b, t, f, v, d = x.shape
        if self.frame_embs is not None:
            if f > self.frame_embs.shape[0]:
                raise ValueError(f"{f} frames per clip, but the resampler has time embeddings for "
                                 f"{self.frame_embs.shape[0]} (max_num_frames)")
            x = x + self.frame_embs[:f, None, :]                          # broadcast over B, T, v
        x = x.reshape(b, t, f * v, d)                                     # frames and patches are one set
        latents = self.latents.expand(b, t, -1, -1)
        for layer in self.layers:
            attn, ff = cast(nn.ModuleList, layer)                          # [PerceiverAttention, feed_forward]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
