"""What a generation actor is built from: `AnnotatorSpec`, decided on the driver.

Ray pickles one spec to every actor of the generation pool, so it holds the loaded tasks themselves, never paths
to load again, and no item ids (what is done comes with the rows: pipeline/read.py). It lives apart from the actor
(pipeline/generate.py) because unpickling it must not import torch: the scale rehearsal's stand-in actors
(pipeline/stand_in.py) are built from the same spec in processes that never load a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.task import Task


@dataclass(frozen=True)
class AnnotatorSpec:
    """Everything a generation actor needs, decided on the driver."""

    model: str                                        # model name or path; also the `model` column
    trust_remote_code: bool                           # the model's own code may run (the caller said so)
    tasks: tuple[Task, ...]                           # loaded and validated
    device: str | None = None                         # None: cuda when the actor got a GPU, else cpu
    dtype: str = "auto"                               # flamingo.dtypes: auto is bfloat16 on CUDA, else float32
    # task name -> fsspec options for reading that task's demonstration media
    storage_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
