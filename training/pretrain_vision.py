"""Stage 1 of Flamingo's recipe: contrastive pretraining of the vision tower on (image, caption) pairs.

No pretrained CLIP can be downloaded here, so a small open_clip tower learns the synthetic world from
scratch, with open_clip's own model (`open_clip.CLIP`), loss (`ClipLoss`) and tokenizer (`SimpleTokenizer`,
whose BPE vocabulary ships inside the package, so it works offline). Only `model.visual` is kept by
Flamingo later; the text tower exists to give the images something to be contrasted with.

Pixels are normalised with `FlamingoConfig`'s default mean / std, which is what `Flamingo.from_backbones`
records for a tower that carries none, so stage 3 feeds the encoder exactly what it was trained on.
Every batch is a pure function of (seed, stream, index): training uses stream 0, evaluation stream 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from flamingo.config import FlamingoConfig
from flamingo.conv_stem import STEM_KEY, conv_stem
from flamingo.conv_stem import build_clip as build_open_clip
from training.optim import adamw_warmup_cosine, check_optimisation, clip_gradients
from training.synthetic import (
    COLOURS,
    GRID,
    SHAPES,
    SIZES,
    VARIANT_ATTRIBUTES,
    Thing,
    drawn_mask,
    make_clip,
    make_scene,
    position_name,
    scene_variant,
)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STREAM, EVAL_STREAM = 0, 1
POS_EMBED_TYPES = ("learnable", "sin_cos_2d")   # open_clip's names
# What the object map can name for each patch an object covers: the values of each attribute, in label order
# (label 0 is 'no object here'); a position is the grid cell of the object's centre, row-major.
MAP_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
    "position": tuple(position_name(row, col) for row in range(GRID) for col in range(GRID)),
}


@dataclass(frozen=True)
class VisionPretrainConfig:
    """A contrastive run: tower sizes, data and optimisation (defaults: the stage-1 miniature)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    clip_fraction: float = 0.25           # pairs drawn from a video frame instead of a still scene
    # Scenes come in groups of a scene and variants of it that differ in one attribute of one object
    # (`scene_variant`). Without these hard negatives, colour and count alone tell a batch's random
    # captions apart, and the tower barely learns shape or position (a linear probe found shape at 0.47,
    # chance 0.25). 1: independent scenes only.
    group_size: int = 4
    # What a variant may change, drawn uniformly (a name given twice is drawn twice as often): shape is
    # the attribute towers read worst (docs/vision-tower.md), and weighting it makes more of the hard
    # negatives differ only in shape.
    variant_attributes: tuple[str, ...] = VARIANT_ATTRIBUTES
    embed_dim: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    head_width: int = 32
    # The ViT's position embedding: "learnable" (open_clip's default, the bundled tower's) or "sin_cos_2d", a
    # fixed 2D sine-cosine table. Contrastive training erases position from the patch tokens' contents (the
    # mean patch token told the 3x3 cell of a lone object 0.98 of the time untrained, 0.58 after 500 steps);
    # the fixed table cannot be unlearned and kept it at 0.88 (docs/vision-tower.md). The Perceiver
    # Resampler is a set operation: it sees position only through what the tokens contain.
    pos_embed_type: str = "learnable"
    # Weight of a dense auxiliary loss beside the contrastive one, the object map: linear heads read each patch
    # token (what the Perceiver Resampler reads) and name each of `object_map_attributes` of the object over
    # that patch, or none. The caption alone left a small shape unread wherever it fell against the patch grid
    # (linear probes 0.58-0.65 from every tower tried, docs/vision-tower.md); the heads are dropped after
    # training. 0: contrastive only.
    object_map_weight: float = 0.0
    # A map of shape alone taught the tokens to say 'circle' alike wherever and however large the circle was,
    # and the bridges trained on that tower lost position and size (docs/vision-tower.md); naming every
    # attribute keeps each of them in what a token says.
    object_map_attributes: tuple[str, ...] = tuple(MAP_VALUES)
    # Convolutions in place of the ViT's patch projection, [out_channels, kernel, stride] each
    # (`flamingo.conv_stem`); empty: open_clip's linear patch projection.
    conv_stem: tuple[tuple[int, int, int], ...] = ()
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 48              # a 3-object caption is ~30 BPE tokens

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "group_size", "embed_dim", "patch_size", "width", "layers", "head_width",
                     "text_width", "text_layers", "text_heads", "context_length", "max_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: contrastive learning needs at least 2 pairs, got {self.batch_size}")
        check_optimisation(self)
        if not 0 <= self.clip_fraction <= 1:
            raise ValueError(f"clip_fraction: must be in [0, 1], got {self.clip_fraction}")
        unknown = set(self.variant_attributes) - set(VARIANT_ATTRIBUTES)
        if unknown or not self.variant_attributes:
            raise ValueError(f"variant_attributes: one or more of {VARIANT_ATTRIBUTES}, "
                             f"got {self.variant_attributes!r}")
        if self.conv_stem:    # refused here, before any training, if it does not fit the ViT
            conv_stem(self.conv_stem, self.width, self.patch_size)
        if self.object_map_weight < 0:
            raise ValueError(f"object_map_weight: must be at least 0, got {self.object_map_weight}")
        unknown = set(self.object_map_attributes) - set(MAP_VALUES)
        if unknown or not self.object_map_attributes or len(set(self.object_map_attributes)) < len(
                self.object_map_attributes):
            raise ValueError(f"object_map_attributes: distinct names among {tuple(MAP_VALUES)}, "
                             f"got {self.object_map_attributes!r}")
        if self.pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed_type: one of {POS_EMBED_TYPES}, got {self.pos_embed_type!r}")
        if self.image_size % self.patch_size or self.width % self.head_width:
            raise ValueError("image_size must be a multiple of patch_size, and width of head_width")


