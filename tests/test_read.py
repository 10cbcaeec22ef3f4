"""Reading inputs on real files, locally and on a moto S3 server: pipeline.read (the Ray dataset) and the
per-file readers of media.files. Every input item yields exactly one row, bad items become error rows with
a clear message, good items are untouched, ids are stable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_media import (
    GOOD_SHARD,
    JPG,
    MAX_ITEM_BYTES,
    MP4,
    PNG,
    Expected,
    image_bytes,
    img2dataset_parquet_bytes,
    input_tree,
    tar_bytes,
    tar_member_offsets,
)

from media.files import ListedFile, file_rows, list_files
from media.storage import S3_CLIENT_CONFIG, resolve_storage_options
from pipeline.manifest import unit_uri
from pipeline.read import Resume, read_items
from pipeline.write import unit_files, write_rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    """A local `input_tree` and what each of its items becomes."""
    root = tmp_path_factory.mktemp("input")
    return root, input_tree(root)


@pytest.fixture(scope="module")
def local_tree(tree: tuple[Path, dict[str, Expected]]) -> Path:
    return tree[0]


def read_rows(uri: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Rows by id; fails on duplicate ids (every item must yield exactly one row)."""
    result = read_items(uri, max_item_bytes=MAX_ITEM_BYTES, **kwargs)
    rows = result.dataset.take_all()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "duplicate ids"
    return by_id


def check_tree(rows: dict[str, dict[str, Any]], root: str, items: dict[str, Expected]) -> None:
    expected = {f"{root}/{key}": item for key, item in items.items()}
    assert set(rows) == set(expected)
    for item_id, item in expected.items():
        row = rows[item_id]
        assert row["media_kind"] == item.kind, item_id
        assert row["source"] == item_id.split("::")[0]
        if item.read_error is None:
            assert row["error"] is None, (item_id, row["error"])
            assert row["data"] if item.data is None else row["data"] == item.data
        else:
            assert item.read_error in row["error"], (item_id, row["error"])
            assert row["data"] is None
    # captions and urls from the shard's .txt / .json members and from the Parquet columns
    assert (rows[f"{root}/shards/good.tar::0001"]["caption"], rows[f"{root}/shards/good.tar::0001"]["url"]) == (
        "a cat",
        "http://example.com/1.jpg",
    )
    assert rows[f"{root}/shards/good.tar::0002"]["caption"] == "a clip"
    assert rows[f"{root}/shards/good.tar::0004"]["caption"] is None
    assert rows[f"{root}/parquet/part.parquet::001"]["caption"] == "second"
    assert rows[f"{root}/parquet/part.parquet::002"]["url"] == "http://example.com/c.jpg"


def test_every_local_item_gives_one_row(ray_session: None, tree: tuple[Path, dict[str, Expected]]) -> None:
    root, items = tree
    check_tree(read_rows(str(root)), str(root), items)


def test_every_s3_item_gives_one_row(ray_session: None, s3: Any, tree: tuple[Path, dict[str, Expected]]) -> None:
    local_root, items = tree
    root = s3.upload_tree(s3.new_bucket(), "input", local_root)
    check_tree(read_rows(root), root, items)


