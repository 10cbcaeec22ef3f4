"""The whole job on a real local Ray instance with the tiny model: every input kind, bad items, resume,
S3 in and out, and rows that equal what the model library gives for the same item."""

from __future__ import annotations

import duckdb
import numpy as np
import open_clip
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from sample_media import MAX_ITEM_BYTES, image_bytes, input_tree

import flamingo
from media.decode import DecodeConfig, decode_item
from pipeline.job import JobConfig, run_job
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.task import load_task, load_tasks

pytestmark = pytest.mark.usefixtures("ray_session")

CAPTION = """name: caption
kind: generate
demonstrations:
  - {media: demo_red.png, text: "a red shape."}
  - {media: demo_blue.png, text: "a blue shape."}
query: "Output:"
generation: {max_new_tokens: 6}
"""
MODEL = "tiny-random"     # fast, and its open gates make every image change the output
COLOUR = """name: colour
kind: classify
demonstrations:
  - {media: demo_red.png, text: " red"}
labels: [" red", " blue", " green"]
query: "Colour:"
output_column: dominant_colour
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "demo_red.png").write_bytes(image_bytes((220, 20, 20)))
    (folder / "demo_blue.png").write_bytes(image_bytes((20, 20, 220)))
    (folder / "caption.yaml").write_text(CAPTION)
    (folder / "colour.yaml").write_text(COLOUR)
    return load_tasks([folder / "caption.yaml", folder / "colour.yaml"])


def job(tasks, input_uri, output_uri):
    """The job the tests run: the tiny model, `input_tree`'s size limit, no progress bars."""
    return JobConfig(tasks, str(input_uri), str(output_uri), model=MODEL, max_item_bytes=MAX_ITEM_BYTES,
                     progress=False)


def read_output(uri):
    return pq.read_table(uri).to_pandas()


