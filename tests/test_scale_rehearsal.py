"""The scale rehearsal (jobs/scale_rehearsal.py) and its stand-in actors (pipeline/stand_in.py).

The stand-ins must behave as the real actors do in everything but the model, or the rehearsal measures another
job: the first tests hold their row handling to the real actors' (resumed tasks left out, error rows passed
through, the output schema), and hold their processes clear of torch, whose few hundred MB per actor would bound
the pool the rehearsal can hold; then the utilisation arithmetic, against hand-made intervals. The last runs the
rehearsal itself at toy sizes, in a child process (it starts a multi-node cluster of its own) against the
session's moto server, bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pyarrow as pa
import pytest

from pipeline.annotator_spec import AnnotatorSpec
from pipeline.stand_in import STAND_IN_MODEL, TOKENS_SHAPE, busy_intervals, stand_in_actors, utilisation
from pipeline.task import load_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_the_stand_in_annotator_keeps_the_real_row_handling(tmp_path: Path) -> None:
    task_file = tmp_path / "t.yaml"
    task_file.write_text("name: t\nkind: generate\nquery: 'Caption:'\n")
    tasks = tuple(load_tasks([str(task_file)]))
    _, annotator_class = stand_in_actors(0.01)
    annotator = annotator_class(AnnotatorSpec(model="tiny-random", trust_remote_code=False, tasks=tasks))
    row = {"source": "s3://b/x.parquet", "error": None, "error_kind": None, "visual": b"\0" * 32,
           "visual_shape": [1, 8], "visual_dtype": "float32", "done_tasks": None, "metadata": None}
    batch = pa.Table.from_pylist([
        {**row, "id": "ok"},
        {**row, "id": "bad", "error": "cannot decode image: x", "error_kind": "input", "visual": None},
        {**row, "id": "done", "done_tasks": ["t"]},
    ])
    out = annotator(batch).to_pylist()
    by_id = {r["id"]: r for r in out}
    assert set(by_id) == {"ok", "bad"}                      # the item done for the task is not annotated again
    assert by_id["bad"]["error"] == "cannot decode image: x" and by_id["bad"]["error_kind"] == "input"
    assert by_id["ok"]["error"] is None and by_id["ok"]["model"] == STAND_IN_MODEL
    assert by_id["ok"]["annotation"].startswith("stand-in ") and by_id["ok"]["seconds"] == 0.01
    spans = busy_intervals(pa.array([r["annotation"] for r in out]))
    (start, end), = next(iter(spans.values()))
    assert end - start >= 0.009                              # one item slept for (ms in the text)


def test_the_stand_in_encoder_keeps_the_real_row_handling() -> None:
    encoder_class, _ = stand_in_actors(0.01, vision_item_seconds=0.001)
    encoder = encoder_class("tiny-random", device=None, trust_remote_code=False, dtype="auto")
    pixels = np.zeros((1, 3, 4, 4), np.uint8)
    row = {"source": "s3://b/x.parquet", "error": None, "pixels": pixels.tobytes(), "pixels_shape": [1, 3, 4, 4],
           "pixels_dtype": "uint8"}
    batch = pa.Table.from_pylist([
        {**row, "id": "ok"},
        {**row, "id": "bad", "error": "cannot decode image: x", "pixels": None, "pixels_shape": None,
         "pixels_dtype": None},
        {**row, "id": "float", "pixels_dtype": "float16"},
    ])
    out = encoder(batch)
    assert "pixels" not in out.column_names and out.column("source").to_pylist() == ["s3://b/x.parquet"] * 3
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["ok"]["error"] is None and by_id["ok"]["visual_shape"] == list(TOKENS_SHAPE)
    assert np.frombuffer(by_id["ok"]["visual"], np.float32).tolist() == [0.0] * 8
    assert by_id["bad"]["error"] == "cannot decode image: x" and by_id["bad"]["visual"] is None
    assert by_id["float"]["error"].startswith("pixels of unknown encoding 'float16'")


def test_the_stand_ins_do_not_import_torch(tmp_path: Path) -> None:
    """Neither importing them nor what a Ray actor does with them (unpickling the classes and the spec the job
    sends, then calling them on a batch) brings torch into the process. Each check in a fresh interpreter."""
    check = "import pipeline.stand_in, sys; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]

    task_file = tmp_path / "t.yaml"
    task_file.write_text("name: t\nkind: generate\nquery: 'Caption:'\n")
    spec = AnnotatorSpec(model="tiny-random", trust_remote_code=False, tasks=tuple(load_tasks([str(task_file)])))
    pixels = np.zeros((1, 3, 4, 4), np.uint8)
    batch = pa.Table.from_pylist([{"id": "a", "source": "s", "error": None, "error_kind": None, "metadata": None,
                                   "done_tasks": None, "pixels": pixels.tobytes(), "pixels_shape": [1, 3, 4, 4],
                                   "pixels_dtype": "uint8"}])
    actor = ("import pickle, sys\n"
             "encoder, annotator, spec, batch = pickle.loads(sys.stdin.buffer.read())\n"
             "rows = annotator(spec)(encoder('tiny-random')(batch)).to_pylist()\n"
             "assert [r['model'] for r in rows] == ['stand-in'], rows\n"
             "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n")
    sent = cloudpickle.dumps((*stand_in_actors(0.001), spec, batch))
    run = subprocess.run([sys.executable, "-c", actor], cwd=ROOT, input=sent, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-3000:]


def test_utilisation_counts_busy_time_in_the_steady_window() -> None:
    # Actor a is busy 0-10 and 10-20; b starts at 5 and is idle 10-15, busy 15-25. Window: 5 (b's first start)
    # to 20 (a's last end): a busy 15 s of 15, b 5 + 5 = 10 s of 15.
    figures = utilisation({"a": [(0.0, 10.0), (10.0, 20.0)], "b": [(5.0, 10.0), (15.0, 25.0)]}, pool_size=2)
    assert figures == {"actors_used": 2, "window_s": 15.0, "start_spread_s": 5.0, "utilisation": round(25 / 30, 4)}
    # a third actor that never got work is idle for the whole window
    assert utilisation({"a": [(0.0, 10.0), (10.0, 20.0)], "b": [(5.0, 10.0), (15.0, 25.0)]},
                       pool_size=3)["utilisation"] == round(25 / 45, 4)
    assert utilisation({}, pool_size=1)["utilisation"] is None


@pytest.mark.slow
def test_the_rehearsal_runs_the_job_at_toy_sizes(s3, tmp_path: Path) -> None:
    result_file = tmp_path / "rehearsal.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    run = subprocess.run([sys.executable, "jobs/scale_rehearsal.py", "--small", "--endpoint", s3.endpoint,
                          "--json", str(result_file)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert "utilisation" in run.stdout and "listing" in run.stdout     # the table was printed

    assert result["read"]["items"] == result["pool_input"]["items"]
    (pool,) = result["pools"]
    assert pool["pool"] == 2 and pool["actors_used"] == 2
    assert pool["items"] == 2 * 3 * 8 and pool["rows_ok"] == pool["items"] and pool["rows_error"] == 0
    assert 0.5 < pool["utilisation"] <= 1.0 and pool["output_files"] >= 1

    fresh, resumed = result["resume"]
    remaining = 2 * 50
    assert (fresh["done_items"], fresh["skipped"], fresh["items"]) == (0, 0, remaining)
    # finished shards come from their manifests: skipped without being read, only the remaining work is done
    assert (resumed["done_items"], resumed["skipped"], resumed["items"]) == (400, 400, remaining)
    assert all(r["startup_s"] > 0 and r["driver_peak_rss_mb"] > 0 for r in result["resume"])

    assert result["listing"]["objects"] == 300
