"""Interleaved image-text training sequences (synthetic world, optionally the user's shards), rendered as
OpenFlamingo trains: `<image>{text}<|endofchunk|>` once per media item, the media stacked as `vision_x`
(B, T, F, 3, H, W).

Three episode types, so the bridges learn both to describe media and to use the context:
  caption  -- 2-4 scenes (or 1-2 clips), each followed by its caption;
  qa       -- the same with 'Question: ... Answer: ...' about each one;
  binding  -- a fast-binding episode (`make_binding_episode`): support images named with nonsense words
              (1..`binding_shots` per word), then the query image, whose name is only predictable from
              the support pairs.

With `data.shards`, caption episodes use the captioned images and clips of those shards instead, read and
preprocessed by `media`, the reader and decoder the annotation pipeline uses.

A batch is a pure function of (seed, batch index), so a resumed run sees exactly the batches an
uninterrupted one would, with no data-loader state to checkpoint. A batch holds only images (F = 1) or
only clips (F = `num_frames`), because frames cannot be padded without changing the resampler's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flamingo import Flamingo
from media.decode import DecodeConfig, decode_item
from media.decode import image_transform as media_transform
from media.files import DEFAULT_MAX_ITEM_BYTES, file_rows, list_files
from training.config import DataConfig
from training.synthetic import (
    QA,
    Clip,
    Sample,
    Scene,
    existence_questions,
    make_binding_episode,
    make_clip,
    make_scene,
    pick,
)

IGNORE_INDEX = -100   # what HF's cross-entropy skips
TASKS = ("caption", "qa", "binding")
_MAX_DRAWS = 100   # samples drawn to find one with a question of `qa_attributes` (almost always 1-2)
Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Episode:
    """Media items and the text that follows each one. A media item is raw (F, H, W, 3) uint8 frames
    (synthetic), or (F, 3, H, W) pixels already preprocessed by `media.decode` (shards)."""

    media: tuple[np.ndarray | torch.Tensor, ...]
    texts: tuple[str, ...]
    task: str
    # For each text, its leading part that is given, not predicted: no loss is taken on it (a question
    # before its answer, with `DataConfig.answer_loss_only`). Empty: loss on every text token.
    given: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.media) != len(self.texts) or not self.media:
            raise ValueError(f"an episode needs one text per media item, got {len(self.media)} and {len(self.texts)}")
        if self.given and (len(self.given) != len(self.texts)
                           or not all(t.startswith(g) for g, t in zip(self.given, self.texts))):
            raise ValueError("an episode's given parts must be one leading part of each text")


@dataclass(frozen=True)
class Example:
    """One tokenized sequence and its preprocessed media (T, F, 3, H, W)."""

    input_ids: list[int]
    vision_x: torch.Tensor
    given: list[bool] | None = None   # per token: True where no loss is taken (Episode.given); None: none


@dataclass(frozen=True)
class Batch:
    lang_x: torch.Tensor          # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    labels: torch.Tensor          # (B, L) long, IGNORE_INDEX where no loss is taken
    vision_x: torch.Tensor        # (B, T, F, 3, H, W), zero media where a row has fewer than T

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.lang_x, self.attention_mask, self.labels, self.vision_x)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"vision_x": self.vision_x, "lang_x": self.lang_x, "attention_mask": self.attention_mask,
                "labels": self.labels}


# --- episodes ------------------------------------------------------------------------------------


def make_episode(rng: np.random.Generator, task: str, video: bool, config: DataConfig) -> Episode:
    """One episode of `task`; clips instead of scenes when `video` (binding episodes are image-only)."""
    if task == "binding":
        shots = int(rng.integers(1, config.binding_shots + 1))
        episode = make_binding_episode(rng, ways=config.binding_ways, shots=shots,
                                       category=pick(rng, config.binding_categories), image_size=config.image_size)
        media = [*episode.support_images(), episode.query_image()]
        texts = [*episode.support_texts, f"{episode.query_text} {episode.answer}."]
        return Episode(tuple(image[None] for image in media), tuple(texts), task)

    def draw() -> Sample:
        if video:
            return make_clip(rng, image_size=config.image_size, num_frames=config.num_frames, fps=config.fps)
        return make_scene(rng, image_size=config.image_size, max_objects=config.max_objects,
                          min_objects=config.min_objects)

    samples = [draw() for _ in range(media_count(rng, video, config))]
    if task == "caption":
        texts = [sample.caption() for sample in samples]
    elif task == "qa":
        texts, given = [], []
        for i in range(len(samples)):
            draws = 1
            while not (questions := asked(samples[i], config.qa_attributes, rng)):
                if draws == _MAX_DRAWS:
                    raise ValueError(f"data.qa_attributes: no question of {list(config.qa_attributes)} in "
                                     f"{draws} draws; allow more objects or other attributes")
                samples[i], draws = draw(), draws + 1
            qa = questions[int(rng.integers(len(questions)))]
            given.append(qa.prompt)
            texts.append(f"{qa.prompt} {qa.answer}")
        return Episode(_media(samples), tuple(texts), task, tuple(given) if config.answer_loss_only else ())
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return Episode(_media(samples), tuple(texts), task)


def asked(sample: Sample, attributes: Sequence[str], rng: np.random.Generator) -> list[QA]:
    """The sample's questions about `attributes` (empty: all of `qa()`). Existence questions only when named:
    `qa()` leaves them out (`existence_questions` says why); `rng` draws what their 'no' asks about."""
    questions = [qa for qa in sample.qa() if not attributes or qa.attribute in attributes]
    if "existence" in attributes and isinstance(sample, Scene):
        questions += existence_questions(sample.objects, rng)
    return questions


def _media(samples: Sequence[Sample]) -> tuple[np.ndarray, ...]:
    """(F, H, W, 3) frames per sample: a scene is one frame."""
    return tuple(sample.frames() if isinstance(sample, Clip) else sample.image()[None] for sample in samples)


def media_count(rng: np.random.Generator, video: bool, config: DataConfig) -> int:
    """Media per caption / QA episode: min_media..max_media images, or 1-2 clips (clips cost F frames each)."""
    return int(rng.integers(1, 3) if video else rng.integers(config.min_media, config.max_media + 1))


def render_chunk(text: str, media_token: str, end_of_chunk_token: str) -> str:
    """One media item and its text in OpenFlamingo's interleaved format: `<image>{text}<|endofchunk|>`."""
    return f"{media_token}{text}{end_of_chunk_token}"


