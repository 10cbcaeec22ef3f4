"""What the model actors do to rows apart from the model (pipeline/actor_rows.py): a model call that fails makes
error rows of its batch, of kind `model`, and the job goes on; results are matched to rows by position, and
every row that is not done for a task gets exactly one output row for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from media.errors import INPUT, MODEL
from pipeline.actor_rows import ROWS_SCHEMA, VisualTokens, annotate_rows, encode_rows
from pipeline.task import Task, load_tasks


@pytest.fixture
def tasks(tmp_path: Path) -> list[Task]:
    for name in ("first", "second"):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nkind: generate\nquery: 'Caption:'\n")
    return load_tasks([str(tmp_path / "first.yaml"), str(tmp_path / "second.yaml")])


def decoded(*shapes: list[int]) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"item{i}", "error": None, "pixels": np.full(shape, i, np.uint8).tobytes(),
                                  "pixels_shape": shape, "pixels_dtype": "uint8"} for i, shape in enumerate(shapes)])


def test_items_of_one_shape_are_encoded_together_and_a_failed_call_makes_error_rows() -> None:
    calls = []

    def encode(pixels: np.ndarray) -> list[VisualTokens]:
        calls.append(pixels.shape)
        if pixels.shape[1] == 8:
            raise RuntimeError("out of memory")
        return [VisualTokens(bytes([int(p.max())]), [1, 1], "float32") for p in pixels]

    out = encode_rows(decoded([1, 3, 2, 2], [8, 3, 2, 2], [1, 3, 2, 2]), encode).to_pylist()
    assert sorted(calls) == [(1, 8, 3, 2, 2), (2, 1, 3, 2, 2)]          # the two images in one call, the clip apart
    assert [r["visual"] for r in out] == [b"\0", None, b"\2"]            # each item's own tokens, by position
    assert out[1]["error"] == "vision encoder failed: RuntimeError: out of memory"


def test_a_failed_generation_makes_model_error_rows_and_every_row_gets_one_per_task(tasks: list[Task]) -> None:
    row = {"source": "s", "error": None, "error_kind": None, "visual": b"v", "visual_shape": [1, 1],
           "visual_dtype": "float32", "done_tasks": None, "metadata": None}
    batch = pa.Table.from_pylist([{**row, "id": "a"}, {**row, "id": "b", "done_tasks": ["second"]},
                                  {**row, "id": "c", "error": "cannot decode image: x", "error_kind": INPUT,
                                   "visual": None}])

    def annotate(index: int, rows: list[dict]) -> list[dict]:
        if tasks[index].name == "second":
            raise ValueError("bad batch")
        return [{"annotation": f"caption of {r['id']}"} for r in rows]

    out = annotate_rows(batch, tasks, "some-model", annotate)
    assert out.schema == ROWS_SCHEMA
    rows = {(r["id"], r["task"]): r for r in out.to_pylist()}
    assert set(rows) == {("a", "first"), ("b", "first"), ("c", "first"), ("a", "second"), ("c", "second")}
    assert rows["b", "first"]["annotation"] == "caption of b" and rows["b", "first"]["model"] == "some-model"
    assert rows["a", "first"]["error"] is None and rows["a", "first"]["seconds"] >= 0
    assert (rows["a", "second"]["error"], rows["a", "second"]["error_kind"]) == (
        "generation failed: ValueError: bad batch", MODEL)
    assert (rows["c", "second"]["error"], rows["c", "second"]["error_kind"]) == ("cannot decode image: x", INPUT)
