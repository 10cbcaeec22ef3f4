"""Evaluation of a Flamingo on held-out draws of the synthetic world (`training.synthetic`).

Every figure is a count of right answers out of n independent held-out draws, reported with its Wilson
95% interval and the accuracy of guessing (`chance`), so that a difference the sample cannot support is
visible as overlapping intervals. Four measurements, each a pure function of the model and the seed:

  caption  -- greedy 0-shot captions of scenes and clips after `<image>` (the trained format): whole-caption
              exact match, and object recall (each true object's full phrase, e.g. 'a large red circle at
              the top left', found in the caption; phrases of one caption are not independent draws, so
              that interval is optimistic);
  qa       -- 'Question: ... Answer:' greedy answers, exact match, `questions` per attribute (colour,
              shape, size, count, position, relation on scenes; direction, speed on clips), each question
              on its own fresh scene or clip. Beside each: chance (one over the attribute's possible
              answers), the majority baseline (always giving the most common true answer) and the model's
              own most frequent answer with its share (a model that always says 'top' shows here);
  binding  -- the few-shot curve on fast-binding episodes: nonsense words are bound to object categories
              only inside the prompt, so the answer cannot come from the weights. Categories are colour +
              shape pairs ('red circle') or shapes alone whatever their colour. The model picks the word
              of highest likelihood among the episode's words (chance = 1 / ways) at each number of shots
              per word; 0 shots shows the query with no support at all. Two rows of words on the same
              images: `train` words come from the generator training used ('bliket', 'dovax'); `wide`
              words from a wider one (`wide_nonsense_words`: other letters, 1-3 syllables, other lengths
              and token counts, never a word the training generator can make). The same curves with
              every gate forced to 0 (the bare LM, which sees the support sentences but no pixels) are
              the control;
  tasks    -- the example task files (jobs/tasks/caption.yaml, count.yaml, has_red.yaml, binding.yaml) run
              exactly as the annotation pipeline runs them (same prompt, few-shot prefix, label scoring), on
              held-out scenes (for binding: one circle or star each): classify accuracy overall and per
              true class with the distribution of its answers, and for captions exact match, object count
              and whether every colour / shape named is in the scene.

Held out: every scene, clip and episode here is drawn from a `numpy` seed sequence whose entropy starts
(seed, EVAL_STREAM, ...) with EVAL_STREAM = 7919. Training draws only from (seed, stream, index) with stream
0 or 1 in stages 1-2 (training.pretrain_vision, training.pretrain_lm) and stream = data-parallel rank in
stage 3 (training.sequences.TrainingBatches), so no evaluation draw shares a seed sequence with a training
draw (`eval_seed` builds them; the tests check it). Object centres are jittered by continuous draws, so
scenes from different seed sequences are, with probability 1, different images; the world is small,
though, so a one-object held-out scene can show the same shape, colour, size and grid cell as one seen in
training, as in any procedural benchmark.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo import Flamingo
from training.sequences import asked, image_transform, render_chunk
from training.synthetic import (
    _CODAS,
    _ONSETS,
    _RESERVED_WORDS,
    _VOWELS,
    BINDING_CATEGORIES,
    COLOURS,
    DIRECTIONS,
    NUMBER_WORDS,
    QA,
    QUERY_TEXT,
    SHAPES,
    SIZES,
    SPEEDS,
    BindingEpisode,
    Clip,
    Scene,
    make_binding_episode,
    make_clip,
    make_scene,
    pick,
)

# The evaluation's seed sequences all start (seed, EVAL_STREAM, ...); training's streams are 0, 1 and the
# data-parallel ranks of stage 3, far below this.
EVAL_STREAM = 7919
_CAPTIONS, _CLIPS, _QA, _BINDING, _TASKS = range(5)
SCENE_ATTRIBUTES = ("colour", "shape", "size", "count", "position", "relation", "existence")
CLIP_ATTRIBUTES = ("direction", "speed")
# Each attribute's questions come from its own seed stream, its place here: a new attribute goes last, so the
# others keep their draws (and their figures stay comparable across versions of the evaluation).
_QA_STREAMS = ("colour", "shape", "size", "count", "position", "relation", "direction", "speed", "existence")
# One over the number of answers each attribute's questions can have (count: one, two or three).
QA_CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES), "count": 1 / 3,
             "position": 1 / 9, "relation": 1 / 2, "existence": 1 / 2, "direction": 1 / len(DIRECTIONS),
             "speed": 1 / len(SPEEDS)}
WORD_SETS = ("train", "wide")
DEFAULT_TASKS = ("jobs/tasks/caption.yaml", "jobs/tasks/count.yaml", "jobs/tasks/has_red.yaml",
                 "jobs/tasks/binding.yaml")
# binding.yaml's words, by the shape its demonstrations show them with (made by the training's generator).
# Circle and star: the bundled model binds words to them 1.00 of the time (217 episodes), and a circle apart
# from a square only 0.62 (jobs/binding_words.py), so the task shows binding rather than the tower's weakest
# pair.
BINDING_WORDS = MappingProxyType({"circle": "dovax", "star": "kimet"})
Z95 = 1.959963984540054     # the standard normal's 97.5% quantile


def eval_seed(seed: int, *parts: int) -> tuple[int, ...]:
    """The entropy of one evaluation draw: (seed, EVAL_STREAM, *parts), never one training uses."""
    return (seed, EVAL_STREAM, *parts)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(k: int, n: int, chance: float | None = None, **extra: Any) -> dict[str, Any]:
    """An accuracy figure as reported: k of n, the accuracy, its Wilson 95% interval and chance."""
    low, high = wilson_interval(k, n)
    out: dict[str, Any] = {"correct": int(k), "n": int(n), "accuracy": k / n if n else None,
                           "ci95": [round(low, 4), round(high, 4)]}
    if chance is not None:
        out["chance"] = round(chance, 4)
    return out | extra


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    scenes: int = 200                    # held-out scenes to caption (0-shot)
    clips: int = 100                     # held-out clips to caption (0-shot)
    questions: int = 200                 # questions per QA attribute, each on its own scene or clip
    episodes: int = 200                  # binding episodes per point of each curve
    ways: int = 2                        # words per binding episode: chance = 1 / ways
    shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    categories: tuple[str, ...] = ("colour_shape", "shape")   # what the words name: one curve each
    words: tuple[str, ...] = WORD_SETS   # nonsense-word generators: training's and a wider one
    task_items: int = 240                # held-out scenes per example task
    tasks: tuple[str, ...] = DEFAULT_TASKS
    image_size: int = 64
    num_frames: int = 4
    batch_size: int = 32                 # prompts per generate() call
    max_new_tokens: int = 48             # a three-object caption is ~40 tokens
    answer_tokens: int = 8               # QA answers are 1-3 tokens

    def __post_init__(self) -> None:
        if self.ways < 2 or min(self.shots, default=-1) < 0 or self.episodes < 1:
            raise ValueError("need ways >= 2, shots >= 0 and episodes >= 1")
        if not self.categories or not set(self.categories) <= set(BINDING_CATEGORIES):
            raise ValueError(f"categories: choose from {list(BINDING_CATEGORIES)}, got {list(self.categories)}")
        if not self.words or not set(self.words) <= set(WORD_SETS):
            raise ValueError(f"words: choose from {list(WORD_SETS)}, got {list(self.words)}")
        if min(self.scenes, self.clips, self.questions, self.task_items) < 0:
            raise ValueError("scenes, clips, questions and task_items must be >= 0")


@dataclass
class EvalReport:
    config: EvalConfig
    caption: dict[str, dict[str, Any]] = field(default_factory=dict)     # kind -> metric -> proportion
    qa: dict[str, dict[str, Any]] = field(default_factory=dict)          # attribute -> proportion + baselines
    # category -> words -> 'model' / 'gates_closed' -> shots -> proportion
    binding: dict[str, dict[str, dict[str, dict[int, dict[str, Any]]]]] = field(default_factory=dict)
    word_tokens: dict[str, dict[str, float]] = field(default_factory=dict)   # words -> token-count summary
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)       # task name -> metric -> proportion
    examples: list[dict[str, str]] = field(default_factory=list)         # a few captions, for eyeballing
    seconds: float = 0.0
    machine: str = ""

    @property
    def chance(self) -> float:
        return 1 / self.config.ways

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "seconds": round(self.seconds, 1), "machine": self.machine,
                "caption": self.caption, "qa": self.qa,
                "binding": {category: {words: {k: {str(s): v for s, v in curve.items()} for k, curve in curves.items()}
                                       for words, curves in by_words.items()}
                            for category, by_words in self.binding.items()},
                "binding_chance": self.chance, "binding_word_tokens": self.word_tokens, "tasks": self.tasks,
                "examples": self.examples}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """The report as the plain-text table the CLI prints: accuracy, 95% interval, n, chance."""
        head = f"{'':34}{'acc':>6}  {'95% interval':<14}{'n':>5}  {'chance':>6}"
        lines = []

        def row(label: str, p: dict[str, Any], note: str = "") -> None:
            if not p["n"]:
                return
            low, high = p["ci95"]
            chance = f"{p['chance']:6.2f}" if "chance" in p else " " * 6
            lines.append(f"  {label:<32}{p['accuracy']:6.2f}  [{low:.2f}, {high:.2f}]  {p['n']:5d}  {chance}{note}")

        if self.caption:
            lines.append("captioning (greedy, 0-shot)" + head[27:])
            for kind, metrics in self.caption.items():
                for name, p in metrics.items():
                    row(f"{kind} {name.replace('_', ' ')}", p)
        if self.qa:
            lines.append("question answering (exact match)" + head[32:] + "  majority  most frequent answer")
            for attribute, p in self.qa.items():
                row(attribute, p, f"  {p['majority']:8.2f}  {p['top_answer']!r} {p['top_answer_share']:.2f}")
            split = {attribute: p["by_objects"] for attribute, p in self.qa.items() if p.get("by_objects")}
            counts = sorted({int(k) for by in split.values() for k in by})
            if split:
                lines.append("question answering by objects in the scene, accuracy [95% interval] n")
                lines.append(f"  {'':<30}" + "".join(f"  {f'{k} object' + 's' * (k > 1):<21}" for k in counts))
                for attribute, by in split.items():
                    lines.append(f"  {attribute:<30}" + "".join(
                        f"  {by[str(k)]['accuracy']:.2f} [{by[str(k)]['ci95'][0]:.2f},{by[str(k)]['ci95'][1]:.2f}]"
                        f" {by[str(k)]['n']:>4}" if str(k) in by else " " * 23 for k in counts))
        for category, by_words in self.binding.items():
            words_name = "colour + shape pairs" if category == "colour_shape" else "shapes, any colour"
            lines.append(f"binding {words_name}, {self.config.ways}-way (chance {self.chance:.2f}), "
                         f"accuracy [95% interval], {self.config.episodes} episodes per point")
            lines.append(f"  {'shots per word':<30}" + "".join(f"{s:>17}" for s in self.config.shots))
            for words, curves in by_words.items():
                for name, curve in curves.items():
                    label = f"{words} words, " + ("with vision" if name == "model" else "gates at 0")
                    lines.append(f"  {label:<30}" + "".join(
                        f"  {curve[s]['accuracy']:.2f} [{curve[s]['ci95'][0]:.2f},{curve[s]['ci95'][1]:.2f}]"
                        for s in self.config.shots))
        for words, summary in self.word_tokens.items():
            lines.append(f"  {words} words: {summary['letters_min']:.0f}-{summary['letters_max']:.0f} letters, "
                         f"{summary['tokens_min']:.0f}-{summary['tokens_max']:.0f} tokens (mean "
                         f"{summary['tokens_mean']:.1f}) as ' word.', e.g. {summary['examples']}")
        for name, metrics in self.tasks.items():
            title = f"task {name} (held-out scenes)"
            lines.append(title + head[len(title):] if len(title) < 34 else f"{title}\n{head}")
            for metric, p in metrics.items():
                if isinstance(p, dict) and "accuracy" in p:
                    answers = p.get("answers")
                    row(metric.replace("_", " "), p, f"  answers {answers}" if answers else "")
        if self.seconds:
            lines.append(f"{self.seconds:.0f} s on {self.machine}")
        return "\n".join(lines)


# Runs one task file (the `int`: its place in `config.tasks`) on its held-out scenes, `task_scenes`, and scores it:
# (task name, scores). Task files and their decoding belong to the annotation pipeline, which this package does not
# import; the eval command passes `flamingo_annotate.task_scoring.score_task`.
TaskScorer = Callable[[Flamingo, "str | Path", int, "EvalConfig"], tuple[str, dict[str, Any]]]


def evaluate(model: Flamingo, config: EvalConfig = EvalConfig(),
             parts: Sequence[str] = ("caption", "qa", "binding", "tasks"),
             score_task: TaskScorer | None = None) -> EvalReport:
    """The held-out evaluation of `parts`; the example tasks ("tasks") are scored only with a `score_task`."""
    start = time.perf_counter()
    model.eval()
    report = EvalReport(config, machine=machine())
    transform = image_transform(model)
    if "caption" in parts:
        media: list[Scene | Clip] = [*caption_scenes(config), *caption_clips(config)]
        captions = _generate(model, transform, [_pixels(m) for m in media], [""] * len(media), config,
                             config.max_new_tokens)
        for kind in ("image", "video"):
            pairs = [(sample, text) for sample, text in zip(media, captions) if sample.kind == kind]
            if pairs:
                report.caption[kind] = caption_scores(pairs)
        report.examples = [{"truth": s.caption(), "generated": t} for s, t in list(zip(media, captions))[:4]]
    if "qa" in parts:
        for attribute, questions in qa_items(config).items():
            answers = answer_questions(model, transform, questions, config)
            report.qa[attribute] = qa_score([qa for _, qa in questions], answers, QA_CHANCE[attribute])
            if attribute in SCENE_ATTRIBUTES:
                report.qa[attribute]["by_objects"] = by_object_count(questions, answers, QA_CHANCE[attribute])
    if "binding" in parts:
        for words in config.words:
            report.word_tokens[words] = word_token_summary(model, config, words)
        for category in config.categories:
            for words in config.words:
                curves = report.binding.setdefault(category, {})[words] = {
                    "model": binding_curve(model, transform, config, category, words)}
                with gates_closed(model):
                    curves["gates_closed"] = binding_curve(model, transform, config, category, words)
    if "tasks" in parts and score_task is not None:
        for index, path in enumerate(config.tasks):
            name, scores = score_task(model, path, index, config)
            report.tasks[name] = scores
    report.seconds = time.perf_counter() - start
    return report


def answer_questions(model: Flamingo, transform, pairs: Sequence[tuple[Scene | Clip, QA]],
                     config: EvalConfig) -> list[str]:
    """The model's greedy answer to each (sample, question), 0-shot, as `evaluate` asks them."""
    return _generate(model, transform, [_pixels(s) for s, _ in pairs], [qa.prompt for _, qa in pairs], config,
                     config.answer_tokens)


