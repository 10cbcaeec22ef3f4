"""What decides whether a model binds a nonsense word: the word's letters, its length, or the shapes it names?

    python jobs/binding_words.py                       # the bundled model, 200 episodes per cell, 4 shots
    python jobs/binding_words.py --model out/miniature/model --shots 1

The evaluation's binding curve (training.evaluate) shows a model binding words like its training words and
failing on held-out ones, which differ from them in several ways at once. This runs the same episodes (same
images, same bindings) with words from families that each change one thing: the training generator's own
letters in other syllable counts, or its structure with onsets or vowels it never uses. Prints accuracy
with Wilson 95% intervals (chance 1 / ways) and the words' token counts; then the shape curve's episodes
(training's words) split by the pair of shapes bound, from `--pair-episodes` episodes: a pair the vision
tower cannot tell apart stays at chance however the words are drawn.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from training.evaluate import (
    EvalConfig,
    binding_choice,
    binding_episodes,
    proportion,
    rename_words,
    wide_nonsense_words,
)
from training.sequences import image_transform
from training.synthetic import _CODAS, _ONSETS, _VOWELS, BINDING_CATEGORIES, BindingEpisode, nonsense_words, pick

WordFamily = Callable[[np.random.Generator, int], tuple[str, ...]]

# onsets and vowels training.synthetic's generator (onset + vowel, twice, then a coda) never uses
NEW_ONSETS = ("c", "h", "j", "y", "ch", "sh", "th", "wh", "ph", "qu")
NEW_VOWELS = ("ee", "oo", "ai", "ou", "y")


def syllable_words(onsets: tuple[str, ...], vowels: tuple[str, ...], syllables: tuple[int, ...]) -> WordFamily:
    """Words of onset + vowel syllables (a number of them drawn from `syllables`) closed by a training coda."""
    def draw(rng: np.random.Generator, count: int) -> tuple[str, ...]:
        words: list[str] = []
        while len(words) < count:
            n = int(pick(rng, syllables))
            word = "".join(pick(rng, onsets) + pick(rng, vowels) for _ in range(n)) + pick(rng, _CODAS)
            if word not in words:
                words.append(word)
        return tuple(words)
    return draw


FAMILIES: dict[str, WordFamily] = {
    "training's generator": nonsense_words,
    "training's letters, 1 or 3 syllables": syllable_words(_ONSETS, _VOWELS, (1, 3)),
    "new onsets (c, h, j, y, sh, qu, ...)": syllable_words(NEW_ONSETS, _VOWELS, (2,)),
    "new vowels (ee, oo, ai, ou, y)": syllable_words(_ONSETS, NEW_VOWELS, (2,)),
    "the evaluation's wide words": wide_nonsense_words,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="miniature")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--pair-episodes", type=int, default=1200, help="shape episodes to split by pair")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    import flamingo

    if args.threads:
        torch.set_num_threads(args.threads)
    model = flamingo.load_model(args.model).eval()
    transform = image_transform(model)
    config = EvalConfig(episodes=args.episodes)

    def is_right(episode: BindingEpisode) -> bool:
        support = list(zip(episode.support_images(), episode.support_texts))
        with torch.no_grad():
            return binding_choice(model, transform, support, episode.query_image(), episode.words) == episode.answer

    print(f"{'words':40s}" + "".join(f"{c:>22s}" for c in BINDING_CATEGORIES) + "   tokens as ' word.'  e.g.")
    for name, family in FAMILIES.items():
        cells: list[str] = []
        drawn: list[str] = []
        for category in BINDING_CATEGORIES:
            hits = 0
            for i, episode in enumerate(binding_episodes(config, category, args.shots, "train")):
                episode = rename_words(episode, family(np.random.default_rng((config.seed, 31, i)), config.ways))
                drawn += episode.words
                hits += is_right(episode)
            p = proportion(hits, config.episodes, 1 / config.ways)
            cells.append(f"{p['accuracy']:.2f} [{p['ci95'][0]:.2f},{p['ci95'][1]:.2f}]")
        tokens = [len(model.tokenizer(f" {w}.", add_special_tokens=False)["input_ids"]) for w in drawn]
        print(f"{name:40s}" + "".join(f"{c:>22s}" for c in cells)
              + f"   {np.mean(tokens):4.1f}  {', '.join(drawn[:3])}", flush=True)
    print(f"{config.episodes} episodes per cell, {args.shots} shots per word, {config.ways} ways "
          f"(chance {1 / config.ways:.2f})")
    by_pair: dict[tuple[str, ...], list[bool]] = defaultdict(list)
    for episode in binding_episodes(replace(config, episodes=args.pair_episodes, ways=2), "shape", args.shots, "train"):
        by_pair[tuple(sorted(episode.categories))].append(is_right(episode))
    print(f"shapes, any colour, by pair ({args.shots} shots per word, training's words, chance 0.50):")
    for pair, right in sorted(by_pair.items()):
        p = proportion(sum(right), len(right), 0.5)
        print(f"  {' / '.join(pair):24s}{p['accuracy']:.2f} [{p['ci95'][0]:.2f},{p['ci95'][1]:.2f}]  n = {p['n']}")


if __name__ == "__main__":
    main()
