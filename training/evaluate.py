"""Evaluation of a Flamingo on held-out draws of the synthetic world (`training.synthetic`).

Three measurements, each a pure function of the model and the seed:
  caption  -- greedy captions of scenes and clips after `<image>` (the trained format): whole-caption
              exact match, and object recall (each true object's full phrase, e.g. 'a large red circle at
              the top left', found in the caption);
  qa       -- 'Question: ... Answer:' greedy answers, exact match per attribute (colour, shape, size,
              count, position, relation, direction, speed);
  binding  -- the few-shot curve on fast-binding episodes: fresh nonsense words are bound to object
              categories only inside the prompt, so the answer cannot come from the weights. Categories
              are colour + shape pairs ('red circle'), or shapes alone whatever their colour (harder: it
              needs shape, the attribute a small vision tower learns last). The model picks the word of
              highest likelihood among the episode's words (chance = 1 / ways) at each number of shots
              per word; 0 shots shows the query with no support at all. The same curve with every gate
              forced to 0 (the bare LM, which sees the support sentences but no pixels) is the control.

Held out means fresh draws from a seed stream training never uses; the world is small enough that some
single-object scenes will also have been drawn in training, as in any procedural benchmark.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo import Flamingo
from training.sequences import image_transform, render_chunk
from training.synthetic import BINDING_CATEGORIES, QUERY_TEXT, make_binding_episode, make_clip, make_scene

# Streams of the evaluation seed sequence, disjoint from training's (seed, stream, index) triples.
_EVAL = 7919
_SCENES, _CLIPS, _QA, _BINDING = range(4)


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    scenes: int = 64                     # held-out scenes to caption and question
    clips: int = 32                      # held-out clips to caption and question
    episodes: int = 100                  # binding episodes per point of the curve
    ways: int = 2                        # words per binding episode: chance = 1 / ways
    shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    categories: tuple[str, ...] = ("colour_shape", "shape")   # what the words name: one curve each
    image_size: int = 64
    num_frames: int = 4
    batch_size: int = 16                 # prompts per generate() call
    max_new_tokens: int = 48             # a three-object caption is ~40 tokens

    def __post_init__(self) -> None:
        if self.ways < 2 or min(self.shots, default=-1) < 0 or self.episodes < 1:
            raise ValueError("need ways >= 2, shots >= 0 and episodes >= 1")
        if not self.categories or not set(self.categories) <= set(BINDING_CATEGORIES):
            raise ValueError(f"categories: choose from {list(BINDING_CATEGORIES)}, got {list(self.categories)}")


@dataclass
class EvalReport:
    config: EvalConfig
    caption: dict[str, dict[str, float]] = field(default_factory=dict)     # kind -> metric -> value
    qa: dict[str, dict[str, float]] = field(default_factory=dict)          # attribute -> {accuracy, count}
    # category -> 'model' / 'gates_closed' -> shots -> accuracy
    binding: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)           # a few captions, for eyeballing

    @property
    def chance(self) -> float:
        return 1 / self.config.ways

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "caption": self.caption, "qa": self.qa,
                "binding": {category: {k: {str(s): v for s, v in curve.items()} for k, curve in curves.items()}
                            for category, curves in self.binding.items()},
                "binding_chance": self.chance, "examples": self.examples}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """The report as the plain-text table the CLI prints."""
        lines = ["captioning (greedy, 0-shot)       exact   object recall   n"]
        for kind, m in self.caption.items():
            lines.append(f"  {kind:<31} {m['exact']:5.2f}   {m['object_recall']:13.2f}   {int(m['count'])}")
        lines.append("question answering (exact match)  accuracy          n")
        for attribute, m in sorted(self.qa.items()):
            lines.append(f"  {attribute:<31} {m['accuracy']:8.2f}   {int(m['count']):8d}")
        shots = self.config.shots
        for category, curves in self.binding.items():
            words_name = "colour + shape pairs" if category == "colour_shape" else "shapes, any colour"
            lines.append(f"binding {words_name}, {self.config.ways}-way (chance {self.chance:.2f}), "
                         f"{self.config.episodes} episodes per point")
            lines.append("  shots per word                  " + "".join(f"{s:>7}" for s in shots))
            for name, curve in curves.items():
                label = "with vision" if name == "model" else "gates forced to 0"
                lines.append(f"  {label:<32}" + "".join(f"{curve[s]:7.2f}" for s in shots))
        return "\n".join(lines)


def evaluate(model: Flamingo, config: EvalConfig = EvalConfig(), parts: Sequence[str] = ("caption", "qa", "binding")
             ) -> EvalReport:
    model.eval()
    report = EvalReport(config)
    transform = image_transform(model)
    scenes = [make_scene((config.seed, _EVAL, _SCENES, i), image_size=config.image_size) for i in range(config.scenes)]
    clips = [make_clip((config.seed, _EVAL, _CLIPS, i), image_size=config.image_size, num_frames=config.num_frames)
             for i in range(config.clips)]
    media = [(s, s.image()[None]) for s in scenes] + [(c, c.frames()) for c in clips]
    if "caption" in parts:
        captions = _generate(model, transform, [m for _, m in media], [""] * len(media), config)
        for kind in ("image", "video"):
            pairs = [(sample, text) for (sample, _), text in zip(media, captions) if sample.kind == kind]
            if pairs:
                report.caption[kind] = caption_scores(pairs)
        report.examples = [{"truth": s.caption(), "generated": t} for (s, _), t in list(zip(media, captions))[:4]]
    if "qa" in parts:
        rng = np.random.default_rng((config.seed, _EVAL, _QA))
        asked = [(m, s.qa()[int(rng.integers(len(s.qa())))]) for s, m in media]
        answers = _generate(model, transform, [m for m, _ in asked],
                            [f"Question: {qa.question} Answer:" for _, qa in asked], config)
        report.qa = qa_scores([qa for _, qa in asked], answers)
    if "binding" in parts:
        for category in config.categories:
            curves = report.binding[category] = {"model": binding_curve(model, transform, config, category)}
            with gates_closed(model):
                curves["gates_closed"] = binding_curve(model, transform, config, category)
    return report


# --- scoring -------------------------------------------------------------------------------------


def caption_scores(pairs: Sequence[tuple[Any, str]]) -> dict[str, float]:
    """Exact match of the whole caption, and the share of true objects whose whole phrase appears in it."""
    exact = [normalise(text) == normalise(sample.caption()) for sample, text in pairs]
    found = [phrase in normalise(text) for sample, text in pairs for phrase in object_phrases(sample.caption())]
    return {"exact": float(np.mean(exact)), "object_recall": float(np.mean(found)), "count": float(len(pairs))}


def object_phrases(caption: str) -> list[str]:
    """A true caption's phrase for each object ('a large red circle at the top left')."""
    return [normalise(p) for p in re.split(r", | and ", normalise(caption))]