def machine() -> str:
    cores = torch.get_num_threads()
    return f"{platform.machine()} {platform.processor() or 'cpu'}, {cores} torch thread{'s' * (cores > 1)}"


# --- what is drawn (pure functions of the config: the tests count them without a model) ------------


def caption_scenes(config: EvalConfig) -> list[Scene]:
    return [make_scene(eval_seed(config.seed, _CAPTIONS, i), image_size=config.image_size)
            for i in range(config.scenes)]


def caption_clips(config: EvalConfig) -> list[Clip]:
    return [make_clip(eval_seed(config.seed, _CLIPS, i), image_size=config.image_size, num_frames=config.num_frames)
            for i in range(config.clips)]


def qa_items(config: EvalConfig) -> dict[str, list[tuple[Scene | Clip, QA]]]:
    """`questions` (sample, question) pairs per attribute, each on a fresh scene (clip for direction and
    speed) with one question of that attribute picked at random; samples that have none are skipped.
    Existence questions ('Is there a red shape?', yes and no equally often), which training asks only when
    a phase names them, measure what a yes/no task such as has_red.yaml can expect."""
    items: dict[str, list[tuple[Scene | Clip, QA]]] = {}
    for attribute in SCENE_ATTRIBUTES + CLIP_ATTRIBUTES:
        pairs: list[tuple[Scene | Clip, QA]] = []
        draw = 0
        while len(pairs) < config.questions:
            rng = np.random.default_rng(eval_seed(config.seed, _QA, _QA_STREAMS.index(attribute), draw))
            draw += 1
            sample: Scene | Clip = (make_clip(rng, image_size=config.image_size, num_frames=config.num_frames)
                                    if attribute in CLIP_ATTRIBUTES else make_scene(rng, image_size=config.image_size))
            questions = asked(sample, (attribute,), rng)   # existence too, which `qa()` leaves out
            if questions:
                pairs.append((sample, pick(rng, questions)))
        items[attribute] = pairs
    return items


