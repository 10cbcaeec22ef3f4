"""Input files and their items: list what an input URI names, and read each file's items as plain rows.

Any per-item or per-file failure -- missing, unreadable, truncated, empty, oversized, unsupported, a failed
img2dataset download -- becomes a row whose `error` says what went wrong: `file_rows` never raises for a
bad file, and nothing is dropped silently. Only a whole-input problem (the URI matches no file) raises, in
`list_files`. The annotation pipeline runs `file_rows` inside Ray read tasks (`pipeline/read.py`);
training calls it directly.

Inputs: a file, a directory / prefix (searched recursively; hidden entries, whose name starts with '.',
are ignored) or a glob, on any fsspec filesystem (local, `s3://`, ...).

Sidecars: the files that img2dataset and video2dataset write next to their shards are not items, and a
folder or glob leaves them out (`include_sidecars=True` keeps them; a file named on its own is always kept):
  *_stats.json        the per-shard download statistics (every output format)
  X.parquet           the per-shard metadata table written beside a shard `X.tar` (webdataset format),
                      `X.tfrecord` (tfrecord format) or a folder `X/` (files format)
  X.json, X.txt       the per-image metadata and caption beside an image or video `X.jpg` (files format)
  _tmp/*.feather      img2dataset's split of the input list, left behind when a download is cut short
`list_input` says which files it left out, so a job can report them.

Kinds of file, by extension:
  images          .jpg .jpeg .png .webp .bmp .gif                 one item per file
  videos          .mp4 .webm .mkv .mov .avi                       one item per file
  WebDataset      .tar   members grouped by key as webdataset does (`0001.jpg`, `0001.txt`, `0001.json`
                         -> key `0001`): one item per key; its media is its first image/video member,
                         or with `media_keys` (e.g. ("png", "jpg"), webdataset's "png;jpg") the first
                         of those extensions the sample has; `.txt` gives the caption, `.json` the
                         `caption`/`url` fields. Other members are never read (no `.pyd`/`.pth`
                         unpickling).
  img2dataset     .parquet  one item per row; bytes from the `jpg` (or `png`, `webp`; `media_keys` sets
                         the order) column; `key`, `url`, `caption`, `status`, `error_message` are used
                         when present.
  anything else   one error row "unsupported file type .xyz".

An item row is a dict with the fields of `pipeline.schema.ITEM_SCHEMA`:
  id          stable item id: the file URI for plain files; `<tar uri>::<key>` for WebDataset samples;
              `<parquet uri>::<key>` (`::<row index>` when a row has no key) for Parquet rows. A tar/Parquet
              file that fails as a whole (or part way through) adds one row whose id is the file URI.
              Within a shard every item gets an id of its own: a key met again gets `@2`, `@3`, ... (the
              first that no other item of the shard has), and each such item carries its own bytes.
              Names that are not UTF-8 (Linux file names, tar member names are bytes) are written as
              `media.storage.encode_name` says: unchanged when valid UTF-8, else `bytes:` + the name with
              the undecodable bytes and '%' written %XX. `media.storage.decode_name(id)` gives the name back.
  source      URI of the file the item came from (local files: absolute path), as `encode_name` text.
  media_kind  "image" | "video" | None (unsupported / unknown).
  data        the encoded media bytes; None whenever `error` is set.
  error       None when the item was read fine.
  error_kind  None when read fine; `transient` when storage failed (unreachable, timed out, throttled: a
              later run tries the item again), else `input` (see media/errors.py). Storage calls are
              retried first (READ_RETRIES).
  caption     caption when the source has one, else None.
  url         original URL when the source has one, else None.
  metadata    the item's metadata as a JSON object text, or None when it has none: for a WebDataset
              sample the fields of its `.json`, `caption` from its `.txt` and `key` (the sample's key
              as written in the tar, before any `@2`); for a Parquet row every column but binary ones
              (img2dataset's `key`, `url`, `caption`, `width`, `height`, `status`, ...; values JSON can
              not hold, such as timestamps, as text). `metadata_fields` limits it to the fields named.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from media.errors import INPUT, call_with_retries, describe_error, error_kind, storable_text
from media.formats import media_kind
from media.storage import decode_name, encode_name, filesystem, to_uri

TAR_EXTENSION = "tar"
PARQUET_EXTENSION = "parquet"
# img2dataset names the bytes column after its `encode_format`.
IMG2DATASET_IMAGE_COLUMNS = ("jpg", "png", "webp")
IMG2DATASET_COLUMNS = ("key", "url", "caption", "status", "error_message")
STATS_SUFFIX = "_stats.json"  # img2dataset / video2dataset per-shard statistics
SHARD_EXTENSIONS = ("tar", "tfrecord")  # shards an img2dataset Parquet file of the same name describes
FILES_SIDECAR_EXTENSIONS = ("json", "txt")  # img2dataset "files" format: metadata and caption per image

DEFAULT_MAX_ITEM_BYTES = 512 * 1024 * 1024
# One storage call (reading a file, opening a shard) is tried again over a few seconds of connection
# trouble. Longer outages are not waited out here, one file after another in a read task: their items get
# `transient` error rows, and the next run of the job tries them again.
READ_RETRIES: dict[str, Any] = {"tries": 4, "max_seconds": 15.0}
ID_SEPARATOR = "::"  # between a tar / Parquet file's URI and the key of an item inside it


@dataclass(frozen=True)
class ListedFile:
    uri: str          # as `encode_name` text: safe to store in Arrow; `filesystem` and `file_rows` take it
    size: int | None  # None when the filesystem doesn't say


class NoInputFiles(FileNotFoundError):
    """The input matches no file, or only sidecars (the message says how many)."""


@dataclass(frozen=True)
class Listing:
    files: list[ListedFile]  # the input's files, sorted
    sidecars: list[str]      # URIs of the producers' sidecar files left out (see the module docstring)


def list_files(uri: str, storage_options: Mapping[str, Any] | None = None, *,
               include_sidecars: bool = False) -> list[ListedFile]:
    """The files of `list_input`."""
    return list_input(uri, storage_options, include_sidecars=include_sidecars).files


def list_input(uri: str, storage_options: Mapping[str, Any] | None = None, *,
               include_sidecars: bool = False) -> Listing:
    """Files under `uri` (a file, a directory / prefix, or a glob, whose matching directories are
    searched too), sorted, hidden entries below the input and sidecar files left out. Raises
    FileNotFoundError when nothing matches."""
    fs, path = filesystem(uri, storage_options)
    infos: dict[str, dict[str, Any]] = {}
    if fsspec.core.has_magic(path):
        root = _static_prefix(path)
        for name, info in fs.glob(path, detail=True).items():
            infos.update(fs.find(name, withdirs=True, detail=True) if info.get("type") == "directory"
                         else {name: info})
    elif fs.isdir(path):
        root, infos = path, fs.find(path, withdirs=True, detail=True)
    else:
        root, infos = path, {path: fs.info(path)}  # FileNotFoundError for a missing input
    names = sorted(name for name, info in infos.items()
                   if info.get("type") != "directory" and not _is_hidden(name, root))
    folders = [name for name, info in infos.items() if info.get("type") == "directory"]
    sidecars = set() if include_sidecars or names == [path] else sidecar_files(names, folders)
    files = [ListedFile(to_uri(fs, name), infos[name].get("size")) for name in names if name not in sidecars]
    if not files:
        skipped = f" ({len(sidecars)} sidecar files left out)" if sidecars else ""
        raise NoInputFiles(f"no input files match {uri}{skipped}")
    return Listing(files, [to_uri(fs, name) for name in sorted(sidecars)])


def sidecar_files(paths: Collection[str], folders: Collection[str] = ()) -> set[str]:
    """The paths among `paths` (files) that are shard producers' sidecars (the list in the module docstring).
    `folders`: the folders listed with them, empty ones included (a files-format shard whose every download
    failed); the folders that hold files are found from `paths`."""
    listed = set(paths)
    folders = {folder.rstrip("/") for folder in folders} | {path.rsplit("/", 1)[0] for path in listed if "/" in path}
    folders |= {folder.rsplit("/", i)[0] for folder in list(folders) for i in range(1, folder.count("/") + 1)}
    stems: set[str] = set()  # paths of image / video files without their extension
    for path in listed:
        stem, _, extension = path.rpartition(".")
        if stem and media_kind(extension.lower()) is not None:
            stems.add(stem)
    sidecars = set()
    for path in listed:
        stem, _, extension = path.rpartition(".")
        extension = extension.lower()
        if path.rsplit("/", 1)[-1].endswith(STATS_SUFFIX) or (extension == "feather" and "/_tmp/" in f"/{path}"):
            sidecars.add(path)
        elif extension == PARQUET_EXTENSION and (
                stem in folders or any(f"{stem}.{shard}" in listed for shard in SHARD_EXTENSIONS)):
            sidecars.add(path)
        elif extension in FILES_SIDECAR_EXTENSIONS and stem in stems:
            sidecars.add(path)
    return sidecars


def is_container(uri: str) -> bool:
    """Whether the file holds several items (a WebDataset tar or a Parquet file), each with an id of its own."""
    return _extension(uri) in (TAR_EXTENSION, PARQUET_EXTENSION)


def file_rows(
    uri: str, size: int | None, storage_options: Mapping[str, Any] | None, max_item_bytes: int, *,
    media_keys: Sequence[str] | None = None, metadata_fields: Collection[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The item rows of one listed file (never raises for a bad file); `uri` as `list_files` gives it (a
    name with undecodable bytes may also come as it is). `media_keys`: the extensions that may be a
    sample's media, in order of preference (`parse_media_keys`); `metadata_fields`: the metadata fields
    rows carry (None: all)."""
    uri = encode_name(decode_name(uri))
    extension = _extension(uri)
    fields = None if metadata_fields is None else frozenset(metadata_fields)
    if extension == TAR_EXTENSION:
        yield from _tar_rows(uri, storage_options, max_item_bytes, media_keys, fields)
    elif extension == PARQUET_EXTENSION:
        yield from _parquet_rows(uri, storage_options, max_item_bytes, media_keys, fields)
    else:
        yield _plain_file_row(uri, size, extension, storage_options, max_item_bytes)


