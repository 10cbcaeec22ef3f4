"""Kinds of failure, and retrying the ones that pass by themselves.

A failed item is recorded with an `error_kind` (see pipeline/schema.py), because what to do next depends on it:
  transient   storage was unreachable, slow or throttled (a connection refused or reset, a timeout, an HTTP
              5xx / SlowDown). The item itself may be fine: a later run tries it again.
  input       the item itself is bad (corrupt, truncated, unsupported, too large, missing). Trying again
              gives the same answer.
  model       the vision encoder or the language model failed on it.

`is_transient(exc)` decides from the exception, by class name along its class hierarchy (so botocore, aiohttp,
s3fs and fsspec need not be imported here), by errno for OSErrors, and by the status / error code an S3 client
error carries. `is_transient_text(text)` decides the same from an error text written by
`media.files.describe_error` ("Type: message"), for rows that were stored without a kind.

`call_with_retries(fn, ...)` calls `fn` until it succeeds, its failure is not transient, or the tries or the
time run out (exponential backoff with jitter), then raises the last error. Readers wrap one storage call in
it; writers wrap one commit.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

TRANSIENT = "transient"
INPUT = "input"
MODEL = "model"
ERROR_KINDS = (TRANSIENT, INPUT, MODEL)

# Exception classes (by name, anywhere in the class hierarchy) that mean "the storage did not answer in time or
# dropped the connection": botocore, urllib3, aiohttp, fsspec and the standard library's own.
TRANSIENT_EXCEPTION_NAMES = frozenset({
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "timeout",
    # botocore
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "HTTPClientError", "ProxyConnectionError",
    # aiohttp / asyncio
    "ClientConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientPayloadError", "IncompleteRead",
    # fsspec
    "FSTimeoutError",
})
TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
})
# S3 error codes that mean "try again later".
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "503", "500", "502", "504",
})

_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")
_TYPE_PREFIX = re.compile(r"([A-Za-z_][\w.]*): ")

T = TypeVar("T")

_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x7f...>
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")                       # any other "... at 0x7f..."


def describe_error(exc: BaseException) -> str:
    """`Type: message` with what differs between two runs of the same failure left out -- object
    addresses, and the file name of an OSError (the item's id names the file) -- so that grouping rows
    by their error text groups them by cause."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        text = f"[Errno {exc.errno}] {exc.strerror}"
    else:
        text = str(exc)
    text = _ADDRESS.sub("", _OBJECT_REPR.sub(r"<\1>", text))
    return storable_text(f"{type(exc).__name__}: {text}")


def storable_text(text: str) -> str:
    """Text safe to store in Arrow: undecodable bytes of names in it are shown as \\xNN."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or the exception it was raised from) is a storage failure that may pass by itself."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_transient_itself(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_transient_itself(exc: BaseException) -> bool:
    if any(cls.__name__ in TRANSIENT_EXCEPTION_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(error.get("Code")) in TRANSIENT_S3_CODES or (isinstance(status, int) and status >= 500)
    return False


def error_kind(exc: BaseException) -> str:
    """`transient` or `input`, for an exception met while reading an item."""
    return TRANSIENT if is_transient(exc) else INPUT


def is_transient_text(text: str) -> bool:
    """Whether an error text ("Type: message", as `describe_error` writes it, possibly after a
    prefix such as "cannot read file: ") names a transient cause: a transient exception class, errno, or S3
    error code."""
    if any(name.rsplit(".", 1)[-1] in TRANSIENT_EXCEPTION_NAMES for name in _TYPE_PREFIX.findall(text)):
        return True
    if any(int(number) in TRANSIENT_ERRNOS for number in _ERRNO_TEXT.findall(text)):
        return True
    return any(re.search(rf"\b{re.escape(code)}\b", text) for code in TRANSIENT_S3_CODES if not code.isdigit())


def call_with_retries(
    fn: Callable[[], T],
    *,
    tries: int = 5,
    max_seconds: float = 30.0,
    first_delay: float = 0.5,
    retryable: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, called again after a retryable failure, at most `tries` times and while less than `max_seconds`
    have passed; the waits double from `first_delay` (with jitter, so that many workers do not retry in step).
    The last failure is raised as it is: callers report it as they would report a single failure."""
    start = time.monotonic()
    delay = first_delay
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as exc:
            waited = time.monotonic() - start
            if attempt == tries or not retryable(exc) or waited + delay > max_seconds:
                raise
        sleep(delay * random.uniform(0.5, 1.5))
        delay *= 2
    raise AssertionError("unreachable")  # the loop returns or raises
