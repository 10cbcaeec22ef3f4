"""jobs/existence_cue.py: existence answers split by whether a cue colour is in the scene."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import existence_cue  # noqa: E402

from training.evaluate import EvalConfig  # noqa: E402
from training.synthetic import COLOURS  # noqa: E402


def test_questions_are_true_and_grouped_by_the_neighbour_colour():
    names = list(COLOURS)
    items = existence_cue.questions(EvalConfig(), 200)
    for scene, qa, group in items:
        colour = re.fullmatch(r"Question: Is there a (\w+) shape\? Answer:", qa.prompt).group(1)
        present = {thing.colour for thing in scene.objects}
        assert qa.answer == ("yes" if colour in present else "no")
        neighbour = names[names.index(colour) - 1]
        assert group == ("yes" if colour in present else
                         f"no, neighbour {'present' if neighbour in present else 'absent'}")
    assert set(Counter(group for *_, group in items)) == {"yes", "no, neighbour present", "no, neighbour absent"}
    asked = Counter(qa.question for _, qa, _ in items)
    assert len(asked) == len(COLOURS) and set(asked.values()) == {40}    # every colour as often


def test_the_job_prints_a_row_per_group(capsys):
    existence_cue.main(["--model", "tiny-random", "--scenes", "10"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert sum(int(row.rsplit("n=", 1)[1]) for row in rows if "all colours" in row) == 10
    assert all(re.search(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", row) for row in rows)