def _plain_file_row(
    uri: str, size: int | None, extension: str, storage_options: Mapping[str, Any] | None, max_item_bytes: int
) -> dict[str, Any]:
    kind = media_kind(extension)
    if kind is None:
        what = f"unsupported file type .{extension}" if extension else "unsupported file type (no extension)"
        return _row(uri, uri, error=what)
    error = _size_error(size, max_item_bytes) if size is not None else None
    if error is not None:
        return _row(uri, uri, kind, error=error)  # decided from the listing: the bytes are never read
    try:
        fs, path = filesystem(uri, storage_options)
        data = call_with_retries(lambda: fs.cat_file(path), **READ_RETRIES)
    except Exception as exc:  # whatever the filesystem raises, the item gets an error row
        return _row(uri, uri, kind, error=f"cannot read file: {describe_error(exc)}", error_kind=error_kind(exc))
    return _row(uri, uri, kind, data=data, error=_size_error(len(data), max_item_bytes))


def parse_media_keys(value: str) -> tuple[str, ...]:
    """'jpg;png;webp' (webdataset's and clip-retrieval's spelling; ',' also separates) -> ("jpg", "png",
    "webp"). Raises ValueError, in one line, for an empty list or an extension that is not an image or
    video (`seg.png` is: the last part decides)."""
    keys = tuple(key.strip().lower().lstrip(".") for key in value.replace(",", ";").split(";") if key.strip())
    if not keys:
        raise ValueError(f"no media extensions in {value!r} (expected e.g. 'jpg;png;webp')")
    bad = [key for key in keys if not key or media_kind(key.rsplit(".", 1)[-1]) is None]
    if bad:
        raise ValueError(f"not an image or video extension in media keys {value!r}: {', '.join(bad)}")
    return keys


