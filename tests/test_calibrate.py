"""Contextual calibration of classify tasks (`calibrate: true`; flamingo/calibration.py, pipeline/generate.py):
the arithmetic against a hand computation on the bundled model's own outputs, the direction it moves answers in
on held-out scenes of the world, and how task files ask for it. In-process, without Ray: the generation actor's
own class, as Ray would build it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.generate import Annotator, AnnotatorSpec
from pipeline.task import TaskError, load_task
from training.evaluate import eval_seed
from training.sequences import image_transform
from training.synthetic import make_scene

TASKS = Path(__file__).resolve().parents[1] / "jobs" / "tasks"
SCENES = 60           # held-out scenes of 1-3 shapes, drawn from a seed sequence no training or evaluation uses


# Asked zero-shot, the bundled model leans to " one" whatever the scene (p_cf about 0.7 of 3 labels).
ZERO_SHOT_COUNT = ("name: count_zero_shot\nkind: classify\nquery: \"Question: How many shapes are there? Answer:\"\n"
                   "labels: [\" one\", \" two\", \" three\"]\ncalibrate: true\n")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Annotator, torch.Tensor, list[tuple[Any, list]]]:
    """The actor with two calibrated tasks (count.yaml plus `calibrate: true`, and the zero-shot count), held-out
    scenes' visual tokens, and per task its prepared form and the rows it gives them."""
    folder = tmp_path_factory.mktemp("tasks")
    text = (TASKS / "count.yaml").read_text().replace("media: demos/", f"media: {TASKS}/demos/")
    (folder / "count.yaml").write_text(text + "calibrate: true\n")
    (folder / "zero_shot.yaml").write_text(ZERO_SHOT_COUNT)
    tasks = (load_task(folder / "count.yaml"), load_task(folder / "zero_shot.yaml"))
    annotator = Annotator(AnnotatorSpec(model="miniature", trust_remote_code=False, tasks=tasks))
    model = annotator.model
    transform = image_transform(model)
    scenes = [make_scene(eval_seed(0, 4245, i)) for i in range(SCENES)]
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.fromarray(s.image()))[None] for s in scenes])[:, None]
        visual = model.encode_vision(pixels)                                        # (N, 1, n, D)
        runs = [(prepared, annotator._classify(prepared, prepared.query_ids.expand(len(scenes), -1), visual))
                for prepared in annotator.tasks]
    return annotator, visual, runs


def test_calibrated_scores_are_the_hand_computed_reweighting(calibrated: tuple) -> None:
    annotator, visual, runs = calibrated
    prepared, rows = runs[0]                                     # count.yaml: a few-shot prefix
    model, task = annotator.model, prepared.task
    normalise = task.generation.length_normalize

    def label_probabilities(tokens: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            scores = model.score(prepared.query_ids.expand(len(tokens), -1), prepared.candidates,
                                 visual_tokens=tokens, prefix=prepared.prefix, length_normalize=normalise)
        e = np.exp(scores.double().numpy())
        return e / e.sum(1, keepdims=True)

    size = model.config.image_size
    with torch.inference_mode():
        mean_image = model.encode_vision(torch.zeros(1, 1, 1, 3, size, size))      # the normalised mean colour
    content_free = label_probabilities(torch.cat([mean_image, torch.zeros_like(mean_image)]))
    p_cf = content_free.mean(0)
    np.testing.assert_allclose(prepared.prior.numpy(), p_cf, rtol=1e-5)
    assert abs(p_cf.sum() - 1) < 1e-6

    p = label_probabilities(visual)
    q = p / p_cf
    q /= q.sum(1, keepdims=True)
    labels = [label.strip() for label in task.labels]
    with torch.inference_mode():
        raw = model.score(prepared.query_ids.expand(len(visual), -1), prepared.candidates, visual_tokens=visual,
                          prefix=prepared.prefix, length_normalize=normalise).double().numpy()
    for row, q_row, raw_row in zip(rows, q, raw):
        assert [e["label"] for e in row["label_scores"]] == labels
        np.testing.assert_allclose([e["score"] for e in row["label_scores"]], raw_row, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([e["calibrated"] for e in row["label_scores"]], np.log(q_row), atol=1e-5)
        assert row["annotation"] == labels[int(q_row.argmax())]
        assert row["score"] == pytest.approx(np.log(q_row.max()), abs=1e-5)


def test_calibration_moves_answers_away_from_the_labels_the_prompt_favours(calibrated: tuple) -> None:
    """On a prompt with a strong label bias, dividing by p_cf takes answers from the labels it favours to those
    it favours less, never the other way: the favourite gains none, the least favoured gains some."""
    prepared, rows = calibrated[2][1]                            # the zero-shot count
    assert prepared.prefix.length == 0
    labels = [label.strip() for label in prepared.task.labels]
    prior = dict(zip(labels, prepared.prior.tolist()))
    raw = [max(row["label_scores"], key=lambda e: e["score"])["label"] for row in rows]
    calibrated_answers = [row["annotation"] for row in rows]
    moved = [(r, c) for r, c in zip(raw, calibrated_answers) if r != c]
    assert moved, f"calibration changed no answer of {len(rows)}; prior {prior}"
    assert all(prior[c] < prior[r] for r, c in moved), (moved, prior)
    before, after = Counter(raw), Counter(calibrated_answers)
    favoured, least = max(prior, key=prior.__getitem__), min(prior, key=prior.__getitem__)
    assert after[favoured] <= before[favoured] and after[least] > before[least], (before, after, prior)


def test_calibrate_is_a_boolean_of_classify_tasks_and_part_of_the_hash(tmp_path: Path) -> None:
    base = "name: t\nkind: classify\nlabels: [\" yes\", \" no\"]\n"
    (tmp_path / "off.yaml").write_text(base)
    (tmp_path / "on.yaml").write_text(base + "calibrate: true\n")
    off, on = load_task(tmp_path / "off.yaml"), load_task(tmp_path / "on.yaml")
    assert (off.calibrate, on.calibrate) == (False, True) and off.sha256 != on.sha256
    (tmp_path / "word.yaml").write_text(base + "calibrate: \"yes please\"\n")
    (tmp_path / "generate.yaml").write_text("name: g\ncalibrate: true\n")
    for name, message in (("word", "calibrate: must be true or false, got str 'yes please'"),
                          ("generate", "calibrate: only classify tasks are calibrated")):
        with pytest.raises(TaskError) as error:
            load_task(tmp_path / f"{name}.yaml")
        assert str(error.value).startswith(f"{tmp_path / name}.yaml: {message}"), str(error.value)
