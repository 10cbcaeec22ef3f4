"""Linear probes of a vision tower: what its features say about single objects, before any bridge is trained.

A Flamingo can only name what its frozen tower encodes, so the tower is checked on its own first. Each probe is a
logistic regression (scikit-learn) from one kind of feature to one attribute of the only object in a scene,
fitted on `train` scenes and scored on `test` scenes of another seed stream:
  - pooled:      the tower's pooled output (what CLIP contrasts with the text),
  - mean-patch:  the mean of its patch tokens,
  - patch:       all patch tokens, concatenated (what the Perceiver Resampler reads),
  - resampled:   the Perceiver Resampler's visual tokens, concatenated (what the LM's cross-attention reads;
                 only for a Flamingo model, whose resampler is trained).
Attributes: shape (4 classes), position (3 x 3 grid cells), colour, size. Accuracy comes with its Wilson 95%
interval.

A linear probe of one object cannot say whether features keep which attribute goes with which object. With
`--objects`, an *attention probe* (one learned query per shape asked, one head, a linear readout: a one-layer
stand-in for the LM's cross-attention) answers 'what colour / size / cell is the <shape>?' from the patch
tokens and from the resampler's tokens, in scenes of 2-3 objects of different shapes.

    python -m training.probe_vision out/miniature/vision          # a stage-1 tower folder
    python -m training.probe_vision miniature                      # the tower of a Flamingo model
    python -m training.probe_vision miniature --untrained          # its architecture, freshly initialised
    python -m training.probe_vision out/miniature/vision --small-shapes drawn,1.7,0   # small objects' shape,
                                                                   # by how far they sit from their cell's centre
    python -m training.probe_vision miniature --objects                           # 2-3 objects: attribute of
                                                                   # the object a shape names
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from training.evaluate import eval_seed, wilson_interval
from training.pretrain_vision import pixels
from training.synthetic import GRID, SHAPES, Scene, make_scene

ATTRIBUTES = ("shape", "position", "colour", "size")
OBJECT_ATTRIBUTES = ("colour", "size", "position")   # asked of the object a shape names (--objects)
# Inverse L2 strength per feature: the concatenated tokens have thousands of dimensions for a few thousand
# scenes, and without a strong penalty would overfit and take minutes to fit.
REGULARISATION = {"pooled": 1.0, "mean-patch": 1.0, "patch": 0.05, "resampled": 0.05, "pixels": 0.05}
# Probe scenes are evaluation draws (training.evaluate.eval_seed), under a part number evaluate's own draws
# (0-4) do not use; the probe's training and test scenes are two splits of it.
_PROBES = 100
TRAIN_SPLIT, TEST_SPLIT = 0, 1
_OBJECT_PROBES = 102


def single_object_scenes(count: int, split: int, image_size: int = 64) -> list[Scene]:
    return [make_scene(eval_seed(0, _PROBES, split, i), image_size=image_size, max_objects=1) for i in range(count)]


def labels(scenes: Sequence[Scene], attribute: str) -> np.ndarray:
    return np.array([getattr(s.objects[0], attribute) for s in scenes])


@torch.no_grad()
def encode(visual: nn.Module, scenes: Sequence[Scene], perceiver: nn.Module | None = None,
           batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The scenes' pooled output (N, D'), patch tokens (N, v, D) and, with a `perceiver`, its visual tokens
    (N, n, D), as float32."""
    visual.eval()
    saved = getattr(visual, "output_tokens", None)
    visual.output_tokens = True  # type: ignore[assignment]  # open_clip: (pooled, patch tokens)
    out: dict[str, list[torch.Tensor]] = {"pooled": [], "patch": [], "resampled": []}
    try:
        for start in range(0, len(scenes), batch_size):
            x = pixels([s.image() for s in scenes[start:start + batch_size]])
            pooled, tokens = visual(x.to(next(visual.parameters()).dtype))   # (B, D'), (B, v, D)
            out["pooled"].append(pooled.float())
            out["patch"].append(tokens.float())
            if perceiver is not None:                                        # (B, 1, 1, v, D) -> (B, 1, n, D)
                out["resampled"].append(perceiver(tokens[:, None, None])[:, 0].float())
    finally:
        visual.output_tokens = saved  # type: ignore[assignment]
    return {name: torch.cat(parts) for name, parts in out.items() if parts}


