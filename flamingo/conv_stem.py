"""A convolutional stem for open_clip's ViT, as data in the tower's config.

open_clip's ViT cuts the image into patches with one linear projection, so a patch token starts from a
fragment of whatever shape crosses its patch, and the transformer must learn to join fragments wherever they
fall. At the miniature's scale it does not: given each patch's shape as a direct training target, a 4-layer ViT
named the shape under an object's patches 0.31-0.34 of the time after 400 steps (chance 0.25), where six
convolutions reached 1.00 on the same data (`jobs/shape_map_ceiling.py`, docs/vision-tower.md). Early
convolutions (Xiao et al., 2021, "Early convolutions help transformers see better") give the tokens local edges
and corners first.

A tower config (the keyword arguments of `open_clip.CLIP`) may carry one extra key, `conv_stem`: a list of
`[out_channels, kernel, stride]`, one per convolution, GELU between them, that replaces the ViT's patch
projection (`visual.conv1`). The strides multiply to the ViT's `patch_size` and the last layer's channels are its
`width`, so the token grid, the position table and everything after the stem are open_clip's own. Without the
key, `build_clip` is `open_clip.CLIP(**config)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import open_clip
from torch import nn

STEM_KEY = "conv_stem"


def conv_stem(layers: Sequence[Sequence[int]], width: int, patch_size: int) -> nn.Sequential:
    """The convolutions `layers` describes (lists from JSON or tuples from a config), checked against the ViT
    they feed: (B, 3, H, W) pixels -> (B, width, H / patch_size, W / patch_size), as the patch projection it
    replaces."""
    layers = [list(layer) for layer in layers]
    if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
        raise ValueError(f"{STEM_KEY}: a list of [out_channels, kernel, stride], each at least 1, got {layers!r}")
    if layers[-1][0] != width:
        raise ValueError(f"{STEM_KEY}: the last layer must give the ViT's width ({width}) channels, "
                         f"got {layers[-1][0]}")
    if math.prod(stride for _, _, stride in layers) != patch_size:
        raise ValueError(f"{STEM_KEY}: strides must multiply to the ViT's patch_size ({patch_size}), "
                         f"got {[stride for _, _, stride in layers]}")
    modules: list[nn.Module] = []
    channels = 3
    for i, (out_channels, kernel, stride) in enumerate(layers):
        # An odd kernel is padded to keep the grid (then strided); an even one tiles it, as a patch projection.
        padding = kernel // 2 if kernel % 2 else 0
        if not kernel % 2 and kernel != stride:
            raise ValueError(f"{STEM_KEY}: an even kernel must equal its stride (a patch projection), "
                             f"got kernel {kernel}, stride {stride}")
        conv = nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding)
        # He initialisation keeps the activations' scale through the stack. PyTorch's default shrinks it about
        # threefold per layer: after six layers the stem's output was 1/28 of the fixed position table's, which
        # then drowned what the pixels said, and the tower learned shape no faster than without a stem.
        last = i == len(layers) - 1
        nn.init.kaiming_normal_(conv.weight, nonlinearity="linear" if last else "relu")
        nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # built with a bias
        modules += [conv] if last else [conv, nn.GELU()]   # the tokens stay linear in the last layer, as before
        channels = out_channels
    return nn.Sequential(*modules)


def build_clip(config: dict[str, Any]) -> open_clip.CLIP:
    """`open_clip.CLIP(**config)`, with the ViT's patch projection replaced when `config` has a `conv_stem`."""
    config = dict(config)
    layers = config.pop(STEM_KEY, None)
    model = open_clip.CLIP(**config)
    if layers:
        vision = config["vision_cfg"]
        model.visual.conv1 = conv_stem(layers, vision["width"], vision["patch_size"])
    return model
