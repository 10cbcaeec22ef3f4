"""Can a tower learn a small shape at all? Train it on the shape map alone (no captions) and score it.

    .venv/bin/python jobs/shape_map_ceiling.py {vit,stem,cnn} [--steps 400]

Each patch token is given, as a direct target, the shape drawn over its patch (`training.pretrain_vision.
object_map` with shape alone, the loss `ObjectMapHead.loss`), on the recipe's stage-1 scenes (one object,
sine-cosine position table). What is printed: on held-out scenes, the share of an object's patches whose
token names its shape, for small and large objects (chance 0.25 among the 4 shapes; a token may also say 'none').

- `vit`: open_clip's ViT as the recipe builds it (8 px patches, one linear projection per patch).
- `stem`: the same ViT with the convolutional stem `--stem` describes (`flamingo.conv_stem`).
- `cnn`: the stem's convolutions alone, no transformer: what convolutions learn by themselves.

This is the upper end of what stage 1 can give the patch tokens in its steps, without the contrastive loss
competing for them; it says whether the architecture can learn the attribute, not what the recipe's tower does.
One torch thread; plain AdamW at a constant rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flamingo.conv_stem import conv_stem  # noqa: E402  (after the path: run as a script from anywhere)
from training.pretrain_vision import (  # noqa: E402
    EVAL_STREAM,
    ObjectMapHead,
    VisionPretrainConfig,
    build_clip,
    object_map,
    pixels,
    sample_batch,
)

SHAPE_ONLY = ("shape",)
STEM = [[32, 3, 1], [64, 3, 1], [128, 3, 2], [128, 3, 2], [128, 3, 2], [128, 3, 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tower", choices=("vit", "stem", "cnn"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--stem", type=json.loads, default=STEM, help="JSON list of [out_channels, kernel, stride]")
    parser.add_argument("--scenes", type=int, default=640, help="held-out scenes scored")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = VisionPretrainConfig(pos_embed_type="sin_cos_2d", max_objects=1)
    if args.tower == "stem":
        config = replace(config, conv_stem=tuple(tuple(layer) for layer in args.stem))

    torch.manual_seed(config.seed)
    if args.tower == "cnn":
        cnn = conv_stem(args.stem, config.width, config.patch_size)
        def encode(x: torch.Tensor) -> torch.Tensor:
            return cnn(x).flatten(2).transpose(1, 2)                      # (B, patches, width)
        parameters = list(cnn.parameters())
    else:
        visual = build_clip(config).visual
        visual.output_tokens = True
        def encode(x: torch.Tensor) -> torch.Tensor:
            return visual(x)[1]                                             # (B, patches, width)
        parameters = list(visual.parameters())
    head = ObjectMapHead(config.width, SHAPE_ONLY)
    optimizer = torch.optim.AdamW(parameters + list(head.parameters()), lr=args.lr)

    start = time.perf_counter()
    for step in range(args.steps):
        batch = sample_batch(config, step)
        labels = object_map(batch.footprints, config.image_size, config.patch_size, SHAPE_ONLY)
        loss = head.loss(encode(pixels(batch.images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:>5}/{args.steps}  loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start

    right: dict[str, list[float]] = {"small": [], "large": []}
    with torch.no_grad():
        for index in range(args.scenes // config.batch_size):
            batch = sample_batch(config, index, stream=EVAL_STREAM)
            labels = object_map(batch.footprints, config.image_size, config.patch_size, SHAPE_ONLY)[..., 0]
            named = head(encode(pixels(batch.images)))[0].argmax(-1)
            for footprint, label, said in zip(batch.footprints, labels, named):
                if len(footprint) != 1:
                    continue                                  # a video frame with two objects: left out
                drawn = label > 0
                size = footprint[0].thing.size
                right[size] += (said[drawn] == label[drawn]).float().tolist()
    cells = ", ".join(f"{size} {sum(r) / len(r):.2f} (n = {len(r)} patches)" for size, r in right.items())
    print(f"{args.tower}, {args.steps} steps: object patches naming their shape: {cells}; training {seconds:.0f} s")


if __name__ == "__main__":
    main()
