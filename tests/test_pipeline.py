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

import flamingo
from media import image_bytes, img2dataset_parquet_bytes, tar_bytes, video_bytes
from pipeline.decode import DecodeConfig, decode_item
from pipeline.job import JobConfig, run_job
from pipeline.task import TaskError, load_task
from pipeline.write import OUTPUT_SCHEMA

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
    return [str(folder / "caption.yaml"), str(folder / "colour.yaml")]


def make_inputs(folder):
    """Every kind of input, good and bad. Returns {expected item id suffix: expected error substring|None}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "green.png").write_bytes(image_bytes((20, 200, 20)))
    (folder / "photo.jpg").write_bytes(image_bytes((120, 120, 20), fmt="JPEG"))
    (folder / "clip.mp4").write_bytes(video_bytes())
    (folder / "shards.tar").write_bytes(tar_bytes([("0001.png", image_bytes()), ("0001.txt", b"a cap"),
                                                   ("0002.jpg", b"not a jpeg at all")]))
    (folder / "part.parquet").write_bytes(img2dataset_parquet_bytes([
        {"key": "k1", "jpg": image_bytes(fmt="JPEG"), "status": "success"},
        {"key": "k2", "jpg": None, "status": "failed_to_download", "error_message": "404"},
    ]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    (folder / "cut.mp4").write_bytes(video_bytes()[:300])
    return {
        "green.png": None, "photo.jpg": None, "clip.mp4": None, "shards.tar::0001": None,
        "shards.tar::0002": "cannot decode image", "part.parquet::k1": None, "part.parquet::k2": "404",
        "broken.png": "cannot decode image", "empty.jpg": "empty", "notes.txt": "unsupported",
        "cut.mp4": "video",
    }


def read_output(uri, **kwargs):
    return pq.read_table(uri, **kwargs).to_pandas()


def test_every_item_gets_exactly_one_row_per_task(tasks, tmp_path):
    expected = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(JobConfig(tasks, str(tmp_path / "in"), str(out), model=MODEL, progress=False))
    rows = read_output(out)
    assert len(rows) == 2 * len(expected)
    assert summary.rows_ok + summary.rows_error == len(rows)
    for task in ("caption", "colour"):
        mine = rows[rows.task == task]
        assert len(mine) == len(expected) and mine.id.is_unique
        for suffix, error in expected.items():
            row = mine[mine.id.str.endswith(suffix)]
            assert len(row) == 1, suffix
            row = row.iloc[0]
            if error is None:
                assert pd.isna(row.error) and isinstance(row.annotation, str) and np.isfinite(row.score), suffix
            else:
                assert error in row.error.lower() and pd.isna(row.annotation), (suffix, row.error)
    colour = rows[(rows.task == "colour") & rows.error.isna()]
    assert all(a in ("red", "blue", "green") for a in colour.annotation)      # labels without their spaces
    assert all([s["label"] for s in ls] == ["red", "blue", "green"] for ls in colour.label_scores)
    assert rows[rows.task == "caption"].label_scores.isna().all()

    # Readable by pyarrow (schema), pandas (above) and DuckDB.
    assert pq.read_schema(next(out.glob("*.parquet"))).names == OUTPUT_SCHEMA.names
    annotations = pads.dataset(str(out), format="parquet")
    con = duckdb.connect()
    con.register("annotations", annotations)
    count, errors = con.execute("SELECT count(*), count(error) FROM annotations WHERE task = 'caption'").fetchone()
    assert (count, errors) == (len(expected), sum(e is not None for e in expected.values()))
    labels = con.execute("SELECT DISTINCT unnest(label_scores).label FROM annotations ORDER BY 1").fetchall()
    assert dict(con.execute("SELECT DISTINCT task, output_column FROM annotations").fetchall()) == \
        {"caption": "caption", "colour": "dominant_colour"}
    assert [l[0] for l in labels] == ["blue", "green", "red"]

    # Resume: a second run writes nothing new; a partial output gets completed without duplicates.
    again = run_job(JobConfig(tasks, str(tmp_path / "in"), str(out), model=MODEL, progress=False))
    assert again.rows_ok + again.rows_error == 0 and again.skipped == len(expected)
    assert len(read_output(out)) == 2 * len(expected)
    partial = tmp_path / "partial"
    partial.mkdir()
    pq.write_table(pq.read_table(out).slice(0, 5), partial / "earlier-run.parquet")
    run_job(JobConfig(tasks, str(tmp_path / "in"), str(partial), model=MODEL, progress=False))
    completed = read_output(partial)
    assert len(completed) == 2 * len(expected)
    assert not completed.duplicated(["id", "task"]).any()


def test_rows_equal_the_model_called_directly(tasks, tmp_path):
    (tmp_path / "in").mkdir()
    item = image_bytes((30, 160, 200))
    (tmp_path / "in" / "item.png").write_bytes(item)
    run_job(JobConfig(tasks, str(tmp_path / "in"), str(tmp_path / "out"), model=MODEL, progress=False))
    rows = read_output(tmp_path / "out").set_index("task")

    model = flamingo.load_model(MODEL)
    c = model.config
    transform = open_clip.image_transform(c.image_size, is_train=False, mean=c.image_mean, std=c.image_std)
    decode = DecodeConfig(c.image_size, c.image_mean, c.image_std)

    def pixels(data):
        array, error = decode_item("image", data, transform, decode)
        assert error is None
        return torch.from_numpy(array.astype(np.float32))

    for path in tasks:
        task = load_task(path)
        demos = torch.stack([pixels(open(d.media, "rb").read()) for d in task.demonstrations])[None]
        with torch.no_grad():
            # The pipeline ships visual tokens as float16: round the same way.
            query_tokens = model.encode_vision(pixels(item)[None, None]).half().float()
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
    expected = make_inputs(tmp_path / "in")
    bucket = s3.new_bucket()
    uri = s3.upload_tree(bucket, "shards", tmp_path / "in")
    summary = run_job(JobConfig(tasks[:1], uri, f"s3://{bucket}/annotations", model=MODEL, progress=False))
    assert summary.rows_ok + summary.rows_error == len(expected)
    import s3fs
    fs = s3fs.S3FileSystem(**{"key": s3.key, "secret": s3.secret, "client_kwargs": {"endpoint_url": s3.endpoint}})
    rows = pq.read_table(f"{bucket}/annotations", filesystem=fs).to_pandas()
    assert len(rows) == len(expected)
    assert set(rows.id) == {f"{uri}/{suffix}".replace("/shards.tar::", "/shards.tar::") for suffix in expected}
    assert rows.source.str.startswith(f"s3://{bucket}/").all()


def test_a_bad_task_file_stops_the_job_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: generate\ndemonstrations:\n  - {media: missing.png, text: hi}\n")
    with pytest.raises(TaskError, match=r"bad\.yaml.*demonstrations\[0\]\.media"):
        run_job(JobConfig([str(bad)], str(tmp_path), str(tmp_path / "out"), model=MODEL, progress=False))
    assert not (tmp_path / "out").exists()


def test_tasks_that_sample_video_differently_need_an_explicit_frame_count(tasks, tmp_path):
    from pipeline.job import video_sampling

    other = tmp_path / "other.yaml"
    other.write_text(open(tasks[0]).read().replace("name: caption", "name: other")
                     + "video: {num_frames: 4, fps: 2.0}\n")
    for name in ("demo_red.png", "demo_blue.png"):
        (tmp_path / name).write_bytes(image_bytes())
    loaded = [load_task(tasks[0]), load_task(other)]
    with pytest.raises(ValueError, match="--num-frames"):
        video_sampling(loaded, JobConfig(tasks, "in", "out"))
    assert video_sampling(loaded, JobConfig(tasks, "in", "out", num_frames=6)) == (6, None)
    assert video_sampling(loaded[1:], JobConfig(tasks, "in", "out")) == (4, 2.0)
