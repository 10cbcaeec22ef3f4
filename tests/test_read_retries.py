"""The readers ride out a brief storage outage, and name what they could not ride out: real connection
resets from a TCP proxy in front of the S3 server (moto), nothing mocked."""

from __future__ import annotations

import itertools
import time
from typing import Any

from faulty_proxy import FaultyProxy
from sample_media import image_bytes, tar_bytes

from media.files import file_rows


def object_reads(bucket: str):
    """Faults only for requests that read this bucket's objects (HEAD/GET of a key)."""
    return lambda head: f" /{bucket}/".encode() in head.split(b"\r\n")[0]


def first_n(n: int, matches):
    """A fault filter that fails the first `n` matching connections, then lets them through: a blip."""
    counter = itertools.count()
    return lambda head: matches(head) and next(counter) < n


def read(uri: str, endpoint: str) -> list[dict[str, Any]]:
    return list(file_rows(uri, None, {"endpoint_url": endpoint}, 10_000_000))


def test_a_short_outage_is_retried_away(s3: Any) -> None:
    bucket = s3.new_bucket()
    s3.upload(bucket, {"a.png": image_bytes(), "s.tar": tar_bytes([("0001.png", image_bytes())])})
    port = int(s3.endpoint.rsplit(":", 1)[1])
    for name in ("a.png", "s.tar"):
        with FaultyProxy(port, "reset", fault_if=first_n(2, object_reads(bucket))) as proxy:
            rows = read(f"s3://{bucket}/{name}", proxy.endpoint)
            assert proxy.seen["reset"] == 2                     # the blip happened, and was waited out
        assert [r["error"] for r in rows] == [None] and rows[0]["data"], name


def test_an_outage_that_lasts_leaves_transient_rows_and_a_missing_file_an_input_row(s3: Any) -> None:
    bucket = s3.new_bucket()
    s3.upload(bucket, {"a.png": image_bytes(), "s.tar": tar_bytes([("0001.png", image_bytes())])})
    port = int(s3.endpoint.rsplit(":", 1)[1])
    with FaultyProxy(port, "reset", fault_if=object_reads(bucket)) as proxy:
        (image,) = read(f"s3://{bucket}/a.png", proxy.endpoint)
        (shard,) = read(f"s3://{bucket}/s.tar", proxy.endpoint)
        assert proxy.seen["reset"] > 2                          # tried more than once before giving up
    assert image["error"].startswith("cannot read file:") and image["error_kind"] == "transient"
    assert shard["error"].startswith("cannot read tar shard:") and shard["error_kind"] == "transient"
    (missing,) = read(f"s3://{bucket}/gone.png", s3.endpoint)
    assert missing["error"].startswith("cannot read file:") and missing["error_kind"] == "input"


def test_an_endpoint_that_never_answers_fails_a_read_in_bounded_time(s3: Any) -> None:
    """Accepted connections, no answer: each S3 call gives up after its read timeout instead of nesting
    retries for ten minutes (618 s measured with s3fs's and botocore's defaults)."""
    bucket = s3.new_bucket()
    s3.upload(bucket, {"a.png": image_bytes()})
    port = int(s3.endpoint.rsplit(":", 1)[1])
    with FaultyProxy(port, "stall", fault_if=object_reads(bucket)) as proxy:
        start = time.monotonic()
        (row,) = read(f"s3://{bucket}/a.png", proxy.endpoint)
        seconds = time.monotonic() - start
        assert proxy.seen["stall"] >= 1
    assert row["error_kind"] == "transient" and "Timeout" in row["error"], row["error"]
    assert seconds < 90, seconds     # measured about 32 s: a few read timeouts of 10 s, no nested retry loops