def _tar_rows(uri: str, storage_options: Mapping[str, Any] | None, max_item_bytes: int,
              media_keys: Sequence[str] | None = None, fields: Collection[str] | None = None
              ) -> Iterator[dict[str, Any]]:
    """One row per sample (key) of a WebDataset shard, in archive order. Members are grouped while the
    key stays the same, as webdataset does; a key that comes back later gets an error row of its own.
    A shard that fails (unreadable, truncated, corrupt header) adds a row with the shard's URI as id,
    and the sample being read when it failed gets an error too.

    Member names are decoded losslessly ('surrogateescape'): two names that differ only in bytes that are
    not UTF-8 stay two keys, and their ids spell those bytes out (`encode_name`)."""
    sample: _Sample | None = None
    keys = _ShardKeys()
    samples = 0
    try:
        fs, path = filesystem(uri, storage_options)
        with (
            call_with_retries(lambda: fs.open(path, "rb"), **READ_RETRIES) as raw,
            tarfile.open(fileobj=raw, mode="r:", encoding="utf-8", errors="surrogateescape") as tar,
        ):
            while (member := tar.next()) is not None:
                # the archive's member list would otherwise grow with the shard (not in typeshed's TarFile)
                tar.members.clear()  # type: ignore[attr-defined]
                if member.isdir():
                    continue
                key, extension = _split_key(member.name)
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield sample.row(uri, keys)
                        samples += 1
                    sample = _Sample(key, media_keys, fields)
                sample.add(member, extension, tar, max_item_bytes)
            _check_end_of_archive(raw, tar.offset)
    except Exception as exc:  # whatever the shard does, its failure is reported as rows
        error, kind = f"cannot read tar shard: {describe_error(exc)}", error_kind(exc)
        if sample is not None:
            sample.problems.append(error)
            yield {**sample.row(uri, keys), "error_kind": kind}
        yield _row(uri, uri, error=f"{error} (after {samples} complete samples)", error_kind=kind)
        return
    if sample is not None:
        yield sample.row(uri, keys)


