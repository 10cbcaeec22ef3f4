"""Input metadata kept in the output: `--keep-columns url,caption,key`.

The readers put each item's metadata in its row (`metadata`: a JSON object, see media/files.py): a WebDataset
sample's `.json` fields, its `.txt` as `caption` and its `key`; an img2dataset Parquet row's columns (`key`,
`url`, `caption`, `width`, `height`, `status`, ...). That text rides along through decoding, encoding and
generation, and the writer turns the kept fields into output columns of their own, named as in the input, so
joining the annotations back to the producer's metadata needs no splitting of `id`:
  - every kept column is a string: text as it is, numbers and booleans as JSON writes them (`64`, `true`),
    lists and objects as JSON text;
  - null where the item lacks the field (loose image files have no `key`).
By default the producer's `key` is kept. A kept name that is already an output column (`id`, `source`, `task`,
`error`, ...) or a task's column in the `items` view is refused before the job starts.

Pyarrow only: the query command reads the kept names back (`KEPT_COLUMNS_KEY`) without loading Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from pipeline.schema import OUTPUT_SCHEMA

DEFAULT_KEEP_COLUMNS = ("key",)
METADATA_COLUMN = "metadata"  # the item rows' JSON metadata, as it travels to the writer
# Parquet key-value metadata of an output file: a JSON list of the kept column names it holds.
KEPT_COLUMNS_KEY = b"flamingo_annotate.kept_columns"


def parse_keep_columns(text: str) -> tuple[str, ...]:
    """'url,caption,key' -> ("url", "caption", "key"); '' keeps none."""
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def check_keep_columns(names: Sequence[str], task_columns: Iterable[str] = ()) -> None:
    """Raise ValueError, in one line, for a kept name that another output column already has: one of
    OUTPUT_SCHEMA's, or a task's column in the `items` query view (`task_columns`)."""
    taken = {*OUTPUT_SCHEMA.names, METADATA_COLUMN}
    clashes = [name for name in names if name in taken]
    if clashes:
        raise ValueError(f"--keep-columns: {', '.join(clashes)} would replace an output column of the same name "
                         f"({', '.join(OUTPUT_SCHEMA.names)})")
    tasks = [name for name in names if name in set(task_columns)]
    if tasks:
        raise ValueError(f"--keep-columns: {', '.join(tasks)} is also a task's output column")


def kept_arrays(metadata: Sequence[str | None], names: Sequence[str]) -> list[pa.Array]:
    """One string array per kept name, from the rows' JSON `metadata` (see the module docstring)."""
    parsed = [_fields(text) for text in metadata]
    return [pa.array([as_text(fields.get(name)) for fields in parsed], pa.string()) for name in names]


def kept_columns(schema: pa.Schema) -> list[str]:
    """The kept column names an output file's schema metadata records (none for most older files)."""
    return list(json.loads((schema.metadata or {}).get(KEPT_COLUMNS_KEY, b"[]")))


def as_text(value: Any) -> str | None:
    """A kept value as it is stored: text as is, anything else as JSON text; None stays None."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _fields(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}
