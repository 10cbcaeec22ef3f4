"""What the two model actors do to rows, apart from the model: the row handling of `pipeline.encode.VisionEncoder`
and `pipeline.generate.Annotator`, as functions that take the model call as an argument.

Why apart. Every promise the job makes about rows is kept here, not by the model: error rows pass through, pixels
of an unknown encoding become an error rather than a guess, items with the same pixel shape are encoded together,
a model call that fails turns its batch into error rows instead of stopping the job, items already done for a
task (the read's `done_tasks`, on resume) are left out, and every other input row gives exactly one output row per
task, in the output schema (`ROWS_SCHEMA`). Keeping that apart from torch lets the scale rehearsal's stand-ins
(pipeline/stand_in.py) run this very code with a sleep for a model, in actor processes that never import torch
(torch alone takes a few hundred MB per process, which is what limits how many stand-ins fit on one machine).

The model calls, as the actors pass them:
  encode(pixels)      (B, F, 3, H, W) uint8 pixels of B items of one shape -> B `VisualTokens`
  annotate(i, rows)   the rows (as dicts) of items to annotate for the i-th task -> one result dict per row, in
                      their order: `annotation`, `score`, `label_scores`, `seconds` (each optional; `seconds`
                      defaults to the call's time per row)
Nothing here imports torch (media.decode imports it only to build a transform, which no actor does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from media.decode import PIXELS_ENCODING, pixels_array
from pipeline.schema import CREATED_AT_COLUMN, OUTPUT_SCHEMA, RUN_ID_COLUMN, infer_error_kind
from pipeline.task import Task

# What the generation actors return: the output rows without `created_at` and `run_id`, which the writer fills
# in, and with the item's `metadata`, from which the writer takes the kept input columns (pipeline/kept_columns.py).
ROWS_SCHEMA = pa.schema([f for f in OUTPUT_SCHEMA if f.name not in (CREATED_AT_COLUMN, RUN_ID_COLUMN)]
                        + [pa.field("metadata", pa.string())])


class VisualTokens(NamedTuple):
    """One item's visual tokens as they travel to the generation actors (pipeline/encode.py's columns)."""

    data: bytes          # `visual`: the C-order bytes of the [n, D] tokens
    shape: list[int]     # `visual_shape`: [n, D]
    dtype: str           # `visual_dtype`: float32 / float16 / bfloat16


Encode = Callable[[np.ndarray], Sequence[VisualTokens]]
Annotate = Callable[[int, list[dict[str, Any]]], list[dict[str, Any]]]


def encode_rows(batch: pa.Table, encode: Encode) -> pa.Table:
    """The vision actor's output for a batch of decoded rows: `pixels*` replaced by `visual*`, `error` set for the
    items that could not be encoded, every other column as it came."""
    pixels = batch.column("pixels").to_pylist()
    shapes = batch.column("pixels_shape").to_pylist()
    errors = batch.column("error").to_pylist()
    encodings = batch.column("pixels_dtype").to_pylist()
    visual: list[bytes | None] = [None] * len(pixels)
    visual_shape: list[list[int] | None] = [None] * len(pixels)
    visual_dtype: list[str | None] = [None] * len(pixels)
    # Items with the same frame count are encoded together: images in one batch, clips in another.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, shape, error, encoding) in enumerate(zip(pixels, shapes, errors, encodings)):
        if error is None and p is not None:
            if encoding != PIXELS_ENCODING:
                errors[i] = f"pixels of unknown encoding {encoding!r}; expected {PIXELS_ENCODING!r}"
                continue
            groups.setdefault(tuple(shape), []).append(i)
    for shape, rows in groups.items():
        x = np.stack([pixels_array(pixels[i], shape) for i in rows])
        try:
            tokens = encode(x)
        except Exception as exc:  # a bad batch must not take the job down: its items get error rows
            for i in rows:
                errors[i] = f"vision encoder failed: {type(exc).__name__}: {exc}"
            continue
        for i, t in zip(rows, tokens):
            visual[i], visual_shape[i], visual_dtype[i] = t.data, list(t.shape), t.dtype
    out = batch.drop_columns(["pixels", "pixels_shape", "pixels_dtype"])
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.append_column(pa.field("visual", pa.large_binary()), pa.array(visual, pa.large_binary()))
    out = out.append_column(pa.field("visual_shape", pa.list_(pa.int32())),
                            pa.array(visual_shape, pa.list_(pa.int32())))
    return out.append_column(pa.field("visual_dtype", pa.string()), pa.array(visual_dtype, pa.string()))


def annotate_rows(batch: pa.Table, tasks: Sequence[Task], model: str, annotate: Annotate) -> pa.Table:
    """The generation actor's output for a batch of rows carrying visual tokens: one row per item and task
    (`ROWS_SCHEMA`), but none for a task the item is done for already; `model` fills the `model` column."""
    rows = batch.to_pylist()
    out: list[dict[str, Any]] = []
    for index, task in enumerate(tasks):
        # Resume: the read task named the tasks an item is done for already (pipeline/read.py)
        todo = [r for r in rows if task.name not in (r.get("done_tasks") or ())]
        ok = [r for r in todo if r["error"] is None and r["visual"] is not None]
        results = iter(_annotated(annotate, index, ok) if ok else [])
        for r in todo:  # results come in the order of `ok`: matched by position, never by id
            annotated = r["error"] is None and r["visual"] is not None
            res = next(results) if annotated else {"error": r["error"] or "no visual tokens"}
            error, kind = res.get("error"), None
            if error is not None:  # the reader's kind when it gave one, else inferred from the text
                kind = (r.get("error_kind") if r["error"] else None) or infer_error_kind(error)
            out.append({"id": r["id"], "source": r["source"], "task": task.name, "task_hash": task.sha256,
                        "output_column": task.output_column,
                        "model": model, "annotation": res.get("annotation"),
                        "score": res.get("score"), "label_scores": res.get("label_scores"),
                        "error": error, "error_kind": kind, "seconds": res.get("seconds", 0.0),
                        "metadata": r.get("metadata")})
    return pa.Table.from_pylist(out, schema=ROWS_SCHEMA)


def _annotated(annotate: Annotate, index: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`annotate(index, rows)`, timed per row; a call that fails makes error rows of the batch, not a dead actor."""
    start = time.perf_counter()
    try:
        results = annotate(index, rows)
    except Exception as exc:  # keep the job alive: this batch's items become error rows
        return [{"error": f"generation failed: {type(exc).__name__}: {exc}"} for _ in rows]
    seconds = (time.perf_counter() - start) / len(rows)
    return [{"seconds": seconds, **r} for r in results]