def binding_episodes(config: EvalConfig, category: str, shots: int, words: str) -> list[BindingEpisode]:
    """The episodes of one point of a binding curve. Both word sets get the same images (paired)."""
    episodes = []
    for i in range(config.episodes):
        seed = eval_seed(config.seed, _BINDING, BINDING_CATEGORIES.index(category), shots, i)
        episode = make_binding_episode(seed, ways=config.ways, shots=max(shots, 1), category=category,
                                       image_size=config.image_size)
        if words == "wide":
            episode = rename_words(episode, wide_nonsense_words(np.random.default_rng((*seed, 1)), config.ways))
        episodes.append(episode)
    return episodes


def task_scenes(config: EvalConfig, task_index: int, task_name: str = "") -> list[Scene]:
    """`config.task_items` held-out scenes for one example task: 1-3 objects, or for `binding` one circle or
    one star each (the only shapes its words are bound to). `task_name` is the `name:` inside the task file,
    the same name `task_truth` reads, whatever the file is called."""
    if task_name != "binding":
        return [make_scene(eval_seed(config.seed, _TASKS, task_index, i), image_size=config.image_size)
                for i in range(config.task_items)]
    scenes: list[Scene] = []
    draw = 0
    while len(scenes) < config.task_items:
        scene = make_scene(eval_seed(config.seed, _TASKS, task_index, draw), image_size=config.image_size,
                           max_objects=1)
        draw += 1
        if scene.objects[0].shape in BINDING_WORDS:
            scenes.append(scene)
    return scenes


