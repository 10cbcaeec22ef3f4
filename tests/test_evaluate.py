"""The evaluation: its statistics, what it draws, that the draws are held out, its scoring rules on known
answers, the no-vision control, and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import binomtest

import flamingo
from flamingo_annotate.cli import main
from training.evaluate import (
    CLIP_ATTRIBUTES,
    DEFAULT_TASKS,
    EVAL_STREAM,
    SCENE_ATTRIBUTES,
    EvalConfig,
    binding_episodes,
    by_object_count,
    caption_scores,
    caption_task_scores,
    classify_task_scores,
    eval_seed,
    gates_closed,
    is_training_word,
    object_phrases,
    proportion,
    qa_items,
    qa_scores,
    task_scenes,
    task_truth,
    wide_nonsense_words,
    wilson_interval,
)
from training.synthetic import QA, make_scene, nonsense_words

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (200, 200), (37, 200), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-9) and high == pytest.approx(expected.high, abs=1e-9)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(200, 200) == pytest.approx((0.9812, 1.0), abs=1e-4)
    figure = proportion(150, 200, 0.5)
    assert figure["accuracy"] == 0.75 and figure["n"] == 200 and figure["chance"] == 0.5
    assert figure["ci95"][0] < 0.75 < figure["ci95"][1]


def test_defaults_draw_at_least_200_per_figure():
    config = EvalConfig()
    items = qa_items(config)
    assert set(items) == set(SCENE_ATTRIBUTES + CLIP_ATTRIBUTES)
    for attribute, asked in items.items():
        assert len(asked) >= 200 and all(qa.attribute == attribute for _, qa in asked)
        assert len({id(sample) for sample, _ in asked}) == len(asked)      # one question per sample
    assert config.episodes >= 200 and config.task_items >= 200 and config.scenes >= 200
    assert set(config.words) == {"train", "wide"} and 0 in config.shots and max(config.shots) >= 8
    few = EvalConfig(episodes=5)
    assert len(binding_episodes(few, "shape", 4, "wide")) == 5


def test_wide_words_are_outside_the_training_distribution_on_the_same_images():
    rng = np.random.default_rng(0)
    trained = nonsense_words(rng, 500)
    assert all(is_training_word(w) for w in trained)
    wide = wide_nonsense_words(rng, 500)
    assert not any(is_training_word(w) for w in wide)
    assert len({len(w) for w in wide}) > len({len(w) for w in trained})
    assert set("".join(wide)) - set("".join(trained))          # letters training never used
    config = EvalConfig(episodes=3)
    for a, b in zip(binding_episodes(config, "colour_shape", 2, "train"),
                    binding_episodes(config, "colour_shape", 2, "wide")):
        assert a.support == b.support and a.query == b.query and a.categories == b.categories
        assert not set(a.words) & set(b.words)
        assert b.answer == b.words[a.words.index(a.answer)]
        assert [b.words[a.words.index(w)] for w in a.support_words] == list(b.support_words)


def _training_seed_states(seed: int = 0, streams: int = 8, indices: int = 3000) -> set[tuple[int, ...]]:
    """The seed-sequence states training draws from: (seed, stream, index), stream 0/1 in stages 1-2,
    the data-parallel rank in stage 3, index a batch or document number."""
    return {tuple(np.random.SeedSequence((seed, s, i)).generate_state(4)) for s in range(streams)
            for i in range(indices)}


def test_held_out_draws_never_share_a_seed_sequence_with_training():
    assert eval_seed(0, 1, 2) == (0, EVAL_STREAM, 1, 2) and EVAL_STREAM > 1000
    training = _training_seed_states(indices=1000)
    # Every kind of evaluation draw, first few of each (QA and tasks: attribute / task index first).
    drawn = ([eval_seed(0, part, i) for part in range(5) for i in range(200)]
             + [eval_seed(0, 2, a, i) for a in range(8) for i in range(200)]
             + [eval_seed(0, 3, c, s, i) for c in range(2) for s in (0, 1, 2, 4, 8) for i in range(50)])
    states = {tuple(np.random.SeedSequence(seed).generate_state(4)) for seed in drawn}
    assert len(states) == len(drawn) and not states & training
    # and the draws differ from training's where it matters: not one scene of training's first stream
    train_scenes = {make_scene((0, 0, i)).objects for i in range(300)}
    assert not train_scenes & {make_scene(eval_seed(0, 0, i)).objects for i in range(300)}


def test_caption_scores_count_whole_object_phrases():
    scene = next(s for s in (make_scene(i) for i in range(100)) if len(s.objects) == 2)
    first, second = object_phrases(scene.caption())
    assert scene.caption() == f"{first} and {second}."
    wrong_colour = second.replace(scene.objects[1].colour, "green" if scene.objects[1].colour != "green" else "red")
    scores = caption_scores([(scene, scene.caption().upper()), (scene, f"{first} and {wrong_colour}.")])
    assert scores["exact"]["correct"] == 1 and scores["exact"]["n"] == 2
    assert scores["object_recall"]["correct"] == 3 and scores["object_recall"]["n"] == 4
    task = caption_task_scores([scene, scene], [scene.caption(), f"{first} and {wrong_colour}."])
    assert task["exact"]["correct"] == 1 and task["object_count"]["correct"] == 2
    assert task["colours_in_scene"]["correct"] == (1 if {"green", "red"} - {o.colour for o in scene.objects} else 2)


def test_qa_scores_are_exact_matches_per_attribute_with_baselines():
    questions = [QA("What colour is the circle?", "red", "colour"), QA("What colour is the star?", "blue", "colour"),
                 QA("What colour is the square?", "red", "colour"), QA("How many shapes are there?", "two", "count")]
    scores = qa_scores(questions, ["Red.", "red", "red", "two"])
    colour = scores["colour"]
    assert (colour["correct"], colour["n"], colour["chance"]) == (2, 3, 0.2)
    assert colour["majority"] == pytest.approx(2 / 3, abs=1e-4)
    assert colour["top_answer"] == "red" and colour["top_answer_share"] == 1.0
    assert scores["count"]["accuracy"] == 1.0 and scores["all"]["accuracy"] == 0.75


def test_qa_is_split_by_how_many_objects_the_scene_holds():
    # A model that reads a lone object's position but not one among several: the split must show it.
    scenes = [make_scene(i) for i in range(40)]
    asked = [(s, next(qa for qa in s.qa() if qa.attribute == "count")) for s in scenes]
    answers = [qa.answer if len(s.objects) == 1 else "seven" for s, qa in asked]
    split = by_object_count(asked, answers, 1 / 3)
    sizes = {k: sum(len(s.objects) == int(k) for s in scenes) for k in split}
    assert set(split) == {"1", "2", "3"} and all(split[k]["n"] == sizes[k] for k in split)
    assert split["1"]["accuracy"] == 1.0 and split["2"]["correct"] == split["3"]["correct"] == 0


def test_classify_task_scores_per_class_and_label_bias():
    scenes = [make_scene(i) for i in range(30)]
    answers = ["one"] * 30                       # a model that always says 'one'
    scores = classify_task_scores([task_truth("count", s) for s in scenes], answers, ["one", "two", "three"])
    ones = sum(len(s.objects) == 1 for s in scenes)
    assert scores["accuracy"]["correct"] == ones and scores["accuracy"]["answers"] == {"one": 30}
    assert scores["true_one"]["accuracy"] == 1.0
    assert scores["true_two"]["correct"] == 0 and scores["true_three"]["correct"] == 0


def test_each_example_task_is_scored_against_the_scenes_it_asks_about():
    # binding.yaml binds its words to a circle and a star only: its scenes hold one of those, nothing else.
    config = EvalConfig(task_items=40)
    binding = task_scenes(config, 3, "binding")
    assert len(binding) == 40 and {len(s.objects) for s in binding} == {1}
    assert {s.objects[0].shape for s in binding} == {"circle", "star"}
    assert {task_truth("binding", s) for s in binding} == {"dovax.", "kimet."}
    assert all(task_truth("binding", s) == ("dovax." if s.objects[0].shape == "circle" else "kimet.") for s in binding)
    scenes = task_scenes(config, 2, "has_red")
    assert max(len(s.objects) for s in scenes) == 3 and scenes != task_scenes(config, 1, "count")
    assert [task_truth("has_red", s) for s in scenes] == [
        "yes" if "red" in [o.colour for o in s.objects] else "no" for s in scenes]
    assert {task_truth("has_red", s) for s in scenes} == {"yes", "no"}
    assert task_truth("caption", scenes[0]) is None


def test_gates_closed_gives_the_bare_lm_and_restores_the_gates():
    model = flamingo.load_model("tiny-random")      # gates open at 0.5
    before = [b.attn_gate.clone() for b in model.gated_cross_attn_layers()]
    lang_x, mask = model.tokenize(["<image>a red circle"])
    pixels = torch.randn(1, 1, 1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad(), gates_closed(model):
        closed = model(vision_x=pixels, lang_x=lang_x, attention_mask=mask).logits
        other = model(vision_x=torch.randn_like(pixels), lang_x=lang_x, attention_mask=mask).logits
    assert torch.equal(closed, other)               # the pixels no longer matter
    assert all(torch.equal(b.attn_gate, g) for b, g in zip(model.gated_cross_attn_layers(), before))


def test_the_eval_command_defaults_to_every_example_task():
    # The CLI spells DEFAULT_TASKS out (importing training at start-up is slow): the two must not drift.
    from flamingo_annotate.model_commands import evaluate as eval_command

    option = next(p for p in eval_command.params if p.name == "task_files")
    assert option.default == ",".join(DEFAULT_TASKS)


def test_eval_command_prints_intervals_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--scenes", "2", "--clips", "1",
                                       "--questions", "2", "--episodes", "2", "--shots", "0,2", "--task-items", "3",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "binding shapes, any colour, 2-way (chance 0.50)" in result.output
    assert "train words, gates at 0" in result.output and "wide words, with vision" in result.output
    assert "95% interval" in result.output and "chance" in result.output and "true three" in result.output
    report = json.loads(out.read_text())
    assert set(report["binding"]) == {"shape", "colour_shape"} and report["binding_chance"] == 0.5
    point = report["binding"]["shape"]["wide"]["gates_closed"]["2"]
    assert point["n"] == 2 and len(point["ci95"]) == 2 and point["chance"] == 0.5
    assert report["qa"]["position"]["n"] == 2 and report["qa"]["position"]["chance"] == pytest.approx(1 / 9, abs=1e-4)
    assert set(report["tasks"]) == {"caption", "count", "has_red", "binding"}
    assert all(report["tasks"][name]["accuracy"]["n"] == 3 for name in ("count", "has_red", "binding"))
    assert set(report["tasks"]["binding"]) == {"accuracy", "true_dovax.", "true_kimet."}
    assert "task has_red (held-out scenes)" in result.output and "true yes" in result.output
    assert "question answering by objects in the scene" in result.output
    split = report["qa"]["position"]["by_objects"]
    assert sum(p["n"] for p in split.values()) == 2 and "by_objects" not in report["qa"]["speed"]


def test_a_task_file_is_scored_by_the_name_inside_it_not_its_file_name(tmp_path):
    # binding.yaml saved as names.yaml is still the binding task: its scenes hold one circle or one star,
    # the only shapes its words name, so every scene has a truth.
    tasks = tmp_path / "tasks"
    shutil.copytree(PROJECT_ROOT / "jobs" / "tasks", tasks)
    (tasks / "binding.yaml").rename(tasks / "names.yaml")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--parts", "tasks", "--task-items", "12",
                                       "--tasks", str(tasks / "names.yaml"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["tasks"]["binding"]
    assert scores["accuracy"]["n"] == 12
    assert scores["true_dovax."]["n"] + scores["true_kimet."]["n"] == 12


def test_eval_refuses_bad_or_same_named_task_files_before_loading_the_model(tmp_path):
    # Scores are kept under each task's `name:`: a second file named `count` would silently replace the
    # first's scores. Both that and a broken file are refused before minutes of the other parts run.
    tasks = tmp_path / "tasks"
    shutil.copytree(PROJECT_ROOT / "jobs" / "tasks", tasks)
    (tasks / "count_again.yaml").write_text((tasks / "count.yaml").read_text().replace(
        "output_column: shapes", "output_column: shapes_again"))
    (tasks / "broken.yaml").write_text("name: broken\nkind: classify\nlabels: []\n")
    out = tmp_path / "eval.json"
    for files, problem in [((tasks / "count.yaml", tasks / "count_again.yaml"), "name"),
                           ((tasks / "broken.yaml",), "labels")]:
        result = CliRunner().invoke(main, ["eval", "--model", "no-such-model", "--parts", "tasks",
                                           "--tasks", ",".join(map(str, files)), "--json", str(out)])
        assert result.exit_code == 2, result.output
        assert f"{files[-1]}: {problem}: " in result.output
        assert "no-such-model" not in result.output      # refused before the model was looked up
        assert not out.exists()