def render_text(episode: Episode, media_token: str, end_of_chunk_token: str) -> str:
    return "".join(render_chunk(text, media_token, end_of_chunk_token) for text in episode.texts)


# --- tokens and pixels ---------------------------------------------------------------------------


def image_transform(model: Flamingo) -> Transform:
    """The model's eval preprocessing (resize, centre crop, normalise), as the annotation pipeline uses."""
    return media_transform(DecodeConfig.for_model(model.config))


def encode_episode(model: Flamingo, episode: Episode, transform: Transform, max_length: int) -> Example:
    """Tokens of the rendered episode and its media as (T, F, 3, H, W). Over `max_length`, whole trailing
    chunks are dropped with their media (only a first chunk longer than that is cut), so a sequence
    never ends mid-sentence or holds media no `<image>` refers to."""
    tokens = model.config.media_token, model.config.end_of_chunk_token

    def encode(text: str) -> list[int]:
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    chunks = [encode(render_chunk(text, *tokens)) for text in episode.texts]
    given = [len(encode(tokens[0] + part)) for part in episode.given] or [0] * len(chunks)
    kept = 0
    input_ids: list[int] = []
    is_given: list[bool] = []
    for chunk, length in zip(chunks, given):
        if kept and len(input_ids) + len(chunk) > max_length:
            break
        input_ids += chunk
        is_given += [i < length for i in range(len(chunk))]
        kept += 1
    media = torch.stack([_pixels(frames, transform) for frames in episode.media[:kept]])
    return Example(input_ids[:max_length], media, is_given[:max_length] if episode.given else None)


def _pixels(frames: np.ndarray | torch.Tensor, transform: Transform) -> torch.Tensor:
    if isinstance(frames, torch.Tensor):
        return frames.float()
    return torch.stack([transform(Image.fromarray(frame)) for frame in frames])


def read_captioned_media(uris: Sequence[str], model: Flamingo, num_frames: int) -> list[Episode]:
    """Every captioned item of the shards, as a one-item caption episode, read and preprocessed by the
    reader and decoder the annotation pipeline uses (so training sees the pixels annotation will: the same bits
    in a float16 model; in a float32 one, within float16 rounding, as `decode_item` keeps them in float16 and the
    annotation job normalises in float32). Items with an error or no caption are left out. Held in memory: meant
    for fine-tuning-sized data."""
    decode = DecodeConfig.for_model(model.config, num_frames=num_frames)
    transform = image_transform(model)
    items = []
    for uri in uris:
        for listed in list_files(uri):
            for row in file_rows(listed.uri, listed.size, None, DEFAULT_MAX_ITEM_BYTES):
                if row["error"] is None and row["caption"]:
                    pixels, error = decode_item(row["media_kind"], row["data"], transform, decode)
                    if error is None:
                        items.append(Episode((torch.from_numpy(pixels),), (row["caption"].strip(),), "caption"))
    return items


