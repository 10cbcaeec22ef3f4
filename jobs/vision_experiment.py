"""One stage-1 experiment: train a vision tower with some settings changed, then probe what its features say
about single objects (training/probe_vision.py), on one torch thread:

    .venv/bin/python jobs/vision_experiment.py OUT [--set steps=500 --set warmup_steps=50 ...]
        [--open-clip pool_type=avg] [--untrained] [--position-table] [--conv-stem] [--patch-window 24]

- `--set NAME=VALUE`: a `VisionPretrainConfig` field (VALUE read as JSON when it parses, else as a string).
- `--open-clip NAME=VALUE`: an extra field of open_clip's vision config that is no config field here (to try
  one before it earns a knob).
- `--untrained`: probe the tower as built, without training (the control).
- `--position-table`: also probe the resampled tokens with a fixed 2D sine-cosine table added to the patch
  tokens before the resampler (a bridge-side idea: the resampler then sees each token's place).
- `--conv-stem`: two 3x3 convolutions (16 and 32 channels, GELU) before the patch projection, which then reads
  their 32 channels instead of the pixels. open_clip's configs cannot express it, so the tower folder written
  holds its weights but cannot be loaded by name; the probes run in this process.
- `--patch-window K`: overlapping patches: the patch projection reads a K x K window centred on each patch
  (stride and grid unchanged), so some token sees a whole small shape wherever it falls. Saved like
  `--conv-stem`.

Every run also probes the shape of small objects alone (`small_shape_probe`, as drawn): where the towers so
far fail.

Writes OUT/vision (the tower) and OUT/result.json (settings, training seconds, retrieval, the probe table) and
prints the table. The resampler probed is an *untrained* one (seed 0) of the miniature's bridge sizes: a stage-1
tower has none yet, and a random set operation over the tokens still shows whether their contents carry an
attribute. It is not the resampler stage 3 would train.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flamingo.resampler import PerceiverResampler  # noqa: E402  (after the path: run as a script from anywhere)
from training.miniature import BridgeSizes  # noqa: E402
from training.pretrain_vision import (  # noqa: E402
    VisionPretrainConfig,
    clip_config,
    pretrain_vision,
    retrieval_accuracy,
    save_vision,
)
from training.probe_vision import print_table, probe, small_shape_probe, small_shapes_line  # noqa: E402


class PositionTable(nn.Module):
    """A resampler that reads the patch tokens plus a fixed 2D sine-cosine table of their grid places."""

    def __init__(self, perceiver: nn.Module, dim: int, grid: int):
        super().__init__()
        from open_clip.pos_embed import get_2d_sincos_pos_embed

        self.perceiver = perceiver
        self.table: torch.Tensor
        self.register_buffer("table", torch.from_numpy(get_2d_sincos_pos_embed(dim, grid)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.perceiver(x + self.table)


def conv_stem(width: int, patch_size: int) -> nn.Module:
    """Early convolutions in place of the patchify projection (Xiao et al., 2021): local edge and corner
    features before the grid is cut, so that what a patch token says depends less on where a shape falls on it."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, padding=1), nn.GELU(),
                         nn.Conv2d(32, width, patch_size, stride=patch_size, bias=False))


def patch_window(width: int, patch_size: int, window: int) -> nn.Module:
    """A patch projection over overlapping `window` x `window` windows at the patch stride: the same grid of
    tokens, each seeing (window - patch_size) / 2 pixels into its neighbours on every side."""
    if window < patch_size or (window - patch_size) % 2:
        raise ValueError(f"--patch-window: patch_size ({patch_size}) plus an even number, got {window}")
    return nn.Conv2d(3, width, window, stride=patch_size, padding=(window - patch_size) // 2, bias=False)


def assignments(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--open-clip", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--untrained", action="store_true")
    parser.add_argument("--position-table", action="store_true")
    parser.add_argument("--conv-stem", action="store_true")
    parser.add_argument("--patch-window", type=int, default=0, metavar="K")
    args = parser.parse_args()
    if args.conv_stem and args.patch_window:
        parser.error("--conv-stem and --patch-window both replace the patch projection: give one")
    torch.set_num_threads(1)

    config = replace(VisionPretrainConfig(), **assignments(args.set))
    extra = assignments(args.open_clip)
    cfg = clip_config(config)
    cfg["vision_cfg"].update(extra)
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = open_clip.CLIP(**cfg)
        if args.conv_stem:
            model.visual.conv1 = conv_stem(config.width, config.patch_size)
        if args.patch_window:
            model.visual.conv1 = patch_window(config.width, config.patch_size, args.patch_window)
    start = time.perf_counter()
    if not args.untrained:
        model = pretrain_vision(config, log_every=max(1, config.steps // 5), model=model)
    train_s = time.perf_counter() - start
    model.eval()
    out = Path(args.out)
    save_vision(model, config, out / "vision")
    if extra:   # the tower's real open_clip arguments, so load_vision rebuilds it
        saved = json.loads((out / "vision" / "open_clip_config.json").read_text())
        (out / "vision" / "open_clip_config.json").write_text(json.dumps({**saved, "clip_config": cfg}, indent=2))

    sizes = BridgeSizes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        perceiver = PerceiverResampler(config.width, sizes.resampler_depth, sizes.resampler_dim_head,
                                       sizes.resampler_heads, sizes.num_latents, ff_mult=sizes.ff_mult).eval()
    start = time.perf_counter()
    result = probe(model.visual, perceiver, image_size=config.image_size)   # scenes drawn at the tower's size
    if args.position_table:
        table = PositionTable(perceiver, config.width, config.image_size // config.patch_size).eval()
        result["resampled+table"] = probe(model.visual, table, image_size=config.image_size)["resampled"]
    small = small_shape_probe(model.visual, config.image_size)
    probe_s = time.perf_counter() - start
    print_table(result)
    print(f"small objects' shape: {small_shapes_line(small)}")
    retrieval = retrieval_accuracy(model, config)
    print(f"training {train_s:.0f} s, probes {probe_s:.0f} s, retrieval {retrieval:.3f}")
    (out / "result.json").write_text(json.dumps(
        {"set": assignments(args.set), "open_clip": extra, "untrained": args.untrained, "conv_stem": args.conv_stem,
         "patch_window": args.patch_window,
         "train_seconds": train_s, "probe_seconds": probe_s, "retrieval": retrieval, "probe": result,
         "small_objects_shape": small}, indent=2) + "\n")


if __name__ == "__main__":
    main()