def test_s3_with_explicit_storage_options_only(ray_session: None, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.new_bucket()
    s3.upload(bucket, {"a/x.png": PNG, "a/s.tar": GOOD_SHARD})
    for variable in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    rows = read_rows(f"s3://{bucket}/a", storage_options=s3.storage_options)
    assert rows[f"s3://{bucket}/a/x.png"]["data"] == PNG
    assert rows[f"s3://{bucket}/a/s.tar::0002"]["data"] == MP4


def test_ids_are_stable_across_reads(ray_session: None, local_tree: Path) -> None:
    first = read_rows(str(local_tree))
    second = read_rows(str(local_tree) + "/")  # spelled differently, same files
    assert first == second


def test_glob_and_single_file(ray_session: None, local_tree: Path) -> None:
    images, shard = f"{local_tree}/images", f"{local_tree}/shards/good.tar"
    assert set(read_rows(f"{images}/*.png")) == {f"{images}/red.png", f"{images}/empty.png"}
    assert set(read_rows(shard)) == {f"{shard}::000{i}" for i in range(1, 6)}


def test_glob_matching_directories_lists_their_files(tmp_path: Path) -> None:
    (tmp_path / "part-1").mkdir()
    (tmp_path / "part-1" / "a.png").write_bytes(PNG)
    (tmp_path / "part-1" / ".cache").mkdir()
    (tmp_path / "part-1" / ".cache" / "b.png").write_bytes(PNG)
    (tmp_path / "part-2").mkdir()  # empty: contributes nothing, breaks nothing
    assert [f.uri for f in list_files(f"{tmp_path}/part-*")] == [f"{tmp_path}/part-1/a.png"]
    assert [f.uri for f in list_files(f"{tmp_path}/part-1/.cache/b.png")] == [f"{tmp_path}/part-1/.cache/b.png"]


def test_missing_input_raises_before_any_work(local_tree: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_files(str(local_tree / "nope"))
    with pytest.raises(FileNotFoundError):
        list_files(f"{local_tree}/*.nothing")


def test_hidden_files_are_not_listed(local_tree: Path) -> None:
    assert not [f for f in list_files(str(local_tree)) if ".hidden" in f.uri]


def test_file_gone_after_listing_becomes_error_row(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "stays.png").write_bytes(PNG)
    (tmp_path / "goes.png").write_bytes(PNG)
    result = read_items(str(tmp_path))  # lazy: lists now, reads on execution
    (tmp_path / "goes.png").unlink()
    rows = {row["id"]: row for row in result.dataset.take_all()}
    assert rows[str(tmp_path / "stays.png")]["data"] == PNG
    assert "cannot read file: FileNotFoundError" in rows[str(tmp_path / "goes.png")]["error"]


def annotated(output: Path, done: dict[str, str], task: str = "t", run: str = "aaaaaa") -> None:
    """Rows of `task` for the ids of `done` (id -> source) in `output`, as run `run` commits them."""
    write_rows([pa.Table.from_pylist([
        {"id": item_id, "source": source, "task": task, "task_hash": "h", "model": "m", "annotation": "a",
         "score": -1.0, "label_scores": None, "error": None, "seconds": 0.1} for item_id, source in done.items()])],
        str(output), f"20261201T000000Z-{run}")


def resume_of(output: Path, files: list[ListedFile], tasks: tuple[str, ...] = ("t",)) -> Resume:
    """What a job gives the read tasks: the output files that hold each input file's rows, from their footers."""
    by_unit, unknown = unit_files(str(output), {unit_uri(f.uri) for f in files})
    return Resume(str(output), dict.fromkeys(tasks, "h"), files_by_unit=by_unit, unknown_files=unknown)


def test_resume_leaves_out_done_items_on_the_workers(ray_session: None, local_tree: Path, tmp_path: Path) -> None:
    root = str(local_tree)
    both = {f"{root}/images/red.png": f"{root}/images/red.png",
            f"{root}/shards/good.tar::0002": f"{root}/shards/good.tar",
            f"{root}/parquet/part.parquet::001": f"{root}/parquet/part.parquet",
            "/somewhere/else.png": "/somewhere/else.png"}  # not part of this input: ignored
    annotated(tmp_path, both, "t", "aaaaaa")
    annotated(tmp_path, both, "u", "bbbbbb")
    annotated(tmp_path, {f"{root}/shards/good.tar::0001": f"{root}/shards/good.tar"}, "t", "cccccc")  # one task
    files = list_files(root)
    result = read_items(root, max_item_bytes=MAX_ITEM_BYTES, files=files, resume=resume_of(tmp_path, files, ("t", "u")))
    rows = {row["id"]: row for row in result.dataset.take_all()}
    assert result.files == 16
    assert not set(rows) & set(both)
    assert rows[f"{root}/shards/good.tar::0001"]["done_tasks"] == ["t"]    # annotated for `u` only
    assert rows[f"{root}/parquet/part.parquet::000"]["done_tasks"] is None


def test_resume_with_everything_done(ray_session: None, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(PNG)
    annotated(tmp_path / "out", {str(tmp_path / "in" / "a.png"): str(tmp_path / "in" / "a.png")})
    files = list_files(str(tmp_path / "in"))
    result = read_items(str(tmp_path / "in"), files=files, resume=resume_of(tmp_path / "out", files))
    assert (result.files, result.dataset.count()) == (1, 0)


# --- WebDataset and Parquet corner cases, on media.files directly (no Ray needed) -----------------


def shard_rows(tmp_path: Path, data: bytes, max_item_bytes: int = MAX_ITEM_BYTES) -> dict[str, dict[str, Any]]:
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    rows = list(file_rows(str(path), len(data), None, max_item_bytes))
    by_id = {row["id"].removeprefix(f"{path}::"): row for row in rows}
    assert len(by_id) == len(rows)
    return by_id


def test_tar_cut_between_members_is_reported(tmp_path: Path) -> None:
    rows = shard_rows(tmp_path, GOOD_SHARD[: tar_member_offsets(GOOD_SHARD)["0004.png"]])
    assert [rows[k]["error"] is None for k in ("0001", "0002")] == [True, True]
    assert "no end-of-archive block" in rows["0003"]["error"]  # the sample being read when it stopped
    assert "no end-of-archive block" in rows[str(tmp_path / "shard.tar")]["error"]


def test_tar_cut_inside_a_header_is_reported(tmp_path: Path) -> None:
    rows = shard_rows(tmp_path, GOOD_SHARD[: tar_member_offsets(GOOD_SHARD)["0004.png"] + 200])
    assert "cannot read tar shard" in rows[str(tmp_path / "shard.tar")]["error"]
    assert rows["0002"]["data"] == MP4


def test_tar_empty_file_is_reported(tmp_path: Path) -> None:
    rows = shard_rows(tmp_path, b"")
    assert list(rows) == [str(tmp_path / "shard.tar")]
    assert "empty file" in rows[str(tmp_path / "shard.tar")]["error"]


def test_tar_non_adjacent_key_and_oversized_member(tmp_path: Path) -> None:
    shard = tar_bytes([("a.jpg", JPG), ("b.png", image_bytes(size=(200, 200), fmt="BMP")), ("a.txt", b"late caption")])
    rows = shard_rows(tmp_path, shard, max_item_bytes=10_000)
    assert rows["a"]["data"] == JPG
    assert "larger than max_item_bytes" in rows["b"]["error"]
    assert "appears again" in rows["a@2"]["error"]


def test_tar_keys_with_directories_and_dots(tmp_path: Path) -> None:
    shard = tar_bytes([("dir.v1/0001.seg.png", PNG), ("dir.v1/0001.txt", b"x"), ("dir.v1/0002.JPG", JPG)])
    rows = shard_rows(tmp_path, shard)
    assert rows["dir.v1/0001"]["data"] == PNG and rows["dir.v1/0001"]["caption"] == "x"
    assert rows["dir.v1/0002"]["media_kind"] == "image"


def test_parquet_without_image_column_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "meta.parquet"
    path.write_bytes(img2dataset_parquet_bytes([{"key": "1"}], image_column="mp3"))
    [row] = file_rows(str(path), None, None, MAX_ITEM_BYTES)
    assert row["id"] == str(path) and "no image bytes column" in row["error"]


def test_parquet_image_column_must_be_binary(tmp_path: Path) -> None:
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"key": ["1"], "jpg": ["a string, not bytes"]}), path)
    [row] = file_rows(str(path), None, None, MAX_ITEM_BYTES)
    assert row["id"] == str(path) and row["error"] == "column jpg has type string, not binary"


def test_parquet_rows_without_key_use_row_index(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(img2dataset_parquet_bytes([{"png": PNG}, {"png": PNG, "key": "k"}], image_column="png"))
    rows = list(file_rows(str(path), None, None, MAX_ITEM_BYTES))
    assert [row["id"] for row in rows] == [f"{path}::0", f"{path}::k"]
    assert all(row["data"] == PNG for row in rows)


def test_storage_options_from_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    options = resolve_storage_options("s3://b/p", {"key": "explicit-key"})
    assert options == {
        "endpoint_url": "http://s3-specific:2",
        "key": "explicit-key",
        "secret": "env-secret",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": S3_CLIENT_CONFIG,      # bounded timeouts and retries unless the options set their own
    }
    assert resolve_storage_options("s3://b/p", {"config_kwargs": {}})["config_kwargs"] == {}
    assert resolve_storage_options("/local/path", {"x": 1}) == {"x": 1}
    assert "key" not in resolve_storage_options("s3://b/p", {"anon": True})
