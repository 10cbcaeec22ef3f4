"""Write a gold set of held-out synthetic scenes for the example tasks, to score them with `flamingo-annotate
evaluate`; with `--demos`, draw the demonstration images of `has_red.yaml` and `binding.yaml` instead.

    python jobs/make_gold.py out/gold --items 240
    flamingo-annotate evaluate jobs/tasks/*.yaml --gold out/gold/gold.csv --json out/gold/report.json

The scenes are PNG files under DIR/images/, and DIR/gold.csv (and gold.parquet, the same rows) has one row
per (item, task): `item` (the file, relative to the gold file), `task` and `answer` (and DIR/gold_TASK.csv
holds one task's rows, without the task column):
  count     the number of shapes as a word (one, two, three);
  caption   the scene's caption as training.synthetic writes it;
  has_red   yes when a red shape is in the scene, else no;
  binding   single-shape scenes of a circle or a star (any colour), answered with the nonsense word the
            task's demonstrations bind to that shape ('dovax.' or 'kimet.'); no other scene has this task.
Held out: every scene's numpy seed sequence starts (seed, EVAL_STREAM, GOLD_PART, ...) as
training.evaluate.eval_seed builds it, a stream no training draw uses and no part that `eval` uses
(its parts are 0-4). Demonstrations come from (DEMO_SEED, i), as jobs/make_demo_media.py's do.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from training.evaluate import BINDING_WORDS, NUMBER_WORDS, eval_seed, has_red
from training.synthetic import Scene, make_scene

JOBS_DIR = Path(__file__).resolve().parent
DEMOS_DIR = JOBS_DIR / "tasks" / "demos"
GOLD_PART = 100            # parts of the evaluation's seed sequences that `eval` (0-4) does not use
DEMO_SEED = 1001           # make_demo_media.py draws from (1000, i)


def find_scenes(start: int, count: int, want: Callable[[Scene], bool], *,
                max_objects: int = 3) -> list[tuple[int, Scene]]:
    """The first `count` scenes from seeds (DEMO_SEED, start + i) that `want` accepts."""
    found: list[tuple[int, Scene]] = []
    i = start
    while len(found) < count:
        scene = make_scene((DEMO_SEED, i), max_objects=max_objects)
        if want(scene):
            found.append((i, scene))
        i += 1
    return found


def draw_demos() -> None:
    """has_red: two scenes with a red shape, two without; binding: two circles and two stars, one shape
    each, the circles in the same colours and sizes as the stars (a large red one, a small blue one), so
    that only the shape tells the words apart."""
    def lone(shape: str, colour: str, size: str) -> Callable[[Scene], bool]:
        return lambda s: (s.objects[0].shape, s.objects[0].colour, s.objects[0].size) == (shape, colour, size)

    demos = {
        "red_yes": find_scenes(0, 2, lambda s: has_red(s) == "yes" and len(s.objects) > 1),
        "red_no": find_scenes(0, 2, lambda s: has_red(s) == "no"),
        **{shape: [*find_scenes(0, 1, lone(shape, "red", "large"), max_objects=1),
                   *find_scenes(0, 1, lone(shape, "blue", "small"), max_objects=1)]
           for shape in BINDING_WORDS},
    }
    for kind, scenes in demos.items():
        for j, (seed, scene) in enumerate(scenes, start=1):
            (DEMOS_DIR / f"{kind}_{j}.png").write_bytes(scene.png())
            print(f"demos/{kind}_{j}.png: seed ({DEMO_SEED}, {seed}): {scene.caption()}")


def write_gold(folder: Path, items: int, seed: int = 0) -> list[dict[str, str]]:
    """`items` scenes for count, caption and has_red, and `items` single-shape scenes for binding."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for i in range(items):
        scene = make_scene(eval_seed(seed, GOLD_PART, 0, i))
        name = f"images/scene_{i:05d}.png"
        (folder / name).write_bytes(scene.png())
        rows += [{"item": name, "task": "count", "answer": NUMBER_WORDS[len(scene.objects)]},
                 {"item": name, "task": "caption", "answer": scene.caption()},
                 {"item": name, "task": "has_red", "answer": has_red(scene)}]
    found, draw = 0, 0
    while found < items:
        scene = make_scene(eval_seed(seed, GOLD_PART, 1, draw), max_objects=1)
        draw += 1
        shape = scene.objects[0].shape
        if shape in BINDING_WORDS:
            name = f"images/single_{found:05d}.png"
            (folder / name).write_bytes(scene.png())
            rows.append({"item": name, "task": "binding", "answer": f"{BINDING_WORDS[shape]}."})
            found += 1
    with open(folder / "gold.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["item", "task", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), folder / "gold.parquet")
    for task in dict.fromkeys(row["task"] for row in rows):   # one task's rows, to evaluate it on its own
        with open(folder / f"gold_{task}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["item", "answer"])
            writer.writeheader()
            writer.writerows({"item": r["item"], "answer": r["answer"]} for r in rows if r["task"] == task)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="out/gold")
    parser.add_argument("--items", type=int, default=240, help="scenes per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demos", action="store_true", help="draw the new tasks' demonstration images instead")
    args = parser.parse_args()
    if args.demos:
        draw_demos()
        return
    rows = write_gold(Path(args.folder), args.items, args.seed)
    print(f"wrote {len(rows)} gold rows to {args.folder}/gold.csv and gold.parquet")


if __name__ == "__main__":
    main()
