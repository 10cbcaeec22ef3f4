"""The evaluation: its scoring rules on known answers, the no-vision control, and the command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import flamingo
from flamingo_annotate.cli import main
from training.evaluate import caption_scores, gates_closed, object_phrases, qa_scores
from training.synthetic import QA, make_scene


def test_caption_scores_count_whole_object_phrases():
    scene = next(s for s in (make_scene(i) for i in range(100)) if len(s.objects) == 2)
    first, second = object_phrases(scene.caption())
    assert scene.caption() == f"{first} and {second}."
    wrong_colour = second.replace(scene.objects[1].colour, "green" if scene.objects[1].colour != "green" else "red")
    scores = caption_scores([(scene, scene.caption().upper()), (scene, f"{first} and {wrong_colour}.")])
    assert scores == {"exact": 0.5, "object_recall": 0.75, "count": 2.0}


def test_qa_scores_are_exact_matches_per_attribute():
    questions = [QA("What colour is the circle?", "red", "colour"), QA("What colour is the star?", "blue", "colour"),
                 QA("How many shapes are there?", "two", "count")]
    scores = qa_scores(questions, ["Red.", "red", "two"])
    assert scores["colour"] == {"accuracy": 0.5, "count": 2.0}
    assert scores["count"]["accuracy"] == 1.0 and scores["all"]["accuracy"] == pytest.approx(2 / 3)


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


def test_eval_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--model", "tiny-random", "--scenes", "2", "--clips", "1",
                                       "--episodes", "2", "--shots", "0,2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "binding shapes, any colour, 2-way (chance 0.50)" in result.output
    assert "binding colour + shape pairs" in result.output and "gates forced to 0" in result.output
    report = json.loads(out.read_text())
    assert set(report["binding"]) == {"shape", "colour_shape"} and report["binding_chance"] == 0.5
    assert set(report["binding"]["shape"]["gates_closed"]) == {"0", "2"}
