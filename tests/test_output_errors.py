"""media.errors: which failures are transient, and bounded retries; pipeline.schema's fallback kinds."""

from __future__ import annotations

import errno
import time

import botocore.exceptions
import pytest

from media.errors import (
    INPUT,
    MODEL,
    TRANSIENT,
    call_with_retries,
    describe_error,
    error_kind,
    is_transient,
    is_transient_text,
)
from pipeline.schema import infer_error_kind

TRANSIENT_ERRORS = [
    botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
    botocore.exceptions.ConnectTimeoutError(endpoint_url="http://s3"),
    botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
    botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"),
    botocore.exceptions.ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"}},
                                    "GetObject"),
    botocore.exceptions.ClientError({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                                    "GetObject"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    TimeoutError("timed out"),
]
PERMANENT_ERRORS = [
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
    PermissionError(errno.EACCES, "Permission denied"),
    botocore.exceptions.ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                                    "GetObject"),
    ValueError("truncated JPEG"),
]


@pytest.mark.parametrize("exc", TRANSIENT_ERRORS, ids=lambda e: type(e).__name__)
def test_transient_failures(exc: Exception) -> None:
    assert is_transient(exc) and error_kind(exc) == TRANSIENT
    if "(X)" not in str(exc):  # a text keeps the class name and S3 code, not the HTTP status
        assert is_transient_text("cannot read file: " + describe_error(exc))


@pytest.mark.parametrize("exc", PERMANENT_ERRORS, ids=lambda e: type(e).__name__)
def test_permanent_failures(exc: Exception) -> None:
    assert not is_transient(exc) and error_kind(exc) == INPUT
    assert not is_transient_text("cannot read file: " + describe_error(exc))


def test_a_wrapped_transient_failure_is_transient() -> None:
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise OSError("read failed") from inner
    except OSError as outer:
        assert is_transient(outer)


def test_fallback_kinds_from_error_texts() -> None:
    assert infer_error_kind("cannot read file: EndpointConnectionError: Could not connect") == TRANSIENT
    assert infer_error_kind("cannot read tar shard: ConnectionResetError: [Errno 104] reset (after 2 samples)") \
        == TRANSIENT
    assert infer_error_kind("cannot read Parquet file: ReadTimeoutError: Read timeout (after 0 rows)") == TRANSIENT
    assert infer_error_kind("cannot read file: FileNotFoundError: [Errno 2] No such file") == INPUT
    assert infer_error_kind("cannot decode image: TimeoutError in the decoder") == INPUT  # not a read error
    assert infer_error_kind("vision encoder failed: RuntimeError: CUDA error") == MODEL
    assert infer_error_kind("generation failed: RuntimeError: out of memory") == MODEL


def test_retries_until_success() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    assert call_with_retries(flaky, first_delay=0.01) == "ok" and len(calls) == 3


def test_retries_are_bounded_in_tries_and_time_and_skip_permanent_failures() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(ConnectionRefusedError):
        call_with_retries(down, tries=4, first_delay=0.01)
    assert len(calls) == 4
    calls.clear()
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        call_with_retries(down, tries=100, max_seconds=0.3, first_delay=0.05)
    assert time.monotonic() - start < 1.5 and len(calls) < 10
    calls.clear()

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        call_with_retries(missing, first_delay=0.01)
    assert len(calls) == 1