def has_red(scene: Scene) -> str:
    return "yes" if any(o.colour == "red" for o in scene.objects) else "no"


def task_truth(task_name: str, scene: Scene) -> str | None:
    """The right answer of an example classify task (jobs/tasks/*.yaml) on `scene`; None for a task this
    world gives no truth for."""
    if task_name == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if task_name == "has_red":
        return has_red(scene)
    if task_name == "binding":
        return f"{BINDING_WORDS[scene.objects[0].shape]}."
    return None


# --- nonsense words ------------------------------------------------------------------------------

_TRAINING_WORD = re.compile("^({0})({1})({0})({1})({2})$".format(
    "|".join(sorted(_ONSETS, key=len, reverse=True)), "|".join(_VOWELS), "|".join(_CODAS)))
_WIDE_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "y", "z",
                "ch", "sh", "th", "wh", "ph", "cr", "cl", "gw", "sm", "sw", "scr", "str", "spl", "thr", "kn", "dw")
_WIDE_VOWELS = ("a", "e", "i", "o", "u", "y", "ee", "oo", "ea", "ai", "ou", "oi", "ie", "au")
_WIDE_CODAS = ("", "", "b", "c", "ck", "d", "f", "ff", "g", "l", "ll", "lf", "m", "n", "ng", "nk", "p", "r", "rk",
               "s", "sh", "st", "t", "th", "x", "z", "zz")