def features(visual: nn.Module, scenes: Sequence[Scene], perceiver: nn.Module | None = None) -> dict[str, np.ndarray]:
    """pooled, mean-patch, patch and (only with a `perceiver`) resampled features, (N, dim) each."""
    encoded = encode(visual, scenes, perceiver)
    out = {"pooled": encoded["pooled"], "mean-patch": encoded["patch"].mean(1), "patch": encoded["patch"].flatten(1)}
    if "resampled" in encoded:
        out["resampled"] = encoded["resampled"].flatten(1)
    return {name: x.numpy() for name, x in out.items()}


def probe(visual: nn.Module, perceiver: nn.Module | None = None, train: int = 2000, test: int = 500,
          image_size: int = 64) -> dict[str, Any]:
    """{feature: {attribute: {accuracy, ci95, n}}} on `test` held-out single-object scenes."""
    train_scenes = single_object_scenes(train, TRAIN_SPLIT, image_size)
    test_scenes = single_object_scenes(test, TEST_SPLIT, image_size)
    train_x, test_x = features(visual, train_scenes, perceiver), features(visual, test_scenes, perceiver)
    return {name: {attribute: _score(name, train_x[name], labels(train_scenes, attribute),
                                     test_x[name], labels(test_scenes, attribute)) for attribute in ATTRIBUTES}
            for name in train_x}


def small_shape_probe(visual: nn.Module, image_size: int = 64, max_offset: float | None = None, train: int = 2000,
                      test: int = 500) -> dict[str, Any]:
    """{feature: {accuracy, ci95, n}} for the shape of *small* lone objects, by a probe fitted on small ones only,
    from the patch tokens, their mean, and the raw pixels (the control: what needs no tower at all).

    A tower can read large objects' shape and not small ones' (docs/vision-tower.md). Besides size, the two
    differ in how far the object's centre wanders inside its grid cell, and so against the patch grid: a large
    object fills its cell (at most 1.7 px from the centre at 64 px), a small one moves up to 5.5 px.
    `max_offset` (pixels, per axis) moves each small object's centre to within that distance of its cell's
    centre, to tell the two causes apart; None keeps the scenes as drawn."""
    def small(count: int, split: int) -> list[Scene]:
        scenes = [s for s in single_object_scenes(4 * count, split, image_size) if s.objects[0].size == "small"]
        scenes = scenes[:count]
        return scenes if max_offset is None else [recentred(s, max_offset) for s in scenes]

    train_scenes, test_scenes = small(train, TRAIN_SPLIT), small(test, TEST_SPLIT)
    train_x, test_x = features(visual, train_scenes), features(visual, test_scenes)
    for x, scenes in ((train_x, train_scenes), (test_x, test_scenes)):
        x["pixels"] = pixels([s.image() for s in scenes]).flatten(1).numpy()
    return {name: _score(name, train_x[name], labels(train_scenes, "shape"), test_x[name],
                         labels(test_scenes, "shape")) for name in ("patch", "mean-patch", "pixels")}


def object_scenes(count: int, split: int, image_size: int = 64) -> list[tuple[Scene, int]]:
    """`count` (scene, index of the object asked about): scenes of 2-3 objects whose shapes all differ, so
    that a shape names one object."""
    out: list[tuple[Scene, int]] = []
    draw = 0
    while len(out) < count:
        rng = np.random.default_rng(eval_seed(0, _OBJECT_PROBES, split, draw))
        draw += 1
        scene = make_scene(rng, image_size=image_size, max_objects=3)
        shapes = [o.shape for o in scene.objects]
        if len(shapes) >= 2 and len(set(shapes)) == len(shapes):
            out.append((scene, int(rng.integers(len(shapes)))))
    return out