def make_labels(lang_x: torch.Tensor, attention_mask: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """Loss on the text after each `<image>` (`<|endofchunk|>` included, so the model learns to stop);
    none on `<image>` itself, on padding, or on text before the first image (OpenFlamingo's masking)."""
    labels = lang_x.clone()
    is_media = lang_x == media_token_id
    labels[is_media | (attention_mask == 0) | (is_media.cumsum(-1) == 0)] = IGNORE_INDEX
    return labels


def collate(examples: Sequence[Example], pad_token_id: int, media_token_id: int) -> Batch:
    """Right-pad tokens (positions follow the attention mask in `Flamingo.forward`) and zero-pad media
    to the longest row; every row's media must have the same number of frames."""
    frames = {example.vision_x.shape[1:] for example in examples}
    if len(frames) != 1:
        raise ValueError(f"a batch mixes media shapes {sorted(frames)}; group examples by frame count")
    length = max(len(example.input_ids) for example in examples)
    num_media = max(example.vision_x.shape[0] for example in examples)
    lang_x = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(lang_x)
    vision_x = examples[0].vision_x.new_zeros((len(examples), num_media, *frames.pop()))
    for row, example in enumerate(examples):
        lang_x[row, :len(example.input_ids)] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :len(example.input_ids)] = 1
        vision_x[row, :example.vision_x.shape[0]] = example.vision_x
    labels = make_labels(lang_x, attention_mask, media_token_id)
    for row, example in enumerate(examples):
        if example.given is not None:
            labels[row, :len(example.given)][torch.tensor(example.given)] = IGNORE_INDEX
    return Batch(lang_x, attention_mask, labels, vision_x)


# --- batches -------------------------------------------------------------------------------------


class TrainingBatches:
    """`batch(i)` is micro-batch i of a seeded, endless stream of episodes for one model."""

    def __init__(self, model: Flamingo, config: DataConfig, batch_size: int, seed: int):
        if config.num_frames > model.config.max_num_frames and config.video_fraction > 0:
            raise ValueError(f"data.num_frames={config.num_frames} exceeds the model's max_num_frames "
                             f"({model.config.max_num_frames})")
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.seed = seed
        self.transform = image_transform(model)
        weights = np.array([config.caption_weight, config.qa_weight, config.binding_weight], dtype=float)
        self.task_probabilities = weights / weights.sum()
        # Shard items by frame count: images (1) and clips of exactly num_frames can join a batch.
        self.shard_items: dict[int, list[Episode]] = {1: [], config.num_frames: []}
        for item in read_captioned_media(config.shards, model, config.num_frames) if config.shards else ():
            self.shard_items.get(item.media[0].shape[0], []).append(item)
        if config.shards and not any(self.shard_items.values()):
            raise ValueError(f"data.shards: no captioned image or {config.num_frames}-frame video in "
                             f"{list(config.shards)}")

    def episodes(self, index: int, stream: int = 0) -> list[Episode]:
        """The episodes of micro-batch `index` (`stream`: e.g. the data-parallel rank)."""
        rng = np.random.default_rng((self.seed, stream, index))
        video = bool(rng.random() < self.config.video_fraction)
        tasks = rng.choice(len(TASKS), size=self.batch_size, p=self.task_probabilities)
        if video:   # binding episodes are image-only: give a clip batch captions and questions
            tasks = np.where(tasks == TASKS.index("binding"), rng.integers(0, 2, size=self.batch_size), tasks)
        return [self._shard_episode(rng, video) if TASKS[int(t)] == "caption" and self._from_shards(video)
                else make_episode(rng, TASKS[int(t)], video, self.config) for t in tasks]

    def _from_shards(self, video: bool) -> bool:
        return bool(self.shard_items[self.config.num_frames if video else 1])

    def _shard_episode(self, rng: np.random.Generator, video: bool) -> Episode:
        """Shard items with their captions, drawn with replacement."""
        pool = self.shard_items[self.config.num_frames if video else 1]
        chosen = [pool[int(i)] for i in rng.integers(len(pool), size=media_count(rng, video, self.config))]
        return Episode(tuple(e.media[0] for e in chosen), tuple(e.texts[0] for e in chosen), "caption")

    def batch(self, index: int, stream: int = 0) -> Batch:
        examples = [encode_episode(self.model, episode, self.transform, self.config.max_length)
                    for episode in self.episodes(index, stream)]
        return collate(examples, self.model.tokenizer.pad_token_id, self.model.media_token_id)