def _check_end_of_archive(raw: Any, offset: int) -> None:
    """tarfile stops quietly at a truncated or corrupt header after the first member; a well-formed
    archive ends with a zero block exactly there."""
    raw.seek(offset)
    if raw.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated or corrupt archive at byte {offset} (no end-of-archive block)")


class _Sample:
    """The members of one WebDataset key read so far."""

    def __init__(self, key: str, media_keys: Sequence[str] | None = None,
                 fields: Collection[str] | None = None) -> None:
        self.key = key                           # may hold undecodable bytes as lone surrogates
        self.media_keys = media_keys             # None: the first image/video member is the media
        self.fields = fields                     # metadata fields to keep (None: all)
        self.media: tuple[str, str] | None = None  # (extension, kind) of the sample's media
        self.members: dict[str, bytes] = {}      # extension -> bytes, for the members that are read
        self.problems: list[str] = []

    def add(self, member: tarfile.TarInfo, extension: str, tar: tarfile.TarFile, max_item_bytes: int) -> None:
        kind = media_kind(extension.rsplit(".", 1)[-1])
        if self.media_keys is not None:
            if extension in self.media_keys:
                ranks = self.media_keys.index
                if self.media is not None and ranks(self.media[0]) < ranks(extension):
                    return  # an extension listed earlier is already the media
                self.media = (extension, kind or "image")  # parse_media_keys lets only media in
                self.members.pop(extension, None)
            elif extension not in ("txt", "json"):
                return  # other members, images among them, are never read
        elif kind is not None:
            if self.media is not None:
                return  # the first image/video member is the sample's media
            self.media = (extension, kind)
        elif extension not in ("txt", "json"):
            return  # other members (labels, pickles, arrays, ...) are never read
        if not member.isfile():
            self.problems.append(f"member {encode_name(member.name)} is not a regular file")
            return
        error = _size_error(member.size, max_item_bytes)
        if error is not None and not (kind is None and member.size == 0):  # an empty caption is fine
            self.problems.append(f"member {encode_name(member.name)}: {error}")
            return
        stream = tar.extractfile(member)
        if stream is None:  # not for a regular file, checked above; kept for the type checker
            self.problems.append(f"member {encode_name(member.name)} cannot be read")
            return
        self.members[extension] = stream.read()

    def row(self, shard_uri: str, keys: _ShardKeys) -> dict[str, Any]:
        """The sample's row; call once per sample, in archive order (`keys` gives its id's key)."""
        key, met_before = keys.take(self.key)
        item_id = item_id_in(shard_uri, key)
        problems = list(self.problems)
        if met_before:
            problems.append(f"key {encode_name(self.key)} appears again further on in the shard (members not adjacent)")
        if self.media is None:
            listed = self.media_keys
            wanted = f"member with extension {'/'.join(listed)}" if listed else "image or video member"
            problems.append(f"no {wanted} in this sample")
        elif self.media[0] not in self.members and not problems:
            problems.append(f"member {encode_name(self.key)}.{self.media[0]} cannot be read")
        fields = self._fields()
        caption, url = _text(fields.get("caption")), _text(fields.get("url"))
        metadata = _metadata_text(fields, self.fields)
        kind = self.media[1] if self.media else None
        if problems or self.media is None:
            return _row(item_id, shard_uri, kind, error="; ".join(problems), caption=caption, url=url,
                        metadata=metadata)
        return _row(item_id, shard_uri, kind, data=self.members[self.media[0]], caption=caption, url=url,
                    metadata=metadata)

    def _fields(self) -> dict[str, Any]:
        """The `.json` fields, `caption` from the `.txt`, and `key` (the sample's key in the tar)."""
        fields: dict[str, Any] = {}
        if "json" in self.members:
            try:
                parsed = json.loads(self.members["json"])
                fields = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                pass  # broken metadata leaves caption/url empty; the media is still usable
        if "txt" in self.members:
            fields["caption"] = self.members["txt"].decode("utf-8", "replace")
        fields["key"] = encode_name(self.key)
        return fields


