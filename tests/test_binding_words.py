"""jobs/binding_words.py: each word family changes one thing against training's words, and the script prints
one row per family and per pair of shapes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.evaluate import is_training_word
from training.synthetic import nonsense_words

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "binding_words.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("binding_words", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_family_changes_what_its_name_says():
    families = _load_script().FAMILIES
    training_letters = set("".join(nonsense_words(0, 2000)))
    drawn = {name: family(np.random.default_rng(0), 300) for name, family in families.items()}
    assert all(is_training_word(w) for w in drawn["training's generator"])
    other_lengths = drawn["training's letters, 1 or 3 syllables"]
    assert not any(is_training_word(w) for w in other_lengths) and set("".join(other_lengths)) <= training_letters
    for name in ("new onsets (c, h, j, y, sh, qu, ...)", "new vowels (ee, oo, ai, ou, y)"):
        assert all(len(w) >= 5 and not is_training_word(w) for w in drawn[name]), name
    assert all(set(w) - training_letters for w in drawn["new onsets (c, h, j, y, sh, qu, ...)"])


def test_the_script_prints_every_family_and_pair(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--episodes", "2", "--pair-episodes", "12", "--shots", "1",
                             "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cell = r"(\d\.\d\d) \[\d\.\d\d,\d\.\d\d\]"
    rows = [line for line in result.stdout.splitlines() if len(re.findall(cell, line)) == 2]
    assert len(rows) == len(_load_script().FAMILIES)
    pairs = re.findall(r"^  (\w+) / (\w+)\s+" + cell + r"  n = (\d+)$", result.stdout, flags=re.M)
    assert pairs and sum(int(n) for *_, n in pairs) == 12
    assert all(a < b for a, b, *_ in pairs)
