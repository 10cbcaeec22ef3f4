"""Does a model answer 'Is there a red shape?' by looking for red, or by a cue elsewhere in the scene?

    python jobs/existence_cue.py                      # the bundled model
    python jobs/existence_cue.py --model out/miniature/stage3/phase6/model

Asks each of `--scenes` held-out scenes about one colour (the colours in turn, so each is asked as often)
and splits the accuracy by the truth: 'yes' (the colour is there), and 'no' with the colour before it in
`COLOURS` order (cyclic: purple before red) present or absent. Training once drew its 'no' questions as the
next absent colour after a present one, so every 'no' it saw had that neighbour in the scene; a model that
learnt the cue answers the two 'no' rows differently (docs/existence.md). Accuracy is exact match of the greedy
answer, as `flamingo-annotate eval` scores it, with its Wilson 95% interval. The scenes are drawn from a stream
of their own (`training.evaluate.eval_seed`), apart from training's and the evaluation's other draws.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence

import torch

from flamingo import DEFAULT_MODEL, load_model
from training.evaluate import EvalConfig, answer_questions, eval_seed, normalise, proportion
from training.sequences import image_transform
from training.synthetic import COLOURS, EXISTENCE_TEMPLATES, QA, Scene, make_scene

STREAM = 101   # eval_seed part: not the evaluation's (0-4), the gold set's or the probes' (100, 102)


def questions(config: EvalConfig, scenes: int) -> list[tuple[Scene, QA, str]]:
    """(scene, question, group): scene i is asked about colour i mod 5; the group is 'yes', 'no, neighbour
    present' or 'no, neighbour absent' (the neighbour: the colour before the asked one)."""
    names = list(COLOURS)
    items = []
    for i in range(scenes):
        scene = make_scene(eval_seed(config.seed, STREAM, i), image_size=config.image_size)
        present = {thing.colour for thing in scene.objects}
        colour, neighbour = names[i % len(names)], names[i % len(names) - 1]
        if colour in present:
            answer, group = "yes", "yes"
        else:
            answer, group = "no", f"no, neighbour {'present' if neighbour in present else 'absent'}"
        items.append((scene, QA(EXISTENCE_TEMPLATES["colour"].format(colour), answer, "existence"), group))
    return items


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--scenes", type=int, default=5000)   # >= 200 per row about red
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model).eval()
    config = EvalConfig()
    items = questions(config, args.scenes)
    with torch.no_grad():
        answers = answer_questions(model, image_transform(model), [(s, qa) for s, qa, _ in items], config)
    right: dict[str, list[bool]] = defaultdict(list)
    for (_, qa, group), answer in zip(items, answers):
        correct = normalise(answer) == normalise(qa.answer)
        right[f"all colours: {group}"].append(correct)
        if "red" in qa.question:
            right[f"red: {group}"].append(correct)
    print(f"{args.model}: 'Is there a <colour> shape?' on {args.scenes} held-out scenes")
    for group in sorted(right):
        p = proportion(sum(right[group]), len(right[group]))
        print(f"  {group:36s} {p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]  n={p['n']}")


if __name__ == "__main__":
    main()