def clip_config(config: VisionPretrainConfig) -> dict[str, Any]:
    """Keyword arguments of `open_clip.CLIP(...)`, plus a `conv_stem` when set (`flamingo.conv_stem`): what
    `save_vision` writes as JSON and what a Flamingo built from this tower stores as `vision_encoder_config`.
    Defaults (position embedding, stem) are left out, so a default tower's config stays the one the bundled
    model records."""
    vision_cfg: dict[str, Any] = {"image_size": config.image_size, "patch_size": config.patch_size,
                                  "width": config.width, "layers": config.layers, "head_width": config.head_width}
    if config.pos_embed_type != "learnable":
        vision_cfg["pos_embed_type"] = config.pos_embed_type
    kwargs: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": config.context_length, "vocab_size": SimpleTokenizer().vocab_size,
                     "width": config.text_width, "heads": config.text_heads, "layers": config.text_layers},
    }
    if config.conv_stem:
        kwargs[STEM_KEY] = [list(layer) for layer in config.conv_stem]
    return kwargs


def build_clip(config: VisionPretrainConfig) -> open_clip.CLIP:
    """A randomly initialised tower, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_open_clip(clip_config(config))


# --- data ----------------------------------------------------------------------------------------


def visible_caption(objects) -> str:
    """What one frame of a clip shows ('a small red circle and a large blue square.'): direction and
    speed are not visible in a still, so they are left out of its caption."""
    return " and ".join(f"a {o.description}" for o in objects) + "."


class Footprint(NamedTuple):
    """One object as the object map draws it: centre x, y and radius in pixels (as `_place` sets them), and
    what it is."""

    x: float
    y: float
    radius: float
    thing: Thing


@dataclass(frozen=True)
class Pairs:
    """A batch of (image, caption) pairs and, per image, where each object lies (for the object map)."""

    images: list[np.ndarray]
    captions: list[str]
    footprints: list[tuple[Footprint, ...]]


def sample_batch(config: VisionPretrainConfig, index: int, stream: int = TRAIN_STREAM,
                 count: int | None = None) -> Pairs:
    """`count` (default batch_size) pairs: a pure function of (seed, stream, index)."""
    rng = np.random.default_rng((config.seed, stream, index))
    batch = Pairs([], [], [])
    count = count or config.batch_size
    while len(batch.images) < count:
        if rng.random() < config.clip_fraction:
            clip = make_clip(rng, image_size=config.image_size)
            frame = int(rng.integers(clip.num_frames))
            batch.images.append(clip.frames()[frame])
            batch.captions.append(visible_caption(clip.objects))
            batch.footprints.append(tuple(Footprint(*o.centre(frame), o.radius, o) for o in clip.objects))
            continue
        scene = make_scene(rng, image_size=config.image_size, max_objects=config.max_objects)
        variants = min(config.group_size, count - len(batch.images)) - 1
        group = [scene] + [scene_variant(rng, scene, config.variant_attributes) for _ in range(variants)]
        batch.images.extend(s.image() for s in group)
        batch.captions.extend(s.caption() for s in group)
        batch.footprints.extend(tuple(Footprint(o.x, o.y, o.radius, o) for o in s.objects) for s in group)
    return batch


def sample_pairs(config: VisionPretrainConfig, index: int, stream: int = TRAIN_STREAM,
                 count: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """`count` (default batch_size) (image, caption) pairs: a pure function of (seed, stream, index)."""
    batch = sample_batch(config, index, stream, count)
    return batch.images, batch.captions


def object_map(footprints: list[tuple[Footprint, ...]], image_size: int, patch_size: int,
               attributes: tuple[str, ...] = tuple(MAP_VALUES)) -> torch.Tensor:
    """(N, patches, len(attributes)) labels, in the tower's row-major patch order: 0 where no object is
    drawn, else 1 + the index in MAP_VALUES[attribute] of that attribute of the object with the most pixels
    in the patch."""
    grid = image_size // patch_size
    labels = np.zeros((len(footprints), grid * grid, len(attributes)), dtype=np.int64)
    for n, objects in enumerate(footprints):
        most = np.zeros(grid * grid)
        for x, y, radius, thing in objects:
            mask = drawn_mask(thing.shape, x, y, radius, image_size)
            pixels_in = mask.reshape(grid, patch_size, grid, patch_size).sum(axis=(1, 3)).reshape(-1)
            mine = pixels_in > most
            row, col = (min(int(v * GRID / image_size), GRID - 1) for v in (y, x))   # a clip's object moves
            values = {"shape": thing.shape, "colour": thing.colour, "size": thing.size,
                      "position": position_name(row, col)}
            labels[n][mine] = [1 + MAP_VALUES[a].index(values[a]) for a in attributes]
            most[mine] = pixels_in[mine]
    return torch.from_numpy(labels)


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, H, W) floats, normalised as Flamingo's image processor does for this tower."""
    defaults = FlamingoConfig()
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(defaults.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(defaults.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


# --- training and evaluation ---------------------------------------------------------------------


class ObjectMapHead(nn.Module):
    """Names, for each patch token, each attribute of the object under it, or none (`object_map`): trained
    beside the tower in stage 1 when `object_map_weight` > 0, and dropped after it."""

    def __init__(self, width: int, attributes: tuple[str, ...] = tuple(MAP_VALUES)):
        super().__init__()
        self.linear = nn.ModuleList(nn.Linear(width, 1 + len(MAP_VALUES[a])) for a in attributes)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(N, patches, width) -> per attribute, (N, patches, 1 + values) logits."""
        return [linear(tokens) for linear in self.linear]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, patches, width) patch tokens, (N, patches, attributes) labels -> the mean over attributes of a
        cross-entropy that is the mean over object patches plus the mean over empty ones: most patches are
        empty, and an unweighted mean mostly teaches 'empty'."""
        drawn = labels[..., 0].flatten() > 0
        total = torch.zeros(())
        for logits, target in zip(self(tokens), labels.unbind(-1)):
            losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            total = total + sum((losses[part].mean() for part in (drawn, ~drawn) if part.any()), torch.zeros(()))
        return total / len(self.linear)


def contrastive_step(model: open_clip.CLIP, optimizer: torch.optim.Optimizer, loss_fn: ClipLoss,
                     tokenizer: SimpleTokenizer, images: list[np.ndarray], captions: list[str],
                     max_grad_norm: float, objects: tuple[ObjectMapHead, torch.Tensor, float] | None = None) -> float:
    """One AdamW step on one batch; returns the loss before the step. `objects`: (head, `object_map` labels,
    weight) adds the object-map loss on the patch tokens."""
    model.train()
    x, text = pixels(images), tokenizer(captions)
    if objects is None:
        image_features, text_features, logit_scale = model(x, text)
        loss = loss_fn(image_features, text_features, logit_scale)
    else:
        head, labels, weight = objects
        saved, model.visual.output_tokens = model.visual.output_tokens, True
        try:
            pooled, tokens = model.visual(x)            # open_clip: (N, D') pooled, (N, patches, width) tokens
        finally:
            model.visual.output_tokens = saved
        text_features = model.encode_text(text, normalize=True)
        loss = loss_fn(F.normalize(pooled, dim=-1), text_features, model.logit_scale.exp())
        loss = loss + weight * head.loss(tokens, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model.parameters(), max_grad_norm)
    optimizer.step()
    with torch.no_grad():   # CLIP's clamp: a temperature of 1/100 at most, or training turns unstable
        model.logit_scale.clamp_(0, np.log(100))
    return loss.item()


def pretrain_vision(config: VisionPretrainConfig, log_every: int = 0,
                    model: open_clip.CLIP | None = None) -> open_clip.CLIP:
    """Train a tower (a fresh one from `config` unless `model` is given) for `config.steps` steps of AdamW
    with linear warm-up and cosine decay; prints the loss every `log_every` steps (0: silent)."""
    model = model if model is not None else build_clip(config)
    tokenizer = SimpleTokenizer(context_length=config.context_length)
    head = None
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.object_map_weight:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = ObjectMapHead(config.width, config.object_map_attributes)
        parameters += list(head.parameters())
    optimizer, scheduler = adamw_warmup_cosine(parameters, config.lr, config.weight_decay, config.warmup_steps,
                                               config.steps, config.min_lr_ratio)
    loss_fn = ClipLoss()
    with torch.random.fork_rng(devices=[]):   # dropout-free, but keep the caller's RNG untouched anyway
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            batch = sample_batch(config, step)
            objects = None if head is None else (
                head, object_map(batch.footprints, config.image_size, config.patch_size,
                                 config.object_map_attributes), config.object_map_weight)
            loss = contrastive_step(model, optimizer, loss_fn, tokenizer, batch.images, batch.captions,
                                    config.max_grad_norm, objects)
            scheduler.step()
            if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
                print(f"vision step {step + 1:>5}/{config.steps}  loss {loss:.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(model: open_clip.CLIP, config: VisionPretrainConfig, groups: int = 8,
                       group_size: int = 16) -> float:
    """Image -> text top-1 accuracy on held-out scenes: each image picks one of its group's `group_size`
    captions (chance = 1 / group_size). A pick counts when its text equals the image's own caption, since
    two one-object scenes can share a caption."""
    model.eval()
    tokenizer = SimpleTokenizer(context_length=config.context_length)
    hits = 0
    for group in range(groups):
        images, captions = sample_pairs(config, group, stream=EVAL_STREAM, count=group_size)
        image_features, text_features, _ = model(pixels(images), tokenizer(captions))
        picks = (image_features @ text_features.T).argmax(dim=1).tolist()
        hits += sum(captions[pick] == captions[row] for row, pick in enumerate(picks))
    return hits / (groups * group_size)


# --- saving --------------------------------------------------------------------------------------


def save_vision(model: open_clip.CLIP, config: VisionPretrainConfig, directory: str | Path) -> Path:
    """The tower as safetensors + the JSON of its `open_clip.CLIP(...)` arguments (no pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(
        {"clip_config": clip_config(config), "pretrain_config": asdict(config)}, indent=2) + "\n")
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))
    return directory


def load_vision(directory: str | Path) -> tuple[open_clip.CLIP, dict[str, Any]]:
    """The tower `save_vision` wrote, and its CLIP config."""
    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_FILE).read_text())["clip_config"]
    model = build_open_clip(cfg)
    missing, unexpected = safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval(), cfg