def is_training_word(word: str) -> bool:
    """Whether the training generator (`training.synthetic.nonsense_words`) can make `word`."""
    return bool(_TRAINING_WORD.match(word))


def wide_nonsense_words(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    """`count` distinct nonsense words from a wider distribution than training's: onsets, vowels and codas
    training never used (c, h, j, q, y, sh, ee, ...), 1 to 3 syllables, each with an optional coda, so
    lengths (3 to ~15 letters) and token counts vary. Never a word of the world, never one the training
    generator can make. Onsets are consonants, so 'a' stays the right article."""
    words: list[str] = []
    while len(words) < count:
        syllables = int(rng.integers(1, 4))
        word = "".join(pick(rng, _WIDE_ONSETS) + pick(rng, _WIDE_VOWELS) + pick(rng, _WIDE_CODAS)
                       for _ in range(syllables))
        if word not in _RESERVED_WORDS and word not in words and not is_training_word(word) and len(word) >= 3:
            words.append(word)
    return tuple(words)


def rename_words(episode: BindingEpisode, new_words: Sequence[str]) -> BindingEpisode:
    """The same episode (same images, same bindings) with its words replaced one for one."""
    mapping = dict(zip(episode.words, new_words))
    return replace(episode, words=tuple(new_words), support_words=tuple(mapping[w] for w in episode.support_words),
                   answer=mapping[episode.answer])


def word_token_summary(model: Flamingo, config: EvalConfig, words: str) -> dict[str, Any]:
    """Letters and tokens (as scored: ' word.') of the words of the first point's episodes."""
    drawn = [w for e in binding_episodes(replace(config, episodes=min(config.episodes, 200)),
                                         config.categories[0], config.shots[0], words) for w in e.words]
    tokens = [len(model.tokenizer(f" {w}.", add_special_tokens=False)["input_ids"]) for w in drawn]
    letters = [len(w) for w in drawn]
    return {"letters_min": min(letters), "letters_max": max(letters), "tokens_min": min(tokens),
            "tokens_max": max(tokens), "tokens_mean": float(np.mean(tokens)), "examples": ", ".join(drawn[:4])}


# --- scoring -------------------------------------------------------------------------------------


def caption_scores(pairs: Sequence[tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    """Exact match of the whole caption (n = captions), and object recall: the share of true objects whose
    whole phrase appears in the caption (n = objects; not independent within a caption)."""
    exact = [normalise(text) == normalise(sample.caption()) for sample, text in pairs]
    found = [phrase in normalise(text) for sample, text in pairs for phrase in object_phrases(sample.caption())]
    return {"exact": proportion(sum(exact), len(exact)), "object_recall": proportion(sum(found), len(found))}


def object_phrases(caption: str) -> list[str]:
    """A true caption's phrase for each object ('a large red circle at the top left')."""
    return [normalise(p) for p in re.split(r", | and ", normalise(caption))]


def object_recall(truth: str, generated: str) -> float:
    """Share of the true caption's object phrases found whole in a generated caption."""
    phrases = object_phrases(truth)
    return sum(phrase in normalise(generated) for phrase in phrases) / len(phrases)


def qa_score(questions: Sequence[QA], answers: Sequence[str], chance: float) -> dict[str, Any]:
    """Exact match with chance, the majority baseline and the model's most frequent answer."""
    hits = [normalise(answer) == normalise(qa.answer) for qa, answer in zip(questions, answers)]
    truths = Counter(normalise(qa.answer) for qa in questions)
    given = Counter(normalise(answer) for answer in answers)
    top, top_count = given.most_common(1)[0] if given else ("", 0)
    return proportion(sum(hits), len(hits), chance, majority=round(truths.most_common(1)[0][1] / len(questions), 4),
                      top_answer=top, top_answer_share=round(top_count / len(answers), 4))


def by_object_count(pairs: Sequence[tuple[Scene | Clip, QA]], answers: Sequence[str], chance: float
                    ) -> dict[str, dict[str, Any]]:
    """`qa_score` split by how many objects each question's scene holds ('1', '2', '3'): an attribute read
    right for a lone object can still be lost, or bound to the wrong object, among several."""
    by: dict[int, list[int]] = defaultdict(list)
    for i, (sample, _) in enumerate(pairs):
        by[len(sample.objects)].append(i)
    return {str(k): qa_score([pairs[i][1] for i in by[k]], [answers[i] for i in by[k]], chance) for k in sorted(by)}


def qa_scores(questions: Sequence[QA], answers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`qa_score` per attribute of the questions, and over all of them."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, qa in enumerate(questions):
        by[qa.attribute].append(i)
    out = {a: qa_score([questions[i] for i in idx], [answers[i] for i in idx], QA_CHANCE.get(a, 0.0))
           for a, idx in by.items()}
    all_hits = sum(p["correct"] for p in out.values())
    return out | {"all": proportion(all_hits, len(questions))}


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


# --- binding -------------------------------------------------------------------------------------


def binding_curve(model: Flamingo, transform, config: EvalConfig, category: str, words: str = "train"
                  ) -> dict[int, dict[str, Any]]:
    """Accuracy at each number of shots per word (fresh episodes at each point)."""
    curve = {}
    for shots in config.shots:
        correct = 0
        for episode in binding_episodes(config, category, shots, words):
            support = list(zip(episode.support_images(), episode.support_texts)) if shots else []
            correct += binding_choice(model, transform, support, episode.query_image(), episode.words) == episode.answer
        curve[shots] = proportion(correct, config.episodes, 1 / config.ways)
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


# --- the example task files ----------------------------------------------------------------------


def classify_task_scores(truths: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall (with the majority baseline) and per true label (`true_<label>`, its recall), each
    with the distribution of the answers given: a classify task's overall accuracy hides a class it never
    gets, so each class is shown."""
    chance = 1 / len(labels)
    out: dict[str, Any] = {}
    by_truth: dict[str, list[int]] = {label: [] for label in labels}
    for i, truth in enumerate(truths):
        by_truth.setdefault(truth, []).append(i)
    majority = max(len(v) for v in by_truth.values()) / len(truths)
    out["accuracy"] = proportion(sum(a == t for a, t in zip(answers, truths)), len(truths), chance,
                                 majority=round(majority, 4), answers=dict(Counter(answers).most_common()))
    for truth, indices in by_truth.items():
        out[f"true_{truth}"] = proportion(sum(answers[i] == truth for i in indices), len(indices), chance,
                                          answers=dict(Counter(answers[i] for i in indices).most_common()))
    return out


_COLOUR_WORDS = re.compile(r"\b({})\b".format("|".join(COLOURS)))
_SHAPE_WORDS = re.compile(r"\b({})s?\b".format("|".join(SHAPES)))


def caption_task_scores(scenes: Sequence[Scene], captions: Sequence[str]) -> dict[str, Any]:
    """Per caption: exact match; as many objects described as the scene holds; every colour named is in
    the scene; every shape named is in the scene; every true object's whole phrase found (all objects)."""
    rows = []
    for scene, caption in zip(scenes, captions):
        text = normalise(caption)
        colours, shapes = set(_COLOUR_WORDS.findall(text)), set(_SHAPE_WORDS.findall(text))
        rows.append({
            "exact": text == normalise(scene.caption()),
            "object_count": len(object_phrases(text)) == len(scene.objects),
            "colours_in_scene": bool(colours) and colours <= {o.colour for o in scene.objects},
            "shapes_in_scene": bool(shapes) and shapes <= {o.shape for o in scene.objects},
            "every_object": object_recall(scene.caption(), caption) == 1.0,
        })
    return {name: proportion(sum(r[name] for r in rows), len(rows)) for name in rows[0]} if rows else {}


# --- generation ----------------------------------------------------------------------------------


def _pixels(sample: Scene | Clip) -> np.ndarray:
    return sample.frames() if isinstance(sample, Clip) else sample.image()[None]


def _generate(model: Flamingo, transform, media: Sequence[np.ndarray], texts: Sequence[str],
              config: EvalConfig, max_new_tokens: int) -> list[str]:
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
                                    max_new_tokens=max_new_tokens)
            for i, text in zip(batch, model.decode(tokens[:, lang_x.shape[1]:])):
                out[i] = text
    return out