class AttentionProbe(nn.Module):
    """'What <attribute> is the <shape>?' over a set of tokens: a learned query per shape, one attention head,
    a linear readout, the least that can pick one object out of a set."""

    def __init__(self, width: int, classes: int, dim: int = 64):
        super().__init__()
        self.query = nn.Embedding(len(SHAPES), dim)
        self.key, self.value = nn.Linear(width, dim), nn.Linear(width, dim)
        self.readout = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """(N, L, width) tokens, (N,) shape indices -> (N, classes) logits."""
        weights = torch.einsum("nd,nld->nl", self.query(shape), self.key(tokens))
        weights = (weights / self.key.out_features ** 0.5).softmax(-1)
        return self.readout(torch.einsum("nl,nld->nd", weights, self.value(tokens)))


def fit_attention_probe(tokens: torch.Tensor, shape: torch.Tensor, target: torch.Tensor, classes: int,
                        steps: int, batch_size: int = 128) -> AttentionProbe:
    """An `AttentionProbe` fitted by Adam on (tokens, shape asked) -> target class; seeded, the caller's RNG kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AttentionProbe(tokens.shape[-1], classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            batch = torch.randint(len(tokens), (batch_size,))
            loss = nn.functional.cross_entropy(model(tokens[batch], shape[batch]), target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def object_probe(visual: nn.Module, perceiver: nn.Module | None = None, train: int = 4000, test: int = 1000,
                 image_size: int = 64, steps: int = 1500) -> dict[str, Any]:
    """{feature: {attribute: {accuracy, ci95, n}}}: an `AttentionProbe` per feature (patch tokens; the
    resampler's tokens with a `perceiver`) and attribute of OBJECT_ATTRIBUTES, trained with Adam (seed 0) on
    `train` scenes of `object_scenes` and scored on `test` others. The patch tokens are the ceiling: what the
    resampler's tokens lose against them, it lost in pooling."""
    splits = {split: object_scenes(count, split, image_size) for split, count in ((TRAIN_SPLIT, train),
                                                                                  (TEST_SPLIT, test))}
    tokens = {split: encode(visual, [scene for scene, _ in asked], perceiver) for split, asked in splits.items()}
    shapes = {split: torch.tensor([SHAPES.index(s.objects[i].shape) for s, i in asked])
              for split, asked in splits.items()}
    result: dict[str, Any] = {}
    for feature in ("patch", "resampled"):
        if feature not in tokens[TRAIN_SPLIT]:
            continue
        result[feature] = {}
        for attribute in OBJECT_ATTRIBUTES:
            values = sorted({str(getattr(s.objects[i], attribute)) for asked in splits.values() for s, i in asked})
            target = {split: torch.tensor([values.index(str(getattr(s.objects[i], attribute))) for s, i in asked])
                      for split, asked in splits.items()}
            model = fit_attention_probe(tokens[TRAIN_SPLIT][feature], shapes[TRAIN_SPLIT], target[TRAIN_SPLIT],
                                        len(values), steps)
            with torch.no_grad():
                predicted = model(tokens[TEST_SPLIT][feature], shapes[TEST_SPLIT]).argmax(-1)
            correct = int((predicted == target[TEST_SPLIT]).sum())
            result[feature][attribute] = {"accuracy": correct / test, "ci95": wilson_interval(correct, test), "n": test}
    return result


def recentred(scene: Scene, max_offset: float) -> Scene:
    """`scene` with every object's centre moved to within `max_offset` pixels (per axis) of its cell's centre."""
    cell = scene.image_size / GRID

    def pull(value: float, index: int) -> float:
        centre = (index + 0.5) * cell
        return round(centre + float(np.clip(value - centre, -max_offset, max_offset)), 2)

    return replace(scene, objects=tuple(replace(o, x=pull(o.x, o.col), y=pull(o.y, o.row)) for o in scene.objects))


def _score(feature: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
           test_y: np.ndarray) -> dict[str, Any]:
    """Accuracy (with its Wilson 95% interval) of a logistic regression fitted on the training split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", category=ConvergenceWarning)   # max_iter bounds the time on purpose
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=REGULARISATION[feature]))
    correct = int((clf.fit(train_x, train_y).predict(test_x) == test_y).sum())
    return {"accuracy": correct / len(test_y), "ci95": wilson_interval(correct, len(test_y)), "n": len(test_y)}


def load_tower(source: str, untrained: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """(tower, resampler) of a stage-1 folder (training.pretrain_vision.save_vision; no resampler) or of any
    model `flamingo.load_model` takes. `untrained`: the same tower architecture with fresh weights (seed 0) and
    no resampler, the control that says what training added or took away."""
    from pathlib import Path

    from training.pretrain_vision import CONFIG_FILE, load_vision

    clip_config: dict[str, Any] | None
    if (Path(source) / CONFIG_FILE).exists():
        tower, clip_config = load_vision(source)
        visual, perceiver = tower.visual, None
    else:
        import flamingo

        model = flamingo.load_model(source)
        visual, perceiver, clip_config = model.vision_encoder, model.perceiver, model.config.vision_encoder_config
    if not untrained:
        return visual, perceiver
    if clip_config is None:
        raise ValueError(f"{source}: --untrained needs a tower built from an open_clip config (a custom tower)")
    from flamingo.conv_stem import build_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_clip(clip_config).visual, None


def print_table(result: dict[str, Any], attributes: Sequence[str] = ATTRIBUTES) -> None:
    print(f"{'features':<12}" + "".join(f"{a:>22}" for a in attributes))
    for name, row in result.items():
        print(f"{name:<12}" + "".join(f"{accuracy_cell(r):>22}" for r in row.values()))


def accuracy_cell(r: dict[str, Any]) -> str:
    """'0.59 [0.55, 0.63]': an accuracy and its 95% interval."""
    return f"{r['accuracy']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def small_shapes_line(row: dict[str, Any]) -> str:
    """One `small_shape_probe` result on a line: each feature's accuracy and interval."""
    return ", ".join(f"{name} {accuracy_cell(r)}" for name, r in row.items())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tower", help="a stage-1 tower folder or a Flamingo model name / folder")
    parser.add_argument("--train", type=int, help="scenes to fit on (default: the probe's own, 2000; --objects 4000)")
    parser.add_argument("--test", type=int, help="scenes to score on (default: the probe's own, 500; --objects 1000)")
    parser.add_argument("--untrained", action="store_true",
                        help="probe the same tower architecture with fresh weights instead (the control)")
    parser.add_argument("--image-size", type=int, default=64, help="the world's size (the tower's input size)")
    parser.add_argument("--small-shapes", metavar="OFFSETS",
                        help="instead: shape of small objects only, once per comma-separated max_offset in pixels "
                             "('drawn': as drawn), e.g. drawn,1.7,0 (small_shape_probe)")
    parser.add_argument("--objects", action="store_true",
                        help="instead: in scenes of 2-3 objects, the colour, size and cell of the object a shape "
                             "names, by an attention probe (object_probe; --train/--test default 4000/1000)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    visual, perceiver = load_tower(args.tower, args.untrained)
    sizes = {name: getattr(args, name) for name in ("train", "test") if getattr(args, name) is not None}
    if args.small_shapes:
        result = {offset: small_shape_probe(visual, args.image_size, None if offset == "drawn" else float(offset),
                                            **sizes) for offset in args.small_shapes.split(",")}
        for offset, row in result.items():
            print(f"small objects' shape, centre within {offset} px: {small_shapes_line(row)}")
    elif args.objects:
        result = object_probe(visual, perceiver, image_size=args.image_size, **sizes)
        print_table(result, OBJECT_ATTRIBUTES)
    else:
        result = probe(visual, perceiver, image_size=args.image_size, **sizes)
        print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
