"""jobs/question_focus.py: one kind of question about scenes of 2-3 objects, answers-only loss, held-out figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import flamingo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import question_focus  # noqa: E402


def test_episodes_ask_only_the_chosen_kind_and_score_only_the_answers():
    rng = np.random.default_rng(0)
    for _ in range(20):
        episode = question_focus.episode(rng, ["colour"], full_loss=False)
        assert 2 <= len(episode.texts) == len(episode.media) <= 3
        for text, given in zip(episode.texts, episode.given):
            assert text.startswith("Question: What colour is ") and given == text.rsplit(" ", 1)[0]
    assert question_focus.episode(rng, ["colour"], full_loss=True).given == ()


def test_the_job_trains_reports_and_saves(tmp_path: Path, capsys):
    question_focus.main(["--model", "tiny-random", "--steps", "2", "--every", "1", "--threads", "1", "--reset",
                         "--save", str(tmp_path / "model")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["0", "1", "2"]
    assert all(" colour " in line and "n=" in line for line in lines[:3])
    assert lines[3].split()[:2] == ["block", "entropy"]
    trained, start = flamingo.load_model(str(tmp_path / "model")), flamingo.load_model("tiny-random")
    changed = {n for (n, a), b in zip(trained.state_dict().items(), start.state_dict().values())
               if not torch.equal(a, b)}
    assert any(n.endswith("attn.to_q.weight") for n in changed)
    assert not any(n.startswith("vision_encoder.") for n in changed)      # the backbones stay frozen
