"""Train a model's bridges on questions of one kind about scenes of 2-3 objects, and watch whether it learns
to answer about the object the question names (docs/several-objects.md, "The cross-attention stops looking").

    python jobs/question_focus.py --attributes colour              # the bundled model as it is
    python jobs/question_focus.py --attributes colour --reset      # its query projections re-drawn first

Every `--every` steps it prints the accuracy on the evaluation's held-out questions of those attributes about
scenes of 2-3 objects (`training.evaluate.qa_items`, as `flamingo-annotate eval` asks them, with its Wilson 95%
interval), and at the end where the cross-attention looks (`training.attention_spread`). Training episodes are
2-3 scenes of 2-3 objects, each followed by one question of those attributes; the loss is on the answers only
(`Episode.given`), the recipe's optimiser settings otherwise (lr 1e-3, 50 warm-up steps, cosine to 0.1).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from flamingo import Flamingo, load_model
from training.attention_spread import spread, table
from training.bridges import BridgeTrainer, OptimSettings, reset_attention_queries
from training.config import TrainConfig
from training.evaluate import QA_CHANCE, EvalConfig, answer_questions, qa_items, qa_score
from training.sequences import Batch, Episode, asked, collate, encode_episode, image_transform
from training.synthetic import QA, Clip, Scene, make_scene

BATCH_SIZE = 8
SEED = 777   # training draws: (SEED, step), apart from the recipe's and the evaluation's


def episode(rng: np.random.Generator, attributes: Sequence[str], full_loss: bool) -> Episode:
    """2-3 scenes of 2-3 objects, each followed by one of its questions of `attributes`."""
    media: list[np.ndarray] = []
    texts: list[str] = []
    given: list[str] = []
    wanted = int(rng.integers(2, 4))
    while len(texts) < wanted:
        scene = make_scene(rng, max_objects=3)
        questions = asked(scene, attributes, rng)
        if len(scene.objects) < 2 or not questions:
            continue
        qa = questions[int(rng.integers(len(questions)))]
        media.append(scene.image()[None])
        given.append(qa.prompt)
        texts.append(f"{qa.prompt} {qa.answer}")
    return Episode(tuple(media), tuple(texts), "qa", () if full_loss else tuple(given))


def held_out_questions(attributes: Sequence[str]) -> dict[str, list[tuple[Scene | Clip, QA]]]:
    """The evaluation's questions of each attribute about scenes of 2-3 objects."""
    items = qa_items(EvalConfig())
    return {a: [(sample, qa) for sample, qa in items[a] if len(sample.objects) > 1] for a in attributes}


def held_out_accuracy(model: Flamingo, held_out: dict[str, list[tuple[Scene | Clip, QA]]]) -> dict[str, dict]:
    """Greedy answers to `held_out_questions`, exact match, as `flamingo-annotate eval` scores them."""
    model.eval()
    transform, config = image_transform(model), EvalConfig()
    result = {}
    for attribute, pairs in held_out.items():
        answers = answer_questions(model, transform, pairs, config)
        result[attribute] = qa_score([qa for _, qa in pairs], answers, QA_CHANCE[attribute])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="miniature")
    parser.add_argument("--attributes", default="colour",
                        help="comma-separated: colour, shape, size, position, existence")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--reset", action="store_true", help="re-draw the query projections first (reset_queries)")
    parser.add_argument("--full-loss", action="store_true", help="loss on the questions' words too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", help="write the trained model here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attributes = args.attributes.split(",")

    model = load_model(args.model)
    if args.reset:
        reset_attention_queries(model)
    settings = TrainConfig(model=args.model, checkpoint_dir="", output_dir="", steps=args.steps, lr=1e-3,
                           warmup_steps=50, min_lr_ratio=0.1)
    trainer = BridgeTrainer(model, OptimSettings.from_config(settings))
    transform = image_transform(model)
    held_out = held_out_questions(attributes)

    def batch(step: int) -> Batch:
        rng = np.random.default_rng((SEED, step))
        examples = [encode_episode(model, episode(rng, attributes, args.full_loss), transform, 384)
                    for _ in range(BATCH_SIZE)]
        return collate(examples, model.tokenizer.pad_token_id, model.media_token_id)

    def report(step: int, losses: list[float]) -> None:
        figures = "  ".join(f"{a} {p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] n={p['n']}"
                            for a, p in held_out_accuracy(model, held_out).items())
        loss = f"  loss {np.mean(losses):.3f}" if losses else ""
        print(f"step {step:5d}{loss}  {figures}", flush=True)

    report(0, [])
    losses: list[float] = []
    for metrics in trainer.run(batch, args.steps):
        losses.append(metrics["loss"])
        if metrics["step"] % args.every == 0:
            report(int(metrics["step"]), losses[-args.every:])
    print(table(spread(model)))
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
