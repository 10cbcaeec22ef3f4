"""Item ids for any input name, on real files: names that are not UTF-8 (Linux file names and tar member names
are bytes), keys that come back inside a shard, and error texts that group by cause. Every id must be stable,
unique, storable in Arrow and lead back to the real name; the whole job must run on such inputs."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sample_media import JPG, PNG, image_bytes, img2dataset_parquet_bytes

from media.decode import DecodeConfig, decode_item, image_transform
from media.errors import describe_error
from media.files import file_rows, list_files
from media.storage import decode_name, encode_name
from pipeline.manifest import unit_uri
from pipeline.read import READ_TASK_RETRIES, Resume, read_items
from pipeline.schema import ITEM_SCHEMA
from pipeline.write import unit_files, write_rows

T = TypeVar("T")
WAIT_SECONDS = 120  # the longest any Ray read here may take before the test fails instead of hanging
JOB_SECONDS = 300   # the same for a whole job

CAFE = b"caf\xe9.png"          # Latin-1 "café.png": not UTF-8
CAFE_LITERAL = "caf%E9.png"     # valid UTF-8 that spells the escaped form of CAFE's byte


def within(seconds: float, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, failing the test if it takes longer than `seconds` (Ray waits have no timeout of their own)."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def write_bytes_named(folder: Path, name: bytes, data: bytes) -> bytes:
    """Write `data` to the file `name` (raw bytes, whatever their encoding) in `folder`; its path as bytes."""
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def tar_with_byte_names(members: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A tar archive whose member names are the given raw bytes, as Linux `tar` writes them (GNU format:
    names are stored as they are, not re-encoded)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(os.fsdecode(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_by_id(uri: str) -> dict[str, dict[str, Any]]:
    """The rows of `read_items(uri)` by id, through Ray; fails on duplicate ids."""
    rows = within(WAIT_SECONDS, read_items(uri).dataset.take_all)
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "duplicate ids"
    return by_id


# --- the escaping itself ---------------------------------------------------------------------------


def test_utf8_names_keep_their_text_and_others_round_trip() -> None:
    for name in ("/data/a.png", "/data/café ü.png", "s3://b/x.tar::0001@2", "/data/50%.png", CAFE_LITERAL):
        assert encode_name(name) == name and decode_name(name) == name
    for raw in (CAFE, b"/d/\xff\xfe/x%25.tar::\x80@2", b"/d/caf\xc3.png"):
        name = os.fsdecode(raw)
        text = encode_name(name)
        text.encode("utf-8")  # storable in Arrow
        assert text.startswith("bytes:") and os.fsencode(decode_name(text)) == raw
    # the escaped form of a byte never equals the literal text that spells it
    assert encode_name(os.fsdecode(CAFE)) != encode_name(CAFE_LITERAL)


# --- file names that are not UTF-8 ---------------------------------------------------------------------


def test_folder_with_a_name_that_is_not_utf8(ray_session: None, tmp_path: Path) -> None:
    real_path = write_bytes_named(tmp_path, CAFE, PNG)
    (tmp_path / "ok.png").write_bytes(JPG)
    (tmp_path / CAFE_LITERAL).write_bytes(image_bytes((1, 2, 3)))  # same text as the escape: must not collide
    rows = read_by_id(str(tmp_path))
    assert len(rows) == 3
    by_name = {os.fsencode(decode_name(item_id)): row for item_id, row in rows.items()}
    assert by_name[real_path]["data"] == PNG and by_name[real_path]["error"] is None
    assert by_name[os.fsencode(tmp_path / "ok.png")]["data"] == JPG
    assert by_name[os.fsencode(tmp_path / CAFE_LITERAL)]["error"] is None
    assert rows[str(tmp_path / "ok.png")]["source"] == str(tmp_path / "ok.png")  # UTF-8 ids are unchanged
    for item_id, row in rows.items():
        assert row["source"] == item_id
    pa.Table.from_pylist(list(rows.values()), schema=ITEM_SCHEMA)  # the rows are storable as they are
    assert read_by_id(str(tmp_path) + "/") == rows  # stable across listings


def test_the_listed_uri_reads_back(tmp_path: Path) -> None:
    write_bytes_named(tmp_path, CAFE, PNG)
    [listed] = list_files(str(tmp_path))
    assert listed.uri == f"bytes:{tmp_path}/caf%E9.png"
    [row] = file_rows(listed.uri, listed.size, None, 10_000)
    assert row["data"] == PNG
    [same] = list_files(listed.uri)  # an id is also an input URI
    assert same == listed


def test_folder_whose_own_name_is_not_utf8(ray_session: None, tmp_path: Path) -> None:
    folder = os.path.join(os.fsencode(tmp_path), b"d\xe9j\xe0")
    os.mkdir(folder)
    write_bytes_named(Path(os.fsdecode(folder)), b"a.png", PNG)
    rows = read_by_id(os.fsdecode(folder))
    [(item_id, row)] = rows.items()
    assert os.fsencode(decode_name(item_id)) == os.path.join(folder, b"a.png") and row["data"] == PNG


# --- tar member names and repeated keys ----------------------------------------------------------------


def test_tar_members_differing_only_in_undecodable_bytes_stay_distinct(tmp_path: Path) -> None:
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))
    shard = tar_with_byte_names([(b"caf\xe9.png", red), (b"caf\xe8.png", blue), (b"caf%E9.png", JPG)])
    path = tmp_path / "s.tar"
    path.write_bytes(shard)
    rows = {row["id"]: row for row in file_rows(str(path), len(shard), None, 10_000)}
    assert {item_id: row["data"] for item_id, row in rows.items()} == {
        f"bytes:{path}::caf%E9": red,
        f"bytes:{path}::caf%E8": blue,
        f"{path}::caf%E9": JPG,
    }
    assert all(row["error"] is None and row["source"] == str(path) for row in rows.values())


def test_shard_named_with_percent_and_key_not_utf8_resumes(ray_session: None, tmp_path: Path) -> None:
    """The key's bytes make the whole id escaped ('%' of the file name included): resume still finds its file."""
    path = tmp_path / "100%.tar"
    path.write_bytes(tar_with_byte_names([(b"\xe9.png", PNG), (b"ok.png", PNG)]))
    first = read_by_id(str(tmp_path))
    assert set(first) == {f"bytes:{tmp_path}/100%25.tar::%E9", f"{path}::ok"}
    output = tmp_path.parent / f"{tmp_path.name}-out"
    write_rows([pa.Table.from_pylist([
        {"id": item_id, "source": row["source"], "task": "t", "task_hash": "h", "model": "m", "annotation": "a",
         "score": -1.0, "label_scores": None, "error": None, "seconds": 0.1} for item_id, row in first.items()])],
        str(output), "20261201T000000Z-aaaaaa")
    files = list_files(str(tmp_path))
    by_unit, unknown = unit_files(str(output), {unit_uri(f.uri) for f in files})
    again = read_items(str(tmp_path), files=files,
                       resume=Resume(str(output), {"t": "h"}, files_by_unit=by_unit, unknown_files=unknown))
    assert by_unit and not unknown and within(WAIT_SECONDS, again.dataset.count) == 0


