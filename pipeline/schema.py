"""The two tables of a job, as Arrow schemas: the items it reads and the annotations it writes.

Only pyarrow is imported here, so the query command can name output columns without loading Ray.

`ITEM_SCHEMA`, one row per input item (`pipeline/read.py`; the fields of `media.files` item rows):
  id          string        stable item id (see media/files.py): the file URI, or `<file uri>::<key>`
  source      string        URI of the file the item came from (local files: absolute path)
  media_kind  string        "image" | "video" | null (unsupported / unknown)
  data        large_binary  the encoded media bytes; null whenever `error` is set
  error       string        null when the item was read fine
  caption     string        caption when the source has one, else null
  url         string        original URL when the source has one, else null

`OUTPUT_SCHEMA`, one row per input item and task (`pipeline/write.py`):
  id            string     the item id (never null)
  source        string     URI of the file the item came from (never null)
  task          string     task name (never null)
  task_hash     string     hash of the task definition, to tell edited tasks apart (never null)
  output_column string     the task's column name in the `items` query view (the task name by default)
  model         string     model name (never null)
  annotation    string     the generated text / chosen label; null on error
  score         float64    mean token log-probability of the annotation; null on error
  label_scores  list<struct<label: string, score: float64>>
                           one entry per candidate label, in the task's label order; null for
                           open-ended tasks and on error. A list of structs rather than a map: pandas
                           gives a list of {"label", "score"} dicts, DuckDB a LIST of STRUCTs
                           (`UNNEST(label_scores)`), both without extra conversion.
  error         string     what went wrong for this item; null when it was annotated
  seconds       float64    time spent on this item
  created_at    timestamp[us, UTC]   when the row was produced (filled in at write time if absent)
"""

from __future__ import annotations

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
CREATED_AT_COLUMN = "created_at"

ITEM_SCHEMA = pa.schema(
    [
        (ID_COLUMN, pa.string()),
        (SOURCE_COLUMN, pa.string()),
        ("media_kind", pa.string()),
        ("data", pa.large_binary()),
        (ERROR_COLUMN, pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
    ]
)

LABEL_SCORE_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64())])
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
        ("seconds", pa.float64()),
        (CREATED_AT_COLUMN, pa.timestamp("us", tz="UTC")),
    ]
)
REQUIRED_COLUMNS = (ID_COLUMN, SOURCE_COLUMN, TASK_COLUMN, TASK_HASH_COLUMN, MODEL_COLUMN)
