"""Training configuration: one YAML file per run, loaded with `yaml.safe_load` into frozen dataclasses.

Validation is strict (unknown fields, wrong types, out-of-range values) and every error names the file and
the dotted field, because a typo in a long-running job's config should fail in the first second, not after
an hour of training with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.synthetic import BINDING_CATEGORIES, CLIP_QA_ATTRIBUTES, NAMED_QA_ATTRIBUTES, SCENE_QA_ATTRIBUTES


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DataConfig:
    """Episodes drawn from the procedural world of `training.synthetic` (a pure function of the seed),
    and optionally captioned media from shards (`shards`: URIs the annotation pipeline can read --
    WebDataset tars, img2dataset Parquet, media folders -- local or s3://): then caption episodes
    use those items instead of fresh scenes, while QA and binding episodes stay synthetic (set their
    weights to 0 to train on the shards alone, and video_fraction to 0 if the shards hold no clips)."""

    shards: tuple[str, ...] = ()
    image_size: int = 64                 # rendered size; the model's own transform then resizes it
    max_objects: int = 3
    min_objects: int = 1                 # objects per scene: min..max (clips keep 1-2)
    video_fraction: float = 0.25         # fraction of batches made of clips (a batch never mixes F)
    num_frames: int = 4                  # frames per clip (at most the model's max_num_frames)
    fps: int = 8
    caption_weight: float = 1.0          # relative frequency of each episode type
    qa_weight: float = 1.0
    binding_weight: float = 1.0
    min_media: int = 2                   # media per caption / QA episode (images); clip episodes use 1..2
    max_media: int = 4
    binding_ways: int = 2                # words per binding episode
    binding_shots: int = 1               # shots per word: drawn from 1..binding_shots for each episode
    # what the words name: shapes (colour varies), colour + shape pairs, or either, drawn per episode
    binding_categories: tuple[str, ...] = BINDING_CATEGORIES
    max_length: int = 512                # tokens per sequence; longer ones are cut at the end
    # Loss on a QA episode's answers only, not on the words of its questions (drawn at random from the
    # scene). Alone it did not change the answers about several objects (docs/several-objects.md).
    answer_loss_only: bool = False
    # What QA episodes ask about (`QA.attribute`: colour, shape, size, count, position, relation; clips also
    # direction, speed; scenes also 'existence' when named: 'Is there a red shape?'); a scene or clip with
    # no such question is drawn again. Empty: every kind but existence. Asking
    # only colour about scenes of 2-3 objects is what first taught re-drawn queries to read the object a
    # question names (docs/several-objects.md).
    qa_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """A run: which model, which data, how long, and where its checkpoints and final model go."""

    model: str                           # a preset name (e.g. tiny-random) or a save_pretrained folder
    checkpoint_dir: str                  # checkpoints + metrics.jsonl (train_local); Ray's storage_path (train)
    output_dir: str                      # the trained model, written with Flamingo.save_pretrained
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 100                     # optimizer steps
    batch_size: int = 4                  # sequences per micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 1e-4
    # The tanh gates scale everything the bridges add, so while they are near 0 Adam's fixed-size steps
    # barely change the model's output: a larger step for the gates alone lets small models start using
    # the images within a short run. 1: every trainable parameter at `lr`, as in the paper.
    gate_lr_scale: float = 1.0
    # Re-draw the cross-attention's query projections (as a new model draws them) before the first step,
    # so its attention starts out spread over the visual tokens again. The recipe's stage 3 narrows each
    # block's attention to about one visual token, the same whatever the text asks, and more training did
    # not widen it; with re-drawn queries, colour questions learnt to read the object they name
    # (docs/several-objects.md, "The cross-attention stops looking"). A resumed run keeps its checkpoint's.
    reset_queries: bool = False
    weight_decay: float = 0.1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0            # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    run_name: str = "flamingo-bridges"   # Ray Train run name: re-running the same name resumes it
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "gate_lr_scale", "cpus_per_worker"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        d = self.data
        if not 0 <= d.video_fraction <= 1:
            raise ValueError(f"data.video_fraction: must be in [0, 1], got {d.video_fraction}")
        if not 1 <= d.min_media <= d.max_media:
            raise ValueError(f"data.min_media / data.max_media: need 1 <= min_media <= max_media, "
                             f"got {d.min_media}, {d.max_media}")
        weights = (d.caption_weight, d.qa_weight, d.binding_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("data.caption_weight / qa_weight / binding_weight: must be >= 0, not all 0")
        if not d.binding_categories or not set(d.binding_categories) <= set(BINDING_CATEGORIES):
            raise ValueError(f"data.binding_categories: choose from {list(BINDING_CATEGORIES)}, "
                             f"got {list(d.binding_categories)}")
        if d.binding_ways < 1 or d.binding_shots < 1:
            raise ValueError("data.binding_ways / data.binding_shots: must be at least 1")
        if d.max_length < 8:
            raise ValueError(f"data.max_length: must be at least 8, got {d.max_length}")
        if not 1 <= d.min_objects <= d.max_objects:
            raise ValueError(f"data.min_objects / data.max_objects: need 1 <= min_objects <= max_objects, "
                             f"got {d.min_objects}, {d.max_objects}")
        scene_asked = SCENE_QA_ATTRIBUTES + NAMED_QA_ATTRIBUTES
        known = dict.fromkeys(scene_asked + CLIP_QA_ATTRIBUTES)
        if not set(d.qa_attributes) <= set(known):
            raise ValueError(f"data.qa_attributes: choose from {list(known)}, got {list(d.qa_attributes)}")
        for kind, asked, share in (("scenes", scene_asked, 1 - d.video_fraction),
                                   ("clips", CLIP_QA_ATTRIBUTES, d.video_fraction)):
            if d.qa_attributes and d.qa_weight > 0 and share > 0 and not set(d.qa_attributes) & set(asked):
                raise ValueError(f"data.qa_attributes: none of {list(d.qa_attributes)} is asked about {kind} "
                                 f"(they are asked {list(asked)}); name one, or set video_fraction")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> TrainConfig:
        """Build and validate; errors read '<source>: field: problem'."""
        try:
            return build_dataclass(cls, data, "")
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config."""
    return load_dataclass(path, TrainConfig)


def load_dataclass(path: str | Path, cls: type) -> Any:
    """A config dataclass from a YAML file (`yaml.safe_load`: data only, no Python objects); every error
    is a ConfigError reading '<file>: field: problem'."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return build_dataclass(cls, data, "")
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from None


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass from a mapping, nested dataclasses included, checking names and simple types."""
    if not isinstance(data, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: required field is missing")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = build_dataclass(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}")
    try:
        return cls(**values)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if not prefix or message.startswith(prefix) else prefix + message) from None


def _check_type(value: Any, hint: Any, name: str) -> Any:
    if typing.get_origin(hint) is tuple:        # tuple[str, ...]: a YAML list
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_check_type(item, typing.get_args(hint)[0], f"{name}[{i}]") for i, item in enumerate(value))
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name}: must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = tuple(typing.get_args(hint))
    if hint is float or (isinstance(hint, tuple) and float in hint):
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)   # YAML writes 1e-4 as a string unless it has a dot; 1 is a fine float
        elif isinstance(value, str):
            try:
                value = float(value)   # `lr: 1e-4` is a str to YAML 1.1
            except ValueError:
                pass
    if isinstance(value, bool) and hint in (int, float):
        raise TypeError(f"{name}: expected {hint.__name__}, got a boolean")
    if not isinstance(value, hint):
        expected = hint.__name__ if isinstance(hint, type) else " or ".join(h.__name__ for h in hint)
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    return value