def test_repeated_keys_never_share_an_id(tmp_path: Path) -> None:
    shard = tar_with_byte_names([(b"a.png", PNG), (b"b.png", PNG), (b"a.jpg", JPG), (b"a@2.png", PNG)])
    path = tmp_path / "s.tar"
    path.write_bytes(shard)
    rows = {row["id"].removeprefix(f"{path}::"): row for row in file_rows(str(path), len(shard), None, 10_000)}
    assert list(rows) == ["a", "b", "a@2", "a@2@2"]
    assert "appears again" in rows["a@2"]["error"] and rows["a@2@2"]["data"] == PNG


def test_parquet_duplicate_key_gives_two_items_with_their_own_bytes(ray_session: None, tmp_path: Path) -> None:
    path = tmp_path / "00000.parquet"
    junk = b"\xff\xd8 not really a jpeg"
    path.write_bytes(img2dataset_parquet_bytes([
        {"key": "000", "url": "http://x/a.jpg", "caption": "good", "jpg": JPG, "status": "success"},
        {"key": "000", "url": "http://x/b.jpg", "caption": "junk", "jpg": junk, "status": "success"},
        {"key": "000@2", "jpg": PNG, "status": "success"},
        {"jpg": PNG, "status": "success"},  # no key: the row index, 3
        {"key": "3", "jpg": PNG, "status": "success"},
    ]))
    rows = read_by_id(str(path))
    assert [rows[f"{path}::{key}"]["caption"] for key in ("000", "000@2")] == ["good", "junk"]
    assert rows[f"{path}::000"]["data"] == JPG and rows[f"{path}::000@2"]["data"] == junk
    assert set(rows) == {f"{path}::{key}" for key in ("000", "000@2", "000@2@2", "3", "3@2")}
    config = DecodeConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    transform = image_transform(config)
    good, good_error = decode_item("image", rows[f"{path}::000"]["data"], transform, config)
    bad, bad_error = decode_item("image", rows[f"{path}::000@2"]["data"], transform, config)
    assert good is not None and good_error is None
    assert bad is None and bad_error is not None and "cannot decode image" in bad_error