def _parquet_rows(uri: str, storage_options: Mapping[str, Any] | None, max_item_bytes: int,
                  media_keys: Sequence[str] | None = None, fields: Collection[str] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """One row per row of an img2dataset Parquet file; a file that fails adds a row with its URI as id.
    Rows that share a key (img2dataset can write one twice) get ids of their own and keep their own bytes."""
    done = 0
    keys = _ShardKeys()
    try:
        fs, path = filesystem(uri, storage_options)
        with call_with_retries(lambda: fs.open(path, "rb"), **READ_RETRIES) as raw:
            parquet = pq.ParquetFile(raw)
            names = parquet.schema_arrow.names
            image_columns = media_keys or IMG2DATASET_IMAGE_COLUMNS
            image_column = next((c for c in image_columns if c in names), None)
            if image_column is None:
                wanted = "/".join(image_columns)
                yield _row(uri, uri, error=f"no image bytes column ({wanted}) in Parquet file; columns: {names}")
                return
            schema = parquet.schema_arrow
            image_type = schema.field(image_column).type
            if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
                # refusing other types also keeps pickle-backed extension types (Ray's
                # `arrow_pickled_object`) from ever being turned into Python objects
                yield _row(uri, uri, error=f"column {image_column} has type {image_type}, not binary")
                return
            columns = [c for c in IMG2DATASET_COLUMNS if c in names and _is_plain(schema.field(c).type)]
            extra = [f.name for f in schema if f.name not in columns and _is_metadata(f, fields)]
            for batch in parquet.iter_batches(batch_size=64, columns=[*columns, *extra, image_column]):
                for record in batch.to_pylist():
                    key = record.get("key")
                    item_id = item_id_in(uri, keys.take(str(key if key is not None else done))[0])
                    metadata = {name: record[name] for name in (*columns, *extra)}
                    yield _parquet_row(item_id, uri, record, image_column, max_item_bytes,
                                       _metadata_text(metadata, fields))
                    done += 1
    except Exception as exc:  # whatever the file does, its failure is reported as a row
        yield _row(uri, uri, error=f"cannot read Parquet file: {describe_error(exc)} (after {done} rows)",
                   error_kind=error_kind(exc))


def _is_plain(arrow_type: pa.DataType) -> bool:
    """Text or integer: the only metadata column types worth reading (anything else is ignored)."""
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_integer(arrow_type)


def _is_metadata(field: pa.Field, fields: Collection[str] | None) -> bool:
    """Whether a Parquet column goes into the rows' metadata: any column asked for but binary ones (image
    bytes) and extension types (Ray's `arrow_pickled_object` would unpickle)."""
    if fields is not None and field.name not in fields:
        return False
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    return not isinstance(field.type, pa.ExtensionType) and not any(check(field.type) for check in binary)


def _metadata_text(fields: Mapping[str, Any], wanted: Collection[str] | None) -> str | None:
    """The `metadata` of an item row: its fields (those `wanted`; None: all) as a JSON object, values
    JSON cannot hold written as text; None when nothing is left."""
    kept = {name: value for name, value in fields.items() if (wanted is None or name in wanted) and value is not None}
    if not kept:
        return None
    text = json.dumps(kept, ensure_ascii=False, default=str)
    return text.encode("utf-8", "replace").decode("utf-8")


def _parquet_row(item_id: str, uri: str, record: dict[str, Any], image_column: str,
                 max_item_bytes: int, metadata: str | None = None) -> dict[str, Any]:
    caption, url = _text(record.get("caption")), _text(record.get("url"))
    status = record.get("status")
    data = record[image_column]
    error: str | None
    if status is not None and status != "success":
        reason = record.get("error_message") or "no error message"
        error = f"img2dataset status {status}: {reason}"
    elif data is None:
        error = f"no image bytes in column {image_column}"
    else:
        error = _size_error(len(data), max_item_bytes)
    return _row(item_id, uri, "image", data=data, error=error, caption=caption, url=url, metadata=metadata)


# --- ids ------------------------------------------------------------------------------------------


def item_id_in(file_uri: str, key: str) -> str:
    """The id of the item `key` of the tar / Parquet file `file_uri` (`list_files` text): the two names
    joined by ID_SEPARATOR, escaped as one name when either holds undecodable bytes."""
    return encode_name(f"{decode_name(file_uri)}{ID_SEPARATOR}{key}")


def file_prefixes(name: str) -> Iterator[str]:
    """The names a shard item's id `name` (a `decode_name` text) could belong to: every text before an
    ID_SEPARATOR, shortest first. A key may itself hold `::`, and so may a folder name, so the owning file
    is whichever of these the caller knows (a listed file, a shard with an error row)."""
    position = name.find(ID_SEPARATOR)
    while position != -1:
        yield name[:position]
        position = name.find(ID_SEPARATOR, position + 1)


class _ShardKeys:
    """The keys of one shard's items, made distinct. A key met again gets `@2`, `@3`, ... -- the first
    suffix that no item of the shard has taken yet, so even a real key `a@2` next to a repeated `a`
    keeps every id of the shard unique. Keys are given out in archive / row order, so the same file
    always gives the same ids."""

    def __init__(self) -> None:
        self._taken: set[str] = set()      # keys given out, suffixed or not
        self._suffix: dict[str, int] = {}  # key met -> the last suffix number tried for it (1: none yet)

    def take(self, key: str) -> tuple[str, bool]:
        """(the key for the next item named `key`, whether `key` was met before in this shard)."""
        met_before = key in self._suffix
        number, distinct = self._suffix.get(key, 1), key
        while distinct in self._taken:
            number += 1
            distinct = f"{key}@{number}"
        self._suffix[key] = number
        self._taken.add(distinct)
        return distinct, met_before


# --- small shared helpers --------------------------------------------------------------------------


def _row(
    item_id: str,
    source: str,
    kind: str | None = None,
    *,
    data: bytes | None = None,
    error: str | None = None,
    caption: str | None = None,
    url: str | None = None,
    error_kind: str = INPUT,
    metadata: str | None = None,
) -> dict[str, Any]:
    """An item row; with an `error`, its kind says whether a later run should try the item again."""
    return {
        "id": item_id,
        "source": source,
        "media_kind": kind,
        "data": data if error is None else None,
        "error": None if error is None else storable_text(error),
        "error_kind": None if error is None else error_kind,
        "caption": caption,
        "url": url,
        "metadata": metadata,
    }


def _size_error(size: int, max_item_bytes: int) -> str | None:
    if size == 0:
        return "empty file (0 bytes)"
    if size > max_item_bytes:
        return f"item is {size} bytes, larger than max_item_bytes={max_item_bytes}"
    return None


def _split_key(name: str) -> tuple[str, str]:
    """'dir/0001.seg.png' -> ('dir/0001', 'seg.png'): everything up to the first dot of the basename is
    the key, the rest the (lower-cased) extension -- webdataset's `base_plus_ext` rule."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _extension(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _is_hidden(path: str, root: str) -> bool:
    """Whether a file or one of its directories below the input root has a name starting with '.'."""
    relative = path[len(root):] if path.startswith(root) else path
    return any(part.startswith(".") for part in relative.split("/"))


def _static_prefix(pattern: str) -> str:
    """'bucket/data/*/x.jpg' -> 'bucket/data': the directory part before the first wildcard."""
    first_magic = min(i for i in (pattern.find(c) for c in "*?[") if i != -1)
    return pattern[:first_magic].rpartition("/")[0]


def _text(value: Any) -> str | None:
    """A string safe to store in Arrow (lone surrogates replaced), or None for non-strings."""
    return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else None


