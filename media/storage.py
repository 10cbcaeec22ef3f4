"""Filesystems and URIs: the one place that turns `(uri, storage_options)` into an fsspec filesystem.

Reading, writing and resuming all go through here so they resolve S3 endpoints and credentials the same
way. In a Ray job `resolve_storage_options` runs on the driver and copies the usual AWS environment
variables into the options explicitly, so Ray tasks on other machines (whose environment may differ) use
the same endpoint and credentials as the driver that listed the files. Options given explicitly always win.

Names as text. Names on Linux filesystems and inside tar archives are bytes; Python hands over the bytes that
are not UTF-8 as lone surrogates ('surrogateescape'), which Arrow strings cannot hold. Every URI and item id
the project stores goes through `encode_name`, and `decode_name` gives the real name back:
  - a name that is valid UTF-8 is its own text (ids never change for such names, so earlier outputs resume);
  - any other name becomes `bytes:` followed by the name with each byte that is not UTF-8 written `%XX`
    and each '%' written `%25`: b"/data/caf\\xe9.png" -> "bytes:/data/caf%E9.png".
This is lossless (`decode_name` inverts it exactly) and unique: the escaping can be undone, and no name the
project produces starts with `bytes:` (local names are absolute paths, '/...'; others are `proto://...`
URIs), so an escaped name never equals a name that was left as it is. `%XX` only ever stands for a byte
0x80-0xFF or for '%' itself. The escaping applies to whole ids, so `<shard>::<key>` is escaped as one name
when either part is not UTF-8.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow.fs

# fsspec option name -> environment variables that botocore would consult, in order of precedence.
_S3_ENV = (
    ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("key", ("AWS_ACCESS_KEY_ID",)),
    ("secret", ("AWS_SECRET_ACCESS_KEY",)),
    ("token", ("AWS_SESSION_TOKEN",)),
)
# Bounded S3 calls: an endpoint that accepts connections and never answers fails a call in about 30 s
# (measured: 618 s with s3fs's and botocore's defaults, which nest their retries). Retrying longer is the
# callers' choice (media.errors.call_with_retries), and a failure they give up on is a `transient` row that
# the next run tries again.
S3_CLIENT_CONFIG: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 10,
                                    "retries": {"max_attempts": 2, "mode": "standard"}}
S3FS_RETRIES = 1
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
_S3_PROTOCOLS = ("s3", "s3a")

ESCAPED_PREFIX = "bytes:"  # starts the text of a name that is not valid UTF-8 (see the module docstring)
_ESCAPE = re.compile("[%\udc80-\udcff]")      # what `encode_name` writes as %XX: '%' and undecodable bytes
_UNESCAPE = re.compile("%([0-9A-Fa-f]{2})")


def encode_name(name: str) -> str:
    """The text of a name (a path, a URI or an item id) that may hold undecodable bytes as lone surrogates
    (see the module docstring): the name itself when it is valid UTF-8, else its `bytes:` form."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return ESCAPED_PREFIX + _ESCAPE.sub(_escape, name)


def decode_name(text: str) -> str:
    """The name `encode_name` made `text` from: undecodable bytes come back as lone surrogates, which
    `os.fsencode` (and Python's file functions) turn back into the original bytes."""
    if not text.startswith(ESCAPED_PREFIX):
        return text
    return _UNESCAPE.sub(_unescape, text[len(ESCAPED_PREFIX):])


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return "%25" if char == "%" else f"%{ord(char) - 0xDC00:02X}"


def _unescape(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(0xDC00 + byte) if byte >= 0x80 else chr(byte)


def protocol(uri: str) -> str:
    """'s3' for 's3://bucket/key', 'file' for a plain path."""
    return fsspec.utils.get_protocol(uri)


def resolve_storage_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for `uri`: `storage_options` plus, for S3, endpoint/credentials/region from
    the AWS environment variables where the options don't set them (none when they ask for `anon` or a
    `profile`, which pick credentials themselves), and S3_CLIENT_CONFIG unless they set `config_kwargs`."""
    options = dict(storage_options or {})
    if protocol(uri) not in _S3_PROTOCOLS:
        return options
    options.setdefault("config_kwargs", S3_CLIENT_CONFIG)
    picks_own_credentials = "anon" in options or "profile" in options
    for option, variables in _S3_ENV:
        if option in options or (picks_own_credentials and option != "endpoint_url"):
            continue
        value = next((os.environ[v] for v in variables if os.environ.get(v)), None)
        if value is not None:
            options[option] = value
    region = next((os.environ[v] for v in _REGION_ENV if os.environ.get(v)), None)
    client_kwargs = dict(options.get("client_kwargs") or {})
    if region and "region_name" not in client_kwargs:
        options["client_kwargs"] = {**client_kwargs, "region_name": region}
    return options


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(filesystem, path)` for `uri` (a URI, or the text `encode_name` made of one); local paths come back
    absolute and normalised so that ids built from them don't depend on the working directory or on how
    the path was spelled."""
    uri = decode_name(uri)
    fs, path = fsspec.core.url_to_fs(uri, **resolve_storage_options(uri, storage_options))
    if is_local(fs):
        path = os.path.normpath(os.path.abspath(path))
    elif protocol(uri) in _S3_PROTOCOLS:
        fs.retries = S3FS_RETRIES   # s3fs's own loop, around botocore's; not settable through options
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is s3fs (S3 or an S3-compatible store), whose client calls (`fs.call_s3`) callers may use."""
    return any(p in _S3_PROTOCOLS for p in _protocols(fs))


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI that names `path` in ids and `source` columns, as text (`encode_name`): a plain absolute
    path for local files, `s3://bucket/key` (etc.) otherwise. `filesystem` takes it back."""
    return encode_name(path if is_local(fs) else fs.unstrip_protocol(path))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """A pyarrow view of an fsspec filesystem, for Ray Data and pyarrow.dataset."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
