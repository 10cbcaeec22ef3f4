"""The two tables of a job, as Arrow schemas: the items it reads and the annotations it writes.

Only pyarrow (and media.errors, plain Python) is imported here, so the query command can name output columns
without loading Ray.

`ITEM_SCHEMA`, one row per input item (`pipeline/read.py`; the fields of `media.files` item rows):
  id          string        stable item id (see media/files.py): the file URI, or `<file uri>::<key>` (a key
                            met again in one shard: `@2`, `@3`, ...); names that are not UTF-8 as
                            `media.storage.encode_name` writes them (`bytes:` + %XX escapes)
  source      string        URI of the file the item came from (local files: absolute path)
  media_kind  string        "image" | "video" | null (unsupported / unknown)
  data        large_binary  the encoded media bytes; null whenever `error` is set
  error       string        null when the item was read fine
  error_kind  string        `transient` | `input` when the reader says which (media/errors.py); null
                            otherwise (the pipeline then infers it from `error`, see OUTPUT_SCHEMA)
  caption     string        caption when the source has one, else null
  url         string        original URL when the source has one, else null
  metadata    string        the item's metadata fields as a JSON object (WebDataset `.json` fields, `.txt` as
                            `caption`, the sample `key`; img2dataset Parquet columns), only those the job keeps
                            (pipeline/kept_columns.py); null when it has none

`OUTPUT_SCHEMA`, one row per input item and task (`pipeline/write.py`):
  id            string     the item id (never null)
  source        string     URI of the file the item came from (never null)
  task          string     task name (never null)
  task_hash     string     hash of the task definition, to tell edited tasks apart (never null)
  output_column string     the task's column name in the `items` query view (the task name by default)
  model         string     model name (never null)
  annotation    string     the generated text / chosen label; null on error
  score         float64    generate: mean token log-probability of the annotation. classify: the chosen
                           label's `label_scores.score`, or for a task with `calibrate: true` its
                           `label_scores.calibrated`. Null on error
  label_scores  list<struct<label: string, score: float64, calibrated: float64>>
                           one entry per candidate label, in the task's label order; null for
                           open-ended tasks and on error. `score`: the label's log-likelihood as the
                           continuation of the prompt, the mean over its tokens (`length_normalize`, the
                           default) or their sum, not normalised over the labels; the label with the
                           highest is the uncalibrated answer. `calibrated`: with `calibrate: true`, the
                           label's calibrated log-probability log q (flamingo/calibration.py), normalised
                           over the labels (exp sums to 1), its argmax the annotation; null otherwise, and in
                           outputs written before it existed (readers here cast those to this type). A list
                           of structs rather than a map: pandas gives a list of {"label", "score",
                           "calibrated"} dicts, DuckDB a LIST of STRUCTs (`UNNEST(label_scores)`), both
                           without extra conversion.
  error         string     what went wrong for this item; null when it was annotated
  error_kind    string     null when annotated; else `transient` (storage unreachable, timed out or
                           throttled: re-attempted by the next run), `input` (the item itself is bad) or
                           `model` (the vision encoder or the LM failed). When the reader gives no kind,
                           read errors ("cannot read file: ...", "cannot read tar shard: ...",
                           "cannot read Parquet ...") that name a transient cause count as transient,
                           other errors as input, and encoder / generation failures as model.
  seconds       float64    time spent on this item
  created_at    timestamp[us, UTC]   when the row was produced (filled in at write time if absent)
  run_id        string     the run that wrote the row: `YYYYMMDDTHHMMSSZ-xxxxxx` (UTC start time and a
                           random suffix), so run ids sort by start time
followed by the input metadata columns the job keeps (`--keep-columns`; by default `key` when the input has
WebDataset or Parquet shards), each a string named as in the input, null when the item lacks it
(pipeline/kept_columns.py); their names are in the file's metadata (`kept_columns.KEPT_COLUMNS_KEY`).
Outputs of runs that kept different columns read together, by name: a column a file lacks reads as null.

Outputs written before `error_kind` and `run_id` existed lack those columns; readers here treat them as
null (the kind of such an error row is inferred from its text, as above).
"""

from __future__ import annotations

import json

import pyarrow as pa

# Output columns that code refers to by name.
ID_COLUMN = "id"
SOURCE_COLUMN = "source"
TASK_COLUMN = "task"
TASK_HASH_COLUMN = "task_hash"
OUTPUT_COLUMN_COLUMN = "output_column"  # names the task columns of the `items` query view
MODEL_COLUMN = "model"
ANNOTATION_COLUMN = "annotation"
ERROR_COLUMN = "error"
ERROR_KIND_COLUMN = "error_kind"
CREATED_AT_COLUMN = "created_at"
RUN_ID_COLUMN = "run_id"

ITEM_SCHEMA = pa.schema(
    [
        (ID_COLUMN, pa.string()),
        (SOURCE_COLUMN, pa.string()),
        ("media_kind", pa.string()),
        ("data", pa.large_binary()),
        (ERROR_COLUMN, pa.string()),
        (ERROR_KIND_COLUMN, pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("metadata", pa.string()),
    ]
)

LABEL_SCORE_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64()), ("calibrated", pa.float64())])
OUTPUT_SCHEMA = pa.schema(
    [
        (ID_COLUMN, pa.string()),
        (SOURCE_COLUMN, pa.string()),
        (TASK_COLUMN, pa.string()),
        (TASK_HASH_COLUMN, pa.string()),
        (OUTPUT_COLUMN_COLUMN, pa.string()),
        (MODEL_COLUMN, pa.string()),
        (ANNOTATION_COLUMN, pa.string()),
        ("score", pa.float64()),
        ("label_scores", pa.list_(LABEL_SCORE_TYPE)),
        (ERROR_COLUMN, pa.string()),
        (ERROR_KIND_COLUMN, pa.string()),
        ("seconds", pa.float64()),
        (CREATED_AT_COLUMN, pa.timestamp("us", tz="UTC")),
        (RUN_ID_COLUMN, pa.string()),
    ]
)
# Parquet key-value metadata of a file rewritten without superseded rows: a JSON list of the file names it
# replaces. Readers leave such a replaced file out if it is still there (a rewrite cut short).
REPLACES_KEY = b"flamingo_annotate.replaces"


def replaced_files(schema: pa.Schema) -> list[str]:
    """The file names a Parquet file's schema metadata says it replaces (REPLACES_KEY); none for most files."""
    return list(json.loads((schema.metadata or {}).get(REPLACES_KEY, b"[]")))

REQUIRED_COLUMNS = (ID_COLUMN, SOURCE_COLUMN, TASK_COLUMN, TASK_HASH_COLUMN, MODEL_COLUMN)

# Error texts the readers and model stages begin with (media/files.py, pipeline/encode.py, pipeline/generate.py).
READ_ERROR_PREFIXES = ("cannot read file:", "cannot read tar shard:", "cannot read Parquet")
MODEL_ERROR_PREFIXES = ("vision encoder failed:", "generation failed:", "no visual tokens")


def infer_error_kind(error: str) -> str:
    """The `error_kind` of an error row that came without one (see OUTPUT_SCHEMA): the fallback for readers
    that do not classify their failures themselves, and for outputs written before the column existed."""
    from media.errors import INPUT, MODEL, TRANSIENT, is_transient_text

    if error.startswith(MODEL_ERROR_PREFIXES):
        return MODEL
    if error.startswith(READ_ERROR_PREFIXES) and is_transient_text(error):
        return TRANSIENT
    return INPUT
