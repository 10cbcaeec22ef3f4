"""`flamingo-annotate report`: an output as static HTML pages (flamingo_annotate/report.py, media/thumbnails.py).

The output here is hand-made in the writer's own schema (pipeline.write.to_output_table), over real media files
of every kind the reader takes (plain image and video files, WebDataset members, img2dataset Parquet rows), good
and bad, so no Ray run is needed. Every item has a colour of its own: a picture in the page must show its own
item's colour, which proves the right member of the right shard was read. The pages are parsed back with the
standard library's HTML parser, as a browser would see their structure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from sample_media import image_bytes, img2dataset_parquet_bytes, tar_bytes, video_bytes

from flamingo_annotate.cli import main
from flamingo_annotate.report import ReportOptions, build_report
from pipeline.schema import LABEL_SCORE_TYPE
from pipeline.write import to_output_table

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CALIBRATED = "calibrated" in LABEL_SCORE_TYPE.names   # label_scores' calibrated score, in outputs that have it
TRICKY = '<script>alert("x")</script> & a red <b>circle</b>'   # model output is any text: shown, never run


# --- a small DOM from html.parser ------------------------------------------------------------------------------

@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    content: list[Node | str] = field(default_factory=list)   # child elements and text, in document order

    @property
    def children(self) -> list[Node]:
        return [part for part in self.content if isinstance(part, Node)]

    def text(self) -> str:
        return "".join(part if isinstance(part, str) else part.text() for part in self.content)

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.attrs.get("class", "").split()):
                found.append(child)
            found += child.all(tag, cls)
        return found

    def one(self, tag: str, cls: str | None = None) -> Node:
        (node,) = self.all(tag, cls)
        return node


class _Parser(HTMLParser):
    VOID = {"meta", "img", "input", "br", "link", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].content.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].content.append(data)


def parse(path: Path) -> Node:
    parser = _Parser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.stack == [parser.root], "unclosed elements"
    return parser.root


def picture(img: Node) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert img.attrs["src"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"][len(prefix):])))
    image.load()
    return image


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)


# --- the output -----------------------------------------------------------------------------------------------

COLOURS = {"red.png": (200, 30, 40), "shard.tar::0001": (30, 200, 40), "shard.tar::0002": (40, 30, 200),
           "part.parquet::000": (200, 200, 30)}


@dataclass(frozen=True)
class Output:
    path: Path
    media: Path
    rows: pa.Table                  # every row written
    placeholders: dict[str, str]    # item id -> part of the reason its picture is missing


def make_output(root: Path) -> Output:
    media = root / "media"
    media.mkdir(parents=True)
    (media / "red.png").write_bytes(image_bytes(COLOURS["red.png"], size=(60, 40)))
    (media / "clip.mp4").write_bytes(video_bytes(num_frames=6, size=32))
    (media / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    (media / "shard.tar").write_bytes(tar_bytes([
        ("0001.jpg", image_bytes(COLOURS["shard.tar::0001"], fmt="JPEG")),
        ("0001.txt", b"a green one"),
        ("0002.png", image_bytes(COLOURS["shard.tar::0002"])),
        ("0003.txt", b"a caption without media"),
    ]))
    (media / "part.parquet").write_bytes(img2dataset_parquet_bytes([
        {"key": "000", "url": "http://example.com/a.jpg", "jpg": image_bytes(COLOURS["part.parquet::000"], fmt="JPEG"),
         "status": "success"},
        {"key": "001", "url": "http://example.com/b.jpg", "status": "failed_to_download", "error_message": "HTTP 404"},
    ]))
    m = str(media)
    ok = {  # id -> (caption, count)
        f"{m}/red.png": (TRICKY, "one"),
        f"{m}/clip.mp4": ("a grey clip", "two"),
        f"{m}/shard.tar::0001": ("a green square", "one"),
        f"{m}/shard.tar::0002": ("a blue circle", "three"),
        f"{m}/part.parquet::000": ("a yellow circle", "one"),
        f"{m}/gone.png": ("a picture since deleted", "two"),
    }
    failed = {  # id -> (source, error)
        f"{m}/corrupt.jpg": (f"{m}/corrupt.jpg", "cannot decode image: UnidentifiedImageError: cannot identify"),
        f"{m}/shard.tar::0003": (f"{m}/shard.tar", "no image or video member in this sample"),
        f"{m}/part.parquet::001": (f"{m}/part.parquet", "img2dataset status failed_to_download: HTTP 404"),
        f"{m}/broken.tar": (f"{m}/broken.tar", "cannot read tar shard: ReadError: bad checksum (after 0 complete "
                                               "samples)"),
    }
    rows = []
    for item_id, (caption, count) in ok.items():
        source = item_id.split("::")[0]
        labels = [{"label": label, "score": -2.0 + (label == count)} for label in ("one", "two", "three")]
        if CALIBRATED:  # one item's labels with calibrated scores too (the others' read as null)
            for entry in labels:
                entry["calibrated"] = -0.25 if entry["label"] == count and "red" in item_id else None
        rows += [dict(id=item_id, source=source, task="caption", annotation=caption, score=-0.5, label_scores=None),
                 dict(id=item_id, source=source, task="count", annotation=count, score=-1.0, label_scores=labels)]
    for item_id, (source, error) in failed.items():
        rows += [dict(id=item_id, source=source, task=task, error=error) for task in ("caption", "count")]
    table = pa.Table.from_pylist([
        {"annotation": None, "score": None, "label_scores": None, "error": None, "task_hash": f"h-{row['task']}",
         "model": "miniature", "seconds": 0.1, "url": "http://example.com/a.jpg" if "part.parquet" in row["id"]
         else None, **row} for row in rows])
    table = to_output_table(table, run_id="20261201T000000Z-abcdef", keep_columns=["url"])
    out = root / "out"
    out.mkdir()
    pq.write_table(table.slice(0, 10), out / "part-20261201T000000Z-abcdef-00001.parquet")
    pq.write_table(table.slice(10), out / "part-20261201T000000Z-abcdef-00002.parquet")
    placeholders = {f"{m}/gone.png": "FileNotFoundError", f"{m}/corrupt.jpg": "cannot decode image",
                    f"{m}/shard.tar::0003": "no image or video member",
                    f"{m}/part.parquet::001": "img2dataset status failed_to_download: HTTP 404",
                    f"{m}/broken.tar": "stands for the whole file"}
    return Output(out, media, table, placeholders)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Output:
    return make_output(tmp_path_factory.mktemp("report"))


# --- tests ------------------------------------------------------------------------------------------------------

def test_every_row_once_with_its_picture_or_the_reason_across_linked_pages(output: Output, tmp_path: Path) -> None:
    summary = build_report(str(output.path), tmp_path / "gallery.html", ReportOptions(page_size=4, limit=None))
    items = sorted(set(output.rows.column("id").to_pylist()))
    assert [p.name for p in summary.pages] == ["gallery.html", "gallery-2.html", "gallery-3.html"]
    assert (summary.items, summary.rows, summary.error_rows) == (len(items), output.rows.num_rows, 8)
    assert (summary.pictures, summary.placeholders) == (5, 5)

    # Follow the "next" links from the first page; "prev" leads back.
    pages, path = [], summary.pages[0]
    while True:
        page = parse(path)
        pages.append(page)
        links = {a.attrs["rel"]: a.attrs["href"] for a in page.one("header").all("a")}
        if len(pages) > 1:
            assert tmp_path / links["prev"] == summary.pages[len(pages) - 2]
        if "next" not in links:
            break
        path = tmp_path / links["next"]
    assert len(pages) == 3

    articles = [article for page in pages for article in page.all("article", "item")]
    assert [a.attrs["data-id"] for a in articles] == items          # each item once, in id order, 4 per page
    assert [len(page.all("article", "item")) for page in pages] == [4, 4, 2]
    shown = [(a.attrs["data-id"], s.attrs["data-task"]) for a in articles for s in a.all("section", "row")]
    written = list(zip(output.rows.column("id").to_pylist(), output.rows.column("task").to_pylist()))
    assert sorted(shown) == sorted(written) and len(set(shown)) == len(shown)

    rows = {(r["id"], r["task"]): r for r in output.rows.to_pylist()}
    m = str(output.media)
    for article in articles:
        item_id = article.attrs["data-id"]
        key = item_id[len(m) + 1:]
        images, holders = article.all("img"), article.all("div", "placeholder")
        if item_id in output.placeholders:
            assert not images and output.placeholders[item_id] in holders[0].text(), (item_id, holders[0].text())
        else:
            (img,) = images
            image = picture(img)
            assert image.format == "JPEG" and max(image.size) <= 192
            if key in COLOURS:      # the item's own picture: its own colour
                assert np.abs(mean_colour(image) - COLOURS[key]).max() < 12, (key, mean_colour(image))
            if key == "clip.mp4":   # a strip of 4 frames of the 32 x 32 clip, getting lighter
                assert image.size == (4 * 32, 32)
                levels = [mean_colour(image.crop((32 * i, 0, 32 * i + 32, 32)))[0] for i in range(4)]
                assert levels == sorted(levels) and levels[-1] - levels[0] > 40
        for section in article.all("section", "row"):
            row = rows[(item_id, section.attrs["data-task"])]
            if row["error"] is not None:
                assert section.attrs["data-status"] == "error"
                assert section.one("p", "error").text() == f"{row['error_kind']} {row['error']}"
            else:
                assert section.attrs["data-status"] == "ok"
                assert section.one("p", "annotation").text() == row["annotation"]
                if not row["label_scores"]:
                    assert section.one("p", "score").text() == f"score {row['score']:.3f}"
                else:
                    table = section.one("table", "label-scores")
                    calibrated = ["calibrated"] if any(e.get("calibrated") is not None for e in row["label_scores"]) \
                        else []
                    assert bool(calibrated) == (CALIBRATED and key == "red.png")
                    lines = [[cell.text() for cell in tr.children] for tr in table.all("tr")]
                    assert lines[0] == ["label", "one", "two", "three"]
                    assert lines[1] == ["score", *("-1.000" if label == row["annotation"] else "-2.000"
                                                   for label in ("one", "two", "three"))]
                    assert [line[0] for line in lines[2:]] == calibrated
                    chosen = [cell.text() for cell in table.all("th", "chosen") + table.all("td", "chosen")]
                    assert chosen == [row["annotation"], "-1.000", *(["-0.250"] if calibrated else [])]

    # Model output is text on the page, never markup: the only script is the page's own filter.
    assert all(len(page.all("script")) == 1 for page in pages)
    # Kept input columns are shown with their item.
    assert any(dd.text() == "http://example.com/a.jpg" for a in articles for dd in a.all("dd"))
    # The in-page filters offer every task and ok / error.
    form = pages[0].one("form")
    assert [o.attrs["value"] for o in form.all("select")[0].all("option")] == ["", "caption", "count"]
    assert [o.attrs["value"] for o in form.all("select")[1].all("option")] == ["", "ok", "error"]
    assert form.all("input")[0].attrs["id"] == "filter-text"


def test_build_time_filters_limit_and_one_line_errors(output: Output, tmp_path: Path) -> None:
    runner = CliRunner()

    def shown(*args: str) -> list[tuple[str, str]]:
        result = runner.invoke(main, ["report", str(output.path), "--html", str(tmp_path / "r.html"), *args])
        assert result.exit_code == 0, result.output
        page = parse(tmp_path / "r.html")
        return [(a.attrs["data-id"].rsplit("/", 1)[-1], s.attrs["data-task"])
                for a in page.all("article", "item") for s in a.all("section", "row")]

    assert shown("--task", "count", "--errors-only") == [
        ("broken.tar", "count"), ("corrupt.jpg", "count"), ("part.parquet::001", "count"),
        ("shard.tar::0003", "count")]
    assert shown("--where", "annotation LIKE '%circle%'") == [
        ("part.parquet::000", "caption"), ("red.png", "caption"), ("shard.tar::0002", "caption")]
    assert shown("--limit", "2") == [("broken.tar", "caption"), ("broken.tar", "count"),
                                     ("clip.mp4", "caption"), ("clip.mp4", "count")]
    assert "items 1-2 of 2 (of 10 matching; --limit 2)" in (tmp_path / "r.html").read_text()

    nothing = runner.invoke(main, ["report", str(output.path), "--html", str(tmp_path / "n.html"),
                                   "--task", "no-such-task"])
    assert nothing.exit_code == 0 and "0 items" in nothing.output
    assert parse(tmp_path / "n.html").one("p", "empty").text() == f"No rows in {output.path} match --task no-such-task."

    bad = runner.invoke(main, ["report", str(output.path), "--html", str(tmp_path / "b.html"), "--where", "nope > 1"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --where 'nope > 1': ") and bad.output.count("\n") == 1
    missing = runner.invoke(main, ["report", str(tmp_path / "nowhere"), "--html", str(tmp_path / "m.html")])
    assert missing.exit_code == 1 and "no such output" in missing.output and missing.output.count("\n") == 1


def test_an_output_without_rows_says_so_and_fewer_pages_remove_the_old_ones(output: Output, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = build_report(str(empty), tmp_path / "e.html")
    assert summary.items == 0 and summary.pages == (tmp_path / "e.html",)
    assert parse(tmp_path / "e.html").one("p", "empty").text() == f"No rows in {empty}."

    many = build_report(str(output.path), tmp_path / "g.html", ReportOptions(page_size=3))
    assert len(many.pages) == 4 and all(p.exists() for p in many.pages)
    (tmp_path / "g-9.html").write_text("not ours")  # a file the report did not write stays
    fewer = build_report(str(output.path), tmp_path / "g.html", ReportOptions(page_size=6))
    assert len(fewer.pages) == 2 and not many.pages[2].exists() and not many.pages[3].exists()
    assert (tmp_path / "g-9.html").read_text() == "not ours"


def test_an_s3_output_with_s3_sources(output: Output, s3, tmp_path: Path) -> None:
    """Output and media on S3 (moto): rows through pipeline.query, pictures through media.files, one storage
    setup for both; the run record's settings (here a media key) decide how shards are read."""
    bucket = s3.new_bucket()
    media_uri = s3.upload_tree(bucket, "media", output.media)
    local = str(output.media)
    rows = output.rows.to_pylist()
    for row in rows:
        row["id"], row["source"] = (row[k].replace(local, media_uri) for k in ("id", "source"))
    table = to_output_table(pa.Table.from_pylist(rows, schema=output.rows.schema), keep_columns=["url"])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    record = {"run_id": "20261201T000000Z-abcdef", "status": "complete", "settings": {"media_keys": ["png"]}}
    s3.upload(bucket, {"out/part-0.parquet": sink.getvalue(),
                       "out/_runs/20261201T000000Z-abcdef.json": json.dumps(record).encode()})
    summary = build_report(f"s3://{bucket}/out", tmp_path / "s3.html", ReportOptions(tasks=("count",)))
    assert (summary.items, summary.rows) == (10, 10)
    articles = {a.attrs["data-id"].rsplit("/", 1)[-1]: a for a in parse(tmp_path / "s3.html").all("article", "item")}
    assert np.abs(mean_colour(picture(articles["red.png"].one("img"))) - COLOURS["red.png"]).max() < 12
    assert np.abs(mean_colour(picture(articles["shard.tar::0002"].one("img"))) - COLOURS["shard.tar::0002"]).max() < 12
    # with `png` the media key, shard item 0001 (a jpg) has no media: as the run read it
    assert "no member with extension png" in articles["shard.tar::0001"].one("div", "placeholder").text()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian package `chromium`)")
def test_the_page_renders_and_filters_in_headless_chromium(output: Output, tmp_path: Path) -> None:
    """The page in a real browser: the filter script runs with the choice taken from the address, writes how
    many items it shows, and hands the choice on to the next page's link."""
    build_report(str(output.path), tmp_path / "r.html", ReportOptions(page_size=5))
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", f"file://{tmp_path / 'r.html'}#status=error&task=count"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '<span id="shown">2 items on this page shown</span>' in result.stdout   # broken.tar, corrupt.jpg
    assert 'href="r-2.html#task=count&amp;status=error"' in result.stdout         # the choice goes along
