"""Stand-ins for the two model actors, for the scale rehearsal (jobs/scale_rehearsal.py) and its test only.

A rehearsal of the job at 64 actors and 10^6 items cannot load 64 models on the machine it runs on, and does
not need to: what it measures is everything around the model (listing, resume, reading, Ray Data's pools,
the object store, the writer, the manifests). So these classes do to rows what the real `VisionEncoder` and
`Annotator` do, through the same functions (`pipeline.actor_rows.encode_rows` and `annotate_rows`: error rows
pass through, the `done_tasks` of resumed items are honoured, the output schema is the real one), and only the
model call is a sleep of a given number of seconds per item -- a GPU actor waits on its device much as a
sleeping one waits on the clock. No weights are loaded and no model code runs.

Nothing here imports torch, directly or through the real actors' modules (tests/test_scale_rehearsal.py holds
it to that): an actor process that imports torch holds a few hundred MB more than one that imports Ray Data
alone, and that, not the sleeping, is what bounds how many stand-ins one machine can hold.

What the rows say. The vision stand-in gives every item the same small zero tokens (`TOKENS_SHAPE`), so the
rows that cross to the generation pool stay small. The generation stand-in writes `model` = "stand-in" and,
as the annotation, the busy interval of the batch it was in: `stand-in <actor id> <start> <end>` (Unix seconds
of the sleep). The rehearsal reads those intervals back from the output to measure the actors' utilisation.

`stand_in_actors(...)` makes the pair of classes for one cost (class attributes: Ray Data builds actors from a
class, and the job passes them its own constructor arguments); `pipeline.job.JobConfig.actors` takes them.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.actor_rows import VisualTokens, annotate_rows, encode_rows
from pipeline.annotator_spec import AnnotatorSpec

STAND_IN_MODEL = "stand-in"          # the `model` column of the rows the stand-in writes
TOKENS_SHAPE = (1, 8)                 # an item's visual tokens: one token of 8 floats (32 bytes)
_ANNOTATION_PREFIX = "stand-in "


class StandInEncoder:
    """The vision actor's row handling around a model that sleeps `item_seconds` per item and returns zero
    tokens. Takes the real actor's constructor arguments and ignores them."""

    item_seconds = 0.0

    def __init__(self, model: str, device: str | None = None, trust_remote_code: bool = False,
                 dtype: str = "auto"):
        self.tokens = VisualTokens(np.zeros(TOKENS_SHAPE, np.float32).tobytes(), list(TOKENS_SHAPE), "float32")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_rows(batch, self._sleep)

    def _sleep(self, pixels: np.ndarray) -> list[VisualTokens]:
        time.sleep(self.item_seconds * len(pixels))
        return [self.tokens] * len(pixels)


class StandInAnnotator:
    """The generation actor's row handling around a model that sleeps `item_seconds` per item and task. With
    `ballast_mb`, each actor also holds that many MiB of touched memory, standing in for the model's weights."""

    item_seconds = 0.047
    ballast_mb = 0

    def __init__(self, spec: AnnotatorSpec):
        self.tasks = spec.tasks
        self.ballast = np.ones(self.ballast_mb << 20, np.uint8)
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return annotate_rows(batch, self.tasks, STAND_IN_MODEL, self._sleep)

    def _sleep(self, task_index: int, rows: list[dict]) -> list[dict]:
        start = time.time()
        time.sleep(self.item_seconds * len(rows))
        annotation = f"{_ANNOTATION_PREFIX}{self.actor_id} {start:.3f} {time.time():.3f}"
        return [{"annotation": annotation, "score": 0.0, "seconds": self.item_seconds} for _ in rows]


def stand_in_actors(item_seconds: float, *, vision_item_seconds: float = 0.0,
                    ballast_mb: int = 0) -> tuple[type, type]:
    """(vision, generation) stand-in classes for `JobConfig.actors`: the generation actor takes `item_seconds`
    per item and task, the vision actor `vision_item_seconds` per item."""
    encoder = type("StandInEncoder", (StandInEncoder,), {"item_seconds": vision_item_seconds})
    annotator = type("StandInAnnotator", (StandInAnnotator,), {"item_seconds": item_seconds,
                                                               "ballast_mb": ballast_mb})
    return encoder, annotator


def busy_intervals(annotations: pa.Array | pa.ChunkedArray) -> dict[str, list[tuple[float, float]]]:
    """Actor id -> its batches' (start, end) sleeps, from the output's `annotation` column (one entry per batch:
    the rows of a batch share their annotation)."""
    by_actor: dict[str, set[tuple[float, float]]] = {}
    for text in set(annotations.to_pylist()):
        if text is None or not text.startswith(_ANNOTATION_PREFIX):
            continue
        actor, start, end = text[len(_ANNOTATION_PREFIX):].rsplit(" ", 2)
        by_actor.setdefault(actor, set()).add((float(start), float(end)))
    return {actor: sorted(spans) for actor, spans in by_actor.items()}


def utilisation(intervals: dict[str, list[tuple[float, float]]], pool_size: int) -> dict[str, Any]:
    """Busy share of a pool of `pool_size` actors over the steady part of a run: from the moment the last actor
    that got work began its first batch to the moment the first one ended its last. Idle time in that window is
    time an actor waited for input, and an actor that never got work (Ray Data hands an actor whole blocks: a
    pool needs as many blocks in flight as actors) counts as idle throughout. `start_spread_s`: how far apart the
    actors began their first batches (actors that come up one by one leave a short window, a weak figure)."""
    working = len(intervals)
    if not intervals:
        return {"actors_used": 0, "window_s": 0.0, "start_spread_s": None, "utilisation": None}
    firsts = [spans[0][0] for spans in intervals.values()]
    begin = max(firsts)
    end = min(spans[-1][1] for spans in intervals.values())
    window, spread = end - begin, round(begin - min(firsts), 3)
    if window <= 0:
        return {"actors_used": working, "window_s": 0.0, "start_spread_s": spread, "utilisation": None}
    busy = sum(max(0.0, min(e, end) - max(s, begin)) for spans in intervals.values() for s, e in spans)
    return {"actors_used": working, "window_s": round(window, 3), "start_spread_s": spread,
            "utilisation": round(busy / (max(pool_size, working) * window), 4)}