# --- error texts ----------------------------------------------------------------------------------------


def test_error_texts_carry_no_addresses_and_group_by_cause(tmp_path: Path) -> None:
    missing = [row["error"] for name in ("gone-1.png", "gone-2.png")
               for row in file_rows(str(tmp_path / name), None, None, 10_000)]
    assert missing[0] == missing[1] == "cannot read file: FileNotFoundError: [Errno 2] No such file or directory"
    broken = []
    for data in (b"junk one", b"junk two"):
        try:
            Image.open(io.BytesIO(data))  # PIL names the stream: "<_io.BytesIO object at 0x7f...>"
        except Exception as exc:
            broken.append(describe_error(exc))
    assert broken[0] == broken[1] and "0x" not in broken[0] and "<_io.BytesIO>" in broken[0]
    [undecodable] = file_rows(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xe9.png")), None, None, 10_000)
    assert undecodable["id"] == f"bytes:{tmp_path}/%E9.png"
    undecodable["error"].encode("utf-8")  # storable in Arrow


def test_read_tasks_are_retried_a_bounded_number_of_times(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    plan = read_items(str(tmp_path)).dataset._logical_plan.dag  # the read map (Ray has no public getter)
    assert plan.ray_remote_args["max_retries"] == READ_TASK_RETRIES >= 0


# --- the whole job -----------------------------------------------------------------------------------------


def test_job_on_names_that_are_not_utf8(ray_session: None, tmp_path: Path) -> None:
    from pipeline.job import JobConfig, run_job
    from pipeline.task import load_tasks

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "demo.png").write_bytes(image_bytes((220, 20, 20)))
    (tasks_dir / "colour.yaml").write_text(
        'name: colour\nkind: classify\ndemonstrations:\n  - {media: demo.png, text: " red"}\n'
        'labels: [" red", " blue"]\nquery: "Colour:"\n')
    (tasks_dir / "caption.yaml").write_text(
        'name: caption\ndemonstrations:\n  - {media: demo.png, text: "a red shape."}\nquery: "Output:"\n'
        "generation: {max_new_tokens: 3}\n")
    tasks = load_tasks([tasks_dir / "colour.yaml", tasks_dir / "caption.yaml"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_bytes_named(inputs, CAFE, PNG)
    (inputs / "ok.png").write_bytes(PNG)
    (inputs / "s.tar").write_bytes(tar_with_byte_names([(b"\xe9.png", PNG), (b"\xe8.png", PNG)]))
    (inputs / "p.parquet").write_bytes(img2dataset_parquet_bytes([
        {"key": "k", "jpg": JPG, "status": "success"}, {"key": "k", "jpg": b"junk", "status": "success"}]))
    out = tmp_path / "out"
    config = JobConfig(tasks, str(inputs), str(out), model="tiny-random", progress=False)

    within(JOB_SECONDS, run_job, config)
    rows = pq.read_table(out).to_pandas()
    ids = {
        f"bytes:{inputs}/caf%E9.png", f"{inputs}/ok.png", f"bytes:{inputs}/s.tar::%E9",
        f"bytes:{inputs}/s.tar::%E8", f"{inputs}/p.parquet::k", f"{inputs}/p.parquet::k@2",
    }
    for task in ("colour", "caption"):
        mine = rows[rows.task == task].set_index("id")
        assert set(mine.index) == ids and mine.index.is_unique
        assert mine.loc[list(ids - {f"{inputs}/p.parquet::k@2"})].error.isna().all()
        junk = mine.loc[f"{inputs}/p.parquet::k@2"]
        assert "cannot decode image" in junk.error and pd.isna(junk.annotation)

    again = within(JOB_SECONDS, run_job, config)  # resume: everything is found done
    assert again.rows_ok + again.rows_error == 0 and again.skipped == len(ids)
