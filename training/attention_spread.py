"""Where the cross-attention looks when a question is answered: for each gated block, the attention of the
position after 'Answer:' over the image's visual tokens, on held-out scenes of 2-3 objects of different
shapes, asked 'What colour is the A?' and 'What colour is the B?' of the same image.

    python -m training.attention_spread miniature [--scenes 150] [--json out.json]

Per block (mean over heads and scenes):
  entropy          of the attention over the n visual tokens, in nats (uniform: log n; one token: 0);
  top weight       the largest attention weight;
  other question   total-variation distance between the attention for A and for B on the same image
                   (0: the block reads the same tokens whatever object is asked about; 1: disjoint ones);
  other image      the same distance between two images asked about the same shape.

A model that answers about the named object has to read different visual tokens for different questions, so
'other question' near 0 in every block means it cannot, whatever its tokens hold (docs/several-objects.md).
The first block sees only the token embedding of the last prompt token, the same for every question: its
'other question' is 0 by construction.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo import Flamingo, load_model
from flamingo.gated_cross_attention import MaskedCrossAttention
from training.sequences import image_transform
from training.synthetic import Scene, make_scene

SEED = (4242, 1)   # a seed sequence no training or evaluation draw uses


def two_shape_scenes(count: int, seed: Sequence[int] = SEED) -> list[tuple[Scene, str, str]]:
    """`count` (scene, shape A, shape B): scenes of 2-3 objects whose shapes all differ, and two of them."""
    rng = np.random.default_rng(seed)
    out: list[tuple[Scene, str, str]] = []
    while len(out) < count:
        scene = make_scene(rng, max_objects=3)
        shapes = [o.shape for o in scene.objects]
        if len(shapes) >= 2 and len(set(shapes)) == len(shapes):
            out.append((scene, shapes[0], shapes[1]))
    return out


@contextmanager
def _last_position_attention(model: Flamingo):
    """Collects, per gated block, the attention weights (B, heads, n) of each row's last text position."""
    captured: dict[int, torch.Tensor] = {}

    def hook(module: MaskedCrossAttention, args: tuple, kwargs: dict, _out: torch.Tensor) -> None:
        x, cond = args[0], args[1]
        k, _ = cond.kv_cache[kwargs["cache_key"]]
        q = module.queries(x[:, -1:])                                                # (B, h, 1, dh)
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)    # (B, h, 1, T*n)
        captured[id(module)] = weights[:, :, 0]

    blocks = [block.attn for block in model.gated_cross_attn_layers()]
    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield lambda: [captured[id(b)] for b in blocks]
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention(model: Flamingo, scenes: Sequence[Scene], shapes: Sequence[str]) -> list[torch.Tensor]:
    """Per gated block, (B, heads, n): the attention after 'What colour is the {shape}? Answer:', n the
    model's visual tokens per image. One prompt per call, so that the last position is never padding."""
    transform = image_transform(model)
    calls = []
    with _last_position_attention(model) as read:
        for scene, shape in zip(scenes, shapes):
            pixels = transform(Image.fromarray(scene.image()))[None, None, None].to(model.device, model.dtype)
            lang_x, mask = model.tokenize([f"{model.config.media_token}Question: What colour is the {shape}? Answer:"])
            model(vision_x=pixels, lang_x=lang_x, attention_mask=mask)
            calls.append(read())
    return [torch.cat(block).float() for block in zip(*calls)]


def spread(model: Flamingo, scenes: int = 150, seed: Sequence[int] = SEED) -> list[dict[str, float]]:
    """Per gated block: entropy, top weight, other-question and other-image distances (module docstring)."""
    model.eval()
    drawn = two_shape_scenes(scenes, seed)
    images = [s for s, _, _ in drawn]
    asked_a = attention(model, images, [a for _, a, _ in drawn])
    asked_b = attention(model, images, [b for _, _, b in drawn])
    other_image = attention(model, images[1:] + images[:1], [a for _, a, _ in drawn])
    rows = []
    for a, b, c in zip(asked_a, asked_b, other_image):
        rows.append({
            "entropy": float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean()),
            "uniform_entropy": math.log(a.shape[-1]),
            "top_weight": float(a.max(-1).values.mean()),
            "other_question": float(0.5 * (a - b).abs().sum(-1).mean()),
            "other_image": float(0.5 * (a - c).abs().sum(-1).mean()),
        })
    return rows


def table(rows: Sequence[dict[str, float]]) -> str:
    lines = [f"{'block':<6}{'entropy (nats)':>16}{'top weight':>12}{'other question':>16}{'other image':>13}"]
    for i, row in enumerate(rows):
        lines.append(f"{i:<6}{row['entropy']:>9.2f} / {row['uniform_entropy']:.2f}{row['top_weight']:>12.2f}"
                     f"{row['other_question']:>16.2f}{row['other_image']:>13.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder or preset name (e.g. miniature)")
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    rows = spread(load_model(args.model), args.scenes)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
