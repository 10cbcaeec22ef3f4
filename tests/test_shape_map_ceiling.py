"""jobs/shape_map_ceiling.py: trains the named tower on the shape map and scores its object patches, by size."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "shape_map_ceiling.py"


def test_the_ceiling_script_scores_small_and_large_objects_patches():
    out = subprocess.run([sys.executable, str(SCRIPT), "stem", "--steps", "3", "--scenes", "64",
                          "--stem", "[[16, 3, 2], [32, 3, 2], [128, 3, 2]]"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    found = re.search(r"stem, 3 steps: object patches naming their shape: small ([\d.]+) \(n = (\d+) patches\), "
                      r"large ([\d.]+) \(n = (\d+) patches\)", out)
    assert found, out
    assert 0 <= float(found[1]) <= 1 and 0 <= float(found[3]) <= 1
    assert int(found[2]) > 20 and int(found[4]) > 20      # about 60 one-object scenes, 2-9 patches each
