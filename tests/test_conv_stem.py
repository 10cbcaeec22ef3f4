"""The convolutional stem a tower config may carry (flamingo/conv_stem.py)."""

from __future__ import annotations

import pytest
import torch

from flamingo.conv_stem import build_clip, conv_stem

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}


def test_a_stem_replaces_the_patch_projection_and_keeps_the_token_grid():
    plain = build_clip({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT})
    stem = build_clip({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT,
                       "conv_stem": [[8, 3, 1], [16, 3, 2], [32, 4, 4]]})
    assert isinstance(plain.visual.conv1, torch.nn.Conv2d)
    assert [type(m).__name__ for m in stem.visual.conv1] == ["Conv2d", "GELU", "Conv2d", "GELU", "Conv2d"]
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, stem):
        model.visual.output_tokens = True
        with torch.no_grad():
            pooled, tokens = model.visual(x)
        assert pooled.shape == (2, 16) and tokens.shape == (2, 16, 32)   # a 4 x 4 grid of width-32 tokens


@pytest.mark.parametrize("layers, problem", [
    ([[8, 3, 2], [32, 3, 2]], "multiply to the ViT's patch_size"),
    ([[8, 3, 2], [16, 3, 4]], "the ViT's width"),
    ([[8, 3]], "out_channels, kernel, stride"),
    ([], "out_channels, kernel, stride"),
    ([[8, 3, 2], [32, 2, 4]], "even kernel must equal its stride"),
])
def test_a_stem_that_does_not_fit_the_vit_is_refused(layers, problem):
    with pytest.raises(ValueError, match=problem):
        conv_stem(layers, width=32, patch_size=8)
