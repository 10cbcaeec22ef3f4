"""Shards written by the tools that write them, not by this project: img2dataset (downloading from a web server
on 127.0.0.1) in its parquet, webdataset and files formats, and webdataset's own `TarWriter`.

Checks what their users rely on: the producers' sidecar files (`*_stats.json`, the `.parquet` beside each
`.tar`, the per-image `.json`/`.txt`) are not items; the producer's metadata (url, caption, key, width) comes
out as output columns of its own name; `media_keys` picks a sample's media as webdataset's "png;jpg" does.
One real job (local Ray, the tiny model) runs over all of it once, for the whole module.
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from click.testing import CliRunner
from sample_media import image_bytes

from flamingo_annotate.cli import main
from media.files import file_rows, list_input, parse_media_keys
from pipeline import query
from pipeline.job import JobConfig, JobError, run_job
from pipeline.task import load_tasks
from pipeline.write import OutputWriter, drop_superseded, scan_output

IMAGES = 12
PER_SHARD = 6
MISSING = "missing.png"  # a URL the server answers with 404: a failed download in the producer's metadata
COLOURS = [(40 + 15 * i, 200 - 12 * i, (90 * i) % 256) for i in range(IMAGES)]
TASK = """name: describe
demonstrations:
  - {media: demo.png, text: "a shape."}
query: "Output:"
generation: {max_new_tokens: 2}
"""
KEEP = ("url", "caption", "key", "width")
MAX_ITEM_BYTES = 1_000_000


# --- producers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web_server(tmp_path_factory) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving PNG and JPEG files; yields its base URL."""
    root = tmp_path_factory.mktemp("web")
    for i, colour in enumerate(COLOURS):
        fmt = "PNG" if i % 2 else "JPEG"
        (root / f"img{i:02d}.{fmt.lower()}").write_bytes(image_bytes(colour, (48, 40), fmt=fmt))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class names it so
        pass