def object_recall(truth: str, generated: str) -> float:
    """Share of the true caption's object phrases found whole in a generated caption."""
    phrases = object_phrases(truth)
    return sum(phrase in normalise(generated) for phrase in phrases) / len(phrases)


def qa_scores(questions: Sequence[Any], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for qa, answer in zip(questions, answers):
        hits[qa.attribute].append(normalise(answer) == normalise(qa.answer))
    hits["all"] = [h for attribute in list(hits) for h in hits[attribute]]
    return {a: {"accuracy": float(np.mean(h)), "count": float(len(h))} for a, h in hits.items()}


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


# --- binding -------------------------------------------------------------------------------------


def binding_curve(model: Flamingo, transform, config: EvalConfig, category: str) -> dict[int, float]:
    """Accuracy at each number of shots per word (fresh episodes at each point)."""
    curve = {}
    for shots in config.shots:
        correct = []
        for i in range(config.episodes):
            seed = (config.seed, _EVAL, _BINDING, BINDING_CATEGORIES.index(category), shots, i)
            episode = make_binding_episode(seed, ways=config.ways, shots=max(shots, 1), category=category,
                                           image_size=config.image_size)
            support = list(zip(episode.support_images(), episode.support_texts)) if shots else []
            correct.append(binding_choice(model, transform, support, episode.query_image(), episode.words)
                           == episode.answer)
        curve[shots] = float(np.mean(correct))
    return curve


def binding_choice(model: Flamingo, transform, support: Sequence[tuple[np.ndarray, str]], query: np.ndarray,
                   words: Sequence[str]) -> str:
    """The word of highest log-likelihood after the supports and `<image>This is a`."""
    media, eoc = model.config.media_token, model.config.end_of_chunk_token
    prompt = "".join(render_chunk(text, media, eoc) for _, text in support) + f"{media}{QUERY_TEXT}"
    pictures = [image for image, _ in support] + [query]
    images = torch.stack([transform(Image.fromarray(picture)) for picture in pictures])
    lang_x, mask = model.tokenize([prompt])
    candidates = [model.tokenizer(f" {word}.", add_special_tokens=False)["input_ids"] for word in words]
    scores = model.score(lang_x, candidates, mask, vision_x=images[None, :, None].to(model.device, model.dtype))
    return words[int(scores[0].argmax())]


@contextlib.contextmanager
def gates_closed(model: Flamingo) -> Iterator[None]:
    """Every gate at 0 for the duration: the model computes exactly its frozen LM (the no-vision control)."""
    gates = [g for block in model.gated_cross_attn_layers() for g in (block.attn_gate, block.ff_gate)]
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        yield
    finally:
        with torch.no_grad():
            for g, value in zip(gates, saved):
                g.copy_(value)


# --- generation ----------------------------------------------------------------------------------


def _generate(model: Flamingo, transform, media: Sequence[np.ndarray], texts: Sequence[str],
              config: EvalConfig) -> list[str]:
    """Greedy continuations of `<image>{text}` for each (F, H, W, 3) media item, batched by frame count."""
    out = [""] * len(media)
    by_frames: dict[int, list[int]] = defaultdict(list)
    for i, frames in enumerate(media):
        by_frames[frames.shape[0]].append(i)
    for indices in by_frames.values():
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start:start + config.batch_size]
            pixels = torch.stack([torch.stack([transform(Image.fromarray(f)) for f in media[i]]) for i in batch])
            lang_x, mask = model.tokenize([f"{model.config.media_token}{texts[i]}" for i in batch])
            tokens = model.generate(pixels[:, None].to(model.device, model.dtype), lang_x, mask,
                                    max_new_tokens=config.max_new_tokens)
            for i, text in zip(batch, model.decode(tokens[:, lang_x.shape[1]:])):
                out[i] = text
    return out