def test_every_item_gets_exactly_one_row_per_task(tasks, tmp_path):
    expected = input_tree(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(job(tasks, tmp_path / "in", out))
    rows = read_output(out)
    assert len(rows) == 2 * len(expected)
    assert summary.rows_ok + summary.rows_error == len(rows) and summary.items == len(expected)
    assert set(rows.run_id) == {summary.run_id}
    assert rows.error_kind.isna().equals(rows.error.isna())
    assert set(rows.error_kind.dropna()) == {"input"}  # every bad item here is bad in itself
    assert summary.rows_error_by_kind == {"input": summary.rows_error}
    for task in ("caption", "colour"):
        mine = rows[rows.task == task].set_index("id")
        assert set(mine.index) == {f"{tmp_path / 'in'}/{key}" for key in expected} and mine.index.is_unique
        for key, item in expected.items():
            row = mine.loc[f"{tmp_path / 'in'}/{key}"]
            if item.error is None:
                assert pd.isna(row.error) and isinstance(row.annotation, str) and np.isfinite(row.score), key
            else:
                assert item.error in row.error and pd.isna(row.annotation), (key, row.error)
    colour = rows[(rows.task == "colour") & rows.error.isna()]
    assert all(a in ("red", "blue", "green") for a in colour.annotation)      # labels without their spaces
    assert all([s["label"] for s in ls] == ["red", "blue", "green"] for ls in colour.label_scores)
    assert rows[rows.task == "caption"].label_scores.isna().all()

    # Readable by pyarrow (schema), pandas (above) and DuckDB.
    # then the input metadata kept by default: the producer's key, as the input has WebDataset/Parquet shards
    assert pq.read_schema(next(out.glob("*.parquet"))).names == [*OUTPUT_SCHEMA.names, "key"]
    annotations = pads.dataset(str(out), format="parquet")
    con = duckdb.connect()
    con.register("annotations", annotations)
    count, errors = con.execute("SELECT count(*), count(error) FROM annotations WHERE task = 'caption'").fetchone()
    assert (count, errors) == (len(expected), sum(item.error is not None for item in expected.values()))
    labels = con.execute("SELECT DISTINCT unnest(label_scores).label FROM annotations ORDER BY 1").fetchall()
    assert dict(con.execute("SELECT DISTINCT task, output_column FROM annotations").fetchall()) == \
        {"caption": "caption", "colour": "dominant_colour"}
    assert [label for (label,) in labels] == ["blue", "green", "red"]

    # Resume: a second run writes nothing new; a partial output gets completed without duplicates.
    again = run_job(job(tasks, tmp_path / "in", out))
    assert again.rows_ok + again.rows_error == 0 and again.skipped == len(expected)
    assert len(read_output(out)) == 2 * len(expected)
    partial = tmp_path / "partial"
    partial.mkdir()
    pq.write_table(pq.read_table(out).slice(0, 5), partial / "earlier-run.parquet")
    run_job(job(tasks, tmp_path / "in", partial))
    completed = read_output(partial)
    assert len(completed) == 2 * len(expected)
    assert not completed.duplicated(["id", "task"]).any()


def test_rows_equal_the_model_called_directly(tasks, tmp_path):
    (tmp_path / "in").mkdir()
    item = image_bytes((30, 160, 200))
    (tmp_path / "in" / "item.png").write_bytes(item)
    run_job(job(tasks, tmp_path / "in", tmp_path / "out"))
    rows = read_output(tmp_path / "out").set_index("task")

    model = flamingo.load_model(MODEL)
    c = model.config
    transform = open_clip.image_transform(c.image_size, is_train=False, mean=c.image_mean, std=c.image_std)
    decode = DecodeConfig(c.image_size, c.image_mean, c.image_std)

    def pixels(data):
        array, error = decode_item("image", data, transform, decode)
        assert error is None
        return torch.from_numpy(array.astype(np.float32))

    for task in tasks:
        demos = torch.stack([pixels(open(d.media, "rb").read()) for d in task.demonstrations])[None]
        with torch.no_grad():
            # The pipeline ships visual tokens in the model's dtype, float32 here: exactly.
            query_tokens = model.encode_vision(pixels(item)[None, None])
            visual = torch.cat([model.encode_vision(demos), query_tokens], 1)
        ids, _ = model.tokenize([task.prefix_text() + task.query_text()])
        if task.kind == "generate":
            out = model.generate(lang_x=ids, visual_tokens=visual, max_new_tokens=task.generation.max_new_tokens,
                                 return_dict=True)
            assert rows.loc[task.name, "annotation"] == model.decode(out.new_tokens)[0]
            assert rows.loc[task.name, "score"] == pytest.approx(float(out.mean_logprob[0]), abs=1e-4)
        else:
            labels = [model.tokenizer.encode(x, add_special_tokens=False) for x in task.candidates()]
            scores = model.score(ids, labels, visual_tokens=visual, length_normalize=True)[0]
            assert rows.loc[task.name, "annotation"] == task.labels[int(scores.argmax())].strip()
            got = [s["score"] for s in rows.loc[task.name, "label_scores"]]
            np.testing.assert_allclose(got, scores.tolist(), atol=1e-4)


def test_s3_in_and_out(tasks, tmp_path, s3):
    expected = input_tree(tmp_path / "in")
    bucket = s3.new_bucket()
    uri = s3.upload_tree(bucket, "shards", tmp_path / "in")
    summary = run_job(job(tasks[:1], uri, f"s3://{bucket}/annotations"))
    assert summary.rows_ok + summary.rows_error == len(expected)
    import s3fs
    fs = s3fs.S3FileSystem(**{"key": s3.key, "secret": s3.secret, "client_kwargs": {"endpoint_url": s3.endpoint}})
    rows = pq.read_table(f"{bucket}/annotations", filesystem=fs).to_pandas()
    assert len(rows) == len(expected)
    assert set(rows.id) == {f"{uri}/{key}" for key in expected}
    assert rows.source.str.startswith(f"s3://{bucket}/").all()


def test_tasks_that_sample_video_differently_need_an_explicit_frame_count(tasks, tmp_path):
    from pipeline.job import video_sampling

    other = tmp_path / "other.yaml"
    other.write_text(open(tasks[0].path).read().replace("name: caption", "name: other")
                     + "video: {num_frames: 4, fps: 2.0}\n")
    for name in ("demo_red.png", "demo_blue.png"):
        (tmp_path / name).write_bytes(image_bytes())
    loaded = (tasks[0], load_task(other))
    with pytest.raises(ValueError, match="--num-frames"):
        video_sampling(loaded, JobConfig(loaded, "in", "out"))
    assert video_sampling(loaded, JobConfig(loaded, "in", "out", num_frames=6)) == (6, None)
    assert video_sampling(loaded[1:], JobConfig(loaded, "in", "out")) == (4, 2.0)
    # The job checks it before any work.
    with pytest.raises(ValueError, match="--num-frames"):
        run_job(job(loaded, tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
