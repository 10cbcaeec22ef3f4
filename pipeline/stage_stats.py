"""Items/s per stage of a finished run, read from Ray Data's own execution statistics.

A run's record (pipeline/runs.py) says how fast each stage went, so a slow job shows where its time went
without re-running it under a profiler: reading and decoding (Ray tasks), the vision pool and the generation
pool (actors). For every operator of the executed dataset the record holds:

- `rows_in` / `rows_out`: rows it took and gave (the generation pool gives one row per item and task);
- `busy_s`: seconds its tasks or actor calls spent working, summed over all of them;
- `items_per_busy_second`: `rows_in / busy_s` (`rows_out` for a read), the rate of one worker of the
  stage (what one more actor adds);
- `span_s` and `items_per_second`: first start to last end, and `rows_in / span_s`, the stage's own
  throughput in this run (with overlap, the slowest stage's figure is the job's).

Ray Data keeps these figures in its stats summary (`Dataset._get_stats_summary`, not a public API in Ray
2.60); reading them is best-effort: anything unexpected gives no stage figures, never a failed run. A test
(tests/test_output_runs.py) fails when a Ray upgrade takes them away.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def stage_rates(dataset: Any) -> list[dict[str, Any]]:
    """Per-operator figures of an executed `ray.data.Dataset`, in pipeline order; [] if Ray has none."""
    try:
        summaries = _in_pipeline_order(dataset._get_stats_summary())
        return [_rates(op) for summary in summaries for op in summary.operators_stats if not op.is_sub_operator]
    except Exception as exc:  # private API: a Ray upgrade may change it; the run itself is unaffected
        log.debug("no per-stage figures: %s: %s", type(exc).__name__, exc)
        return []


def _in_pipeline_order(summary: Any) -> list[Any]:
    """A stats summary lists its own operators; the operators before them hang under `parents`."""
    earlier = [s for parent in summary.parents or () for s in _in_pipeline_order(parent)]
    return [*earlier, summary]


def _rates(op: Any) -> dict[str, Any]:
    rows_in = op.total_input_num_rows
    rows_out = int(op.output_num_rows.sum) if op.output_num_rows is not None else None
    items = rows_in or rows_out  # a read has no input rows: its items are what it gave
    busy = float(op.wall_time.sum) if op.wall_time is not None else None
    span = (op.latest_end_time - op.earliest_start_time
            if op.latest_end_time is not None and op.earliest_start_time is not None else None)
    return {
        "stage": op.operator_name,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "busy_s": _round(busy),
        "items_per_busy_second": _round(items / busy) if items and busy else None,
        "span_s": _round(span),
        "items_per_second": _round(items / span) if items and span else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
