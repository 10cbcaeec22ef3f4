"""The attention diagnostic (training/attention_spread.py) tells a cross-attention that reads the same visual
tokens whatever a question asks from one whose reading follows the question."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import flamingo
from training.attention_spread import main, spread, two_shape_scenes


def with_queries_scaled(model: flamingo.Flamingo, scale: float) -> flamingo.Flamingo:
    with torch.no_grad():
        for block in model.gated_cross_attn_layers():
            block.attn.to_q.weight.mul_(scale)
    return model


def test_scenes_hold_two_different_shapes_and_are_reproducible():
    drawn = two_shape_scenes(30)
    assert all(a != b and {a, b} <= {o.shape for o in s.objects} for s, a, b in drawn)
    assert all(len({o.shape for o in s.objects}) == len(s.objects) >= 2 for s, _, _ in drawn)
    assert [s.objects for s, _, _ in drawn] == [s.objects for s, _, _ in two_shape_scenes(30)]


def test_attention_with_zero_queries_is_uniform_and_reads_nothing_from_the_question():
    model = with_queries_scaled(flamingo.load_model("tiny-random"), 0.0)
    rows = spread(model, scenes=8)
    n = model.config.num_latents
    assert len(rows) == len(model.gated_cross_attn_layers())
    for row in rows:
        assert row["entropy"] == pytest.approx(math.log(n), abs=1e-5) == row["uniform_entropy"]
        assert row["top_weight"] == pytest.approx(1 / n, abs=1e-6)
        assert row["other_question"] == pytest.approx(0, abs=1e-6)
        assert row["other_image"] == pytest.approx(0, abs=1e-6)


def test_sharp_queries_narrow_the_attention_and_follow_the_question(tmp_path: Path, capsys):
    model = with_queries_scaled(flamingo.load_model("tiny-random"), 30.0)
    model.save_pretrained(tmp_path / "sharp")
    out = tmp_path / "spread.json"
    rows = main([str(tmp_path / "sharp"), "--scenes", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    n = model.config.num_latents
    assert all(row["entropy"] < 0.8 * math.log(n) for row in rows)
    # The first block sits before the first decoder layer: at the last position it sees only the embedding
    # of the prompt's last token, the same for every question. Past that layer the hidden state depends on the
    # shape asked about (if only a little in a random LM).
    assert rows[0]["other_question"] == pytest.approx(0, abs=1e-6)
    assert all(row["other_question"] > 1e-3 for row in rows[1:])
    assert all(row["other_image"] > 0.02 for row in rows)   # the keys come from the image
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["block", "entropy"]