@pytest.fixture(scope="module")
def url_list(web_server, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """img2dataset's input: a CSV of url and caption (one URL missing on the server); also {url: caption}."""
    names = [f"img{i:02d}.{'png' if i % 2 else 'jpeg'}" for i in range(IMAGES)] + [MISSING]
    captions = {f"{web_server}/{name}": f"caption of {name}, with \"quotes\"" for name in names}
    path = tmp_path_factory.mktemp("urls") / "urls.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(captions.items())
    return path, captions


def run_img2dataset(urls: Path, output: Path, output_format: str) -> Path:
    """img2dataset as its users run it, in a process of its own (it starts a pool and a logger process)."""
    arguments = dict(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
                     output_format=output_format, output_folder=str(output), processes_count=1, thread_count=2,
                     number_sample_per_shard=PER_SHARD, image_size=32, resize_mode="no", timeout=5, retries=0,
                     enable_wandb=False, distributor="multiprocessing", oom_shard_count=5)
    code = f"from img2dataset import download\ndownload(**{arguments!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def produced(url_list, tmp_path_factory) -> dict[str, Path]:
    """img2dataset's output in each format, in folders of one input root."""
    root = tmp_path_factory.mktemp("input")
    return {fmt: run_img2dataset(url_list[0], root / fmt, fmt) for fmt in ("parquet", "webdataset", "files")}


def two_images_shard(path: Path) -> tuple[bytes, bytes]:
    """A WebDataset shard by webdataset's TarWriter whose one sample holds a broken `jpg` and a good `png`
    (written in that order: TarWriter sorts the extensions). Returns (jpg, png) bytes."""
    jpg, png = b"not really a jpeg" * 10, image_bytes((10, 200, 30), (40, 40))
    with webdataset.TarWriter(str(path)) as sink:
        sink.write({"__key__": "both", "jpg": jpg, "png": png, "json": {"url": "http://example.invalid/both"}})
    return jpg, png


# --- listing and reading, without Ray --------------------------------------------------------------------

def test_img2dataset_wrote_what_this_test_expects(produced):
    """The producer's layout the rest of the module relies on (a newer img2dataset may change it)."""
    webdataset_files = sorted(p.name for p in produced["webdataset"].iterdir())
    assert webdataset_files == ["00000.parquet", "00000.tar", "00000_stats.json",
                                "00001.parquet", "00001.tar", "00001_stats.json", "00002.parquet",
                                "00002.tar", "00002_stats.json"]
    assert sorted(p.name for p in produced["parquet"].iterdir()) == [
        "00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json", "00002.parquet",
        "00002_stats.json"]


@pytest.mark.parametrize("fmt, items, sidecars", [
    ("webdataset", {"00000.tar", "00001.tar", "00002.tar"},
     {"00000.parquet", "00001.parquet", "00002.parquet", "00000_stats.json", "00001_stats.json", "00002_stats.json"}),
    ("parquet", {"00000.parquet", "00001.parquet", "00002.parquet"},
     {"00000_stats.json", "00001_stats.json", "00002_stats.json"}),
])
def test_listing_leaves_out_the_sidecars(produced, fmt, items, sidecars):
    listing = list_input(str(produced[fmt]))
    assert {Path(f.uri).name for f in listing.files} == items
    assert {Path(uri).name for uri in listing.sidecars} == sidecars
    everything = list_input(str(produced[fmt]), include_sidecars=True)
    assert {Path(f.uri).name for f in everything.files} == items | sidecars and not everything.sidecars


def test_files_format_lists_only_the_images(produced):
    listing = list_input(str(produced["files"]))
    names = [Path(f.uri).name for f in listing.files]
    assert len(names) == IMAGES and all(name.endswith(".jpg") for name in names)
    sidecar_kinds = {Path(uri).suffix if not uri.endswith("_stats.json") else "_stats.json"
                     for uri in listing.sidecars}
    assert sidecar_kinds == {".json", ".txt", ".parquet", "_stats.json"}
    assert len(listing.sidecars) == 2 * IMAGES + 2 * 3


def test_a_file_named_on_its_own_is_never_a_sidecar(produced):
    stats = produced["webdataset"] / "00000_stats.json"
    assert [f.uri for f in list_input(str(stats)).files] == [str(stats)]


def test_only_sidecars_is_one_line_of_error(produced, tmp_path):
    (tmp_path / "00000_stats.json").write_bytes((produced["webdataset"] / "00000_stats.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"^no input files match .* \(1 sidecar files left out\)$"):
        list_input(str(tmp_path))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_rows_carry_the_producers_metadata(produced, url_list, fmt):
    captions = url_list[1]
    listing = list_input(str(produced[fmt]))
    rows = [row for f in listing.files for row in file_rows(f.uri, f.size, None, MAX_ITEM_BYTES,
                                                            metadata_fields=("url", "caption", "key", "width"))]
    ok = [row for row in rows if row["error"] is None]
    assert len(ok) == IMAGES
    for row in rows:
        metadata = json.loads(row["metadata"])
        assert metadata["caption"] == captions[metadata["url"]]   # the producer's pairing of url and caption
        assert row["id"].endswith(f"::{metadata['key']}")
        if row["error"] is None:
            assert metadata["width"] == 48
    failed = [row for row in rows if row["error"] is not None]
    # the parquet format keeps the failed download as a row; webdataset tars hold only what was downloaded
    assert [json.loads(r["metadata"])["url"].endswith(MISSING) for r in failed] == ([True] if fmt == "parquet" else [])


def test_media_keys_choose_the_member(tmp_path):
    jpg, png = two_images_shard(tmp_path / "both.tar")
    with tarfile.open(tmp_path / "both.tar") as tar:
        assert [m.name for m in tar.getmembers()] == ["both.jpg", "both.json", "both.png"]
    [first] = file_rows(str(tmp_path / "both.tar"), None, None, MAX_ITEM_BYTES)
    [chosen] = file_rows(str(tmp_path / "both.tar"), None, None, MAX_ITEM_BYTES, media_keys=parse_media_keys("png;jpg"))
    assert first["data"] == jpg and chosen["data"] == png
    [absent] = file_rows(str(tmp_path / "both.tar"), None, None, MAX_ITEM_BYTES, media_keys=("webp",))
    assert absent["data"] is None and absent["error"] == "no member with extension webp in this sample"


@pytest.mark.parametrize("value, message", [
    ("", "no media extensions"), ("jpg;json", "not an image or video extension in media keys 'jpg;json': json")])
def test_bad_media_keys_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        parse_media_keys(value)


# --- one job over all of it ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "demo.png").write_bytes(image_bytes((200, 30, 30)))
    (folder / "describe.yaml").write_text(TASK)
    return load_tasks([folder / "describe.yaml"])


@pytest.fixture(scope="module")
def annotated(ray_session, produced, tasks, tmp_path_factory):
    """One job over img2dataset's webdataset and parquet output and a TarWriter shard, keeping KEEP, with
    media keys 'png;jpg'. Returns (input root, output folder, summary, the rows)."""
    root = produced["parquet"].parent
    two_images_shard(root / "both.tar")
    output = tmp_path_factory.mktemp("output")
    config = JobConfig(tasks, f"{root}/[pwb]*", str(output), model="tiny-random", max_item_bytes=MAX_ITEM_BYTES,
                       progress=False, keep_columns=KEEP, media_keys=("png", "jpg"))
    summary = run_job(config)
    return root, output, summary, pq.read_table(output).to_pylist()


def test_one_row_per_item_and_none_for_sidecars(annotated):
    root, _, summary, rows = annotated
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    # 12 downloaded per format, the failed download's row in the parquet format, the TarWriter sample
    assert len(rows) == 2 * IMAGES + 1 + 1 == summary.items
    # 00002.tar is empty: its one sample is the failed download, which only the sidecar 00002.parquet records
    assert {row["source"].rsplit("/", 1)[-1] for row in rows} == {
        "00000.parquet", "00001.parquet", "00002.parquet", "00000.tar", "00001.tar", "both.tar"}
    assert summary.sidecars == 9  # 3 + 3 stats, 3 parquet beside tars
    assert [row["id"] for row in rows if row["error"] is not None] == [
        row["id"] for row in rows if (row["url"] or "").endswith(MISSING)]


def test_kept_columns_hold_the_producers_values(annotated, url_list):
    _, output, _, rows = annotated
    captions = url_list[1]
    schema = pq.read_schema(next(output.glob("*.parquet")))
    assert schema.names[-len(KEEP):] == list(KEEP) and all(schema.field(n).type == pa.string() for n in KEEP)
    for row in rows:
        if row["source"].endswith("both.tar"):
            assert (row["key"], row["url"], row["caption"], row["width"]) == (
                "both", "http://example.invalid/both", None, None)
            continue
        assert row["caption"] == captions[row["url"]]
        assert row["id"] == f"{row['source']}::{row['key']}"
        assert row["width"] == ("48" if row["error"] is None else None)  # numbers as text; none when it failed


def test_media_key_reaches_the_job(annotated):
    """Without 'png;jpg' the sample's broken jpg (first in the tar) would be its media and an error row."""
    [both] = [row for row in annotated[3] if row["source"].endswith("both.tar")]
    assert both["error"] is None and both["annotation"] is not None


def test_query_items_view_carries_kept_columns_across_runs(annotated):
    """A later run that keeps other columns (here: none) reads together with the first, by column name."""
    _, output, _, rows = annotated
    writer = OutputWriter(str(output), "20990101T000000Z-aaaaaa")
    extra = {**rows[0], "task": "other", "output_column": "other", "annotation": "later"}
    writer.write(pa.Table.from_pylist([{k: v for k, v in extra.items() if k not in KEEP}]))
    writer.flush()
    con = query.connect(str(output))
    items = con.sql("SELECT * FROM items").fetchdf()
    assert list(items.columns) == ["id", "source", *KEEP, "describe", "other"]
    first = items.set_index("id").loc[rows[0]["id"]]
    assert (first.url, first.key, first.other) == (rows[0]["url"], rows[0]["key"], "later")
    assert con.sql("SELECT count(*) FROM annotations WHERE url IS NULL").fetchall() == [(1,)]  # the later row


# --- refused before anything starts ----------------------------------------------------------------------

def test_a_kept_column_may_not_replace_an_output_column(tasks, tmp_path):
    config = JobConfig(tasks, str(tmp_path), str(tmp_path / "out"), model="tiny-random", keep_columns=("url", "error"))
    with pytest.raises(JobError, match="^--keep-columns: error would replace an output column"):
        run_job(config)
    config = JobConfig(tasks, str(tmp_path), str(tmp_path / "out"), model="tiny-random", keep_columns=("describe",))
    with pytest.raises(JobError, match="^--keep-columns: describe is also a task's output column$"):
        run_job(config)


@pytest.mark.parametrize("option, message", [
    (["--media-key", "jpg;pyd"], "Invalid value for '--media-key': not an image or video extension"),
    (["--keep-columns", "url,task"], "Invalid value for '--keep-columns': task would replace an output column"),
])
def test_cli_refuses_bad_values_in_one_line(tasks, tmp_path, option, message):
    result = CliRunner().invoke(main, ["run", tasks[0].path, "--input", str(tmp_path), "--output",
                                       str(tmp_path / "out"), *option])
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert error.startswith(f"Error: {message}")


def test_media_keys_name_whole_extensions(tmp_path):
    """As in webdataset, a key names a member's whole extension: `png` is not `seg.png`."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, payload in (("s.seg.png", image_bytes()), ("s.webp", image_bytes(fmt="WEBP"))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "s.tar").write_bytes(data.getvalue())
    [row] = file_rows(str(tmp_path / "s.tar"), None, None, MAX_ITEM_BYTES, media_keys=("webp",))
    assert row["error"] is None and row["data"] == image_bytes(fmt="WEBP")
    [seg] = file_rows(str(tmp_path / "s.tar"), None, None, MAX_ITEM_BYTES, media_keys=("seg.png",))
    assert seg["data"] == image_bytes()
    [none] = file_rows(str(tmp_path / "s.tar"), None, None, MAX_ITEM_BYTES, media_keys=("png",))
    assert none["error"] == "no member with extension png in this sample"


def test_kept_columns_survive_the_rewrite_of_superseded_rows(tmp_path):
    """A transient error row replaced by a later run: the file rewritten without it keeps its kept columns."""
    def rows(item_id, error=None):
        return pa.Table.from_pylist([{
            "id": item_id, "source": "s.tar", "task": "t", "task_hash": "h", "model": "m",
            "annotation": None if error else "a", "score": None, "label_scores": None, "seconds": 0.0,
            "error": error, "error_kind": "transient" if error else None,
            "metadata": json.dumps({"key": item_id, "url": f"http://x/{item_id}"})}])

    first = OutputWriter(str(tmp_path), "20990101T000000Z-aaaaaa", keep_columns=("key", "url"))
    first.write(rows("a"))
    first.write(rows("b", "cannot read tar shard: timed out"))
    first.flush()
    scan = scan_output(str(tmp_path), {"t": "h"})
    second = OutputWriter(str(tmp_path), "20990101T000001Z-bbbbbb", keep_columns=("key", "url"), watch=scan.watch())
    second.write(rows("b"))
    second.flush()
    assert drop_superseded(str(tmp_path), scan, second.stats.written_keys, "20990101T000001Z-bbbbbb",
                           {"t": "h"}) == 1
    table = pq.read_table(tmp_path)
    assert sorted(table.select(["id", "error", "key", "url"]).to_pylist(), key=str) == [
        {"id": "a", "error": None, "key": "a", "url": "http://x/a"},
        {"id": "b", "error": None, "key": "b", "url": "http://x/b"}]
