"""Generation stage: a Ray actor that holds the LM + gated blocks and, per task, the few-shot prefix.

Each task's demonstrations are encoded and run through the LM once, when the actor starts
(`Flamingo.prepare_prefix`); every query item then pays only for its own tokens. Open-ended tasks
generate, closed-ended ones score every label in one batched pass (and, with `calibrate: true`, divide out the
label prior the prompt gives content-free images, measured once per task: flamingo/calibration.py). Every input
row gives exactly one output row per task, with `error` set when the item could not be annotated.

The actor is built from one `AnnotatorSpec`: Ray pickles it to every actor of the pool, so it holds the
loaded tasks themselves, never paths to load again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from media.decode import DecodeConfig, frames_to_uint8, normalization, resize_transform
from media.isolation import IsolatedDecoder
from media.normalize import normalize
from pipeline.encode import pick_device, visual_tensor
from pipeline.schema import CREATED_AT_COLUMN, OUTPUT_SCHEMA, RUN_ID_COLUMN, infer_error_kind
from pipeline.task import Task

if TYPE_CHECKING:  # the model library is loaded in the actor, not where this module is imported
    from flamingo import FewShotPrefix

# What the actor returns: the output rows without `created_at` and `run_id`, which the writer fills in, and
# with the item's `metadata`, from which the writer takes the kept input columns (pipeline/kept_columns.py).
_ROWS_SCHEMA = pa.schema([f for f in OUTPUT_SCHEMA if f.name not in (CREATED_AT_COLUMN, RUN_ID_COLUMN)]
                         + [pa.field("metadata", pa.string())])


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


@dataclass
class _PreparedTask:
    task: Task
    prefix: FewShotPrefix               # empty for a zero-shot task without instruction
    query_ids: torch.Tensor             # (1, Lq): every item's prompt after the prefix is the same
    candidates: list[list[int]]         # classify: token ids of each label's continuation
    prior: torch.Tensor | None = None   # classify with `calibrate`: p_cf, the labels' content-free prior (K,)


def load_demonstration_pixels(task: Task, decode: DecodeConfig, storage_options: Mapping[str, Any]) -> torch.Tensor:
    """(1, n_demos, F, 3, H, W) pixels of a task's demonstrations (all images, or all clips of F frames).

    Decoded in a child process as items are (`media.isolation`): `validate` checked these files, but they may
    have changed since, and a demonstration that crashed the decoder would take the actor with it, again at
    every restart. Resized and normalised as the job's items are (uint8, then `media.normalize`), so a picture
    gives the model the same float32 values as a demonstration and as an item."""
    config = dataclasses.replace(decode, num_frames=task.video.num_frames, fps=task.video.fps)
    transform = resize_transform(config)
    arrays: list[np.ndarray] = []
    with IsolatedDecoder(config) as decoder:
        for demo in task.demonstrations:
            with fsspec.open(demo.media, "rb", **storage_options) as f:
                frames, error = decoder.decode(demo.media_type, f.read())
            array = None
            if frames is not None:
                array, error = frames_to_uint8(demo.media_type, frames, transform)
            if array is None:
                raise ValueError(f"{task.path}: demonstration {demo.media}: {error}")
            arrays.append(array)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"{task.path}: demonstrations must all have the same number of frames")
    return normalize(torch.from_numpy(np.stack(arrays)), *normalization(config))[None]


class Annotator:
    """Loaded once per actor; called on batches of rows carrying visual tokens."""

    def __init__(self, spec: AnnotatorSpec):
        from flamingo import load_model

        self.spec = spec
        self.device = pick_device(spec.device)
        self.model = load_model(spec.model, device=self.device, dtype=spec.dtype,
                                trust_remote_code=spec.trust_remote_code)
        decode = DecodeConfig.for_model(self.model.config)
        self.tasks = [self._prepare(t, decode, spec.storage_options.get(t.name, {})) for t in spec.tasks]

    @torch.inference_mode()
    def _prepare(self, task: Task, decode: DecodeConfig, storage_options: Mapping[str, Any]) -> _PreparedTask:
        model = self.model
        prefix_ids, _ = model.tokenize([task.prefix_text()])
        demos = load_demonstration_pixels(task, decode, storage_options) if task.demonstrations else None
        # A zero-shot task without instruction has an empty prefix: each query is then the whole prompt.
        vision_x = None if demos is None else demos.to(self.device, model.dtype)
        prefix = model.prepare_prefix(prefix_ids, vision_x=vision_x)
        query_ids, _ = model.tokenize([task.query_text()])
        candidates = [model.tokenizer.encode(c, add_special_tokens=False) for c in task.candidates()]
        prior = None
        if task.calibrate:
            from flamingo.calibration import label_prior

            prior = label_prior(model, query_ids, candidates, prefix, task.generation.length_normalize)
        return _PreparedTask(task, prefix, query_ids, candidates, prior)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict] = []
        for prepared in self.tasks:
            task = prepared.task
            # Resume: the read task named the tasks an item is done for already (pipeline/read.py)
            todo = [r for r in rows if task.name not in (r.get("done_tasks") or ())]
            ok = [r for r in todo if r["error"] is None and r["visual"] is not None]
            results = iter(self._annotate(prepared, ok) if ok else [])
            for r in todo:  # results come in the order of `ok`: matched by position, never by id
                annotated = r["error"] is None and r["visual"] is not None
                res = next(results) if annotated else {"error": r["error"] or "no visual tokens"}
                error, kind = res.get("error"), None
                if error is not None:  # the reader's kind when it gave one, else inferred from the text
                    kind = (r.get("error_kind") if r["error"] else None) or infer_error_kind(error)
                out.append({"id": r["id"], "source": r["source"], "task": task.name, "task_hash": task.sha256,
                            "output_column": task.output_column,
                            "model": self.spec.model, "annotation": res.get("annotation"),
                            "score": res.get("score"), "label_scores": res.get("label_scores"),
                            "error": error, "error_kind": kind, "seconds": res.get("seconds", 0.0),
                            "metadata": r.get("metadata")})
        return pa.Table.from_pylist(out, schema=_ROWS_SCHEMA)

    def _annotate(self, prepared: _PreparedTask, rows: list[dict]) -> list[dict]:
        start = time.perf_counter()
        model, task = self.model, prepared.task
        visual = torch.stack([visual_tensor(r["visual"], r["visual_shape"], r["visual_dtype"]) for r in rows])
        visual = visual[:, None].to(self.device, model.dtype)                        # (B, 1, n, D)
        query = prepared.query_ids.expand(len(rows), -1)
        try:
            if task.kind == "classify":
                results = self._classify(prepared, query, visual)
            else:
                results = self._generate(prepared, query, visual)
        except Exception as exc:  # keep the job alive: this batch's items become error rows
            return [{"error": f"generation failed: {type(exc).__name__}: {exc}"} for _ in rows]
        seconds = (time.perf_counter() - start) / len(rows)
        return [{**r, "seconds": seconds} for r in results]

    def _generate(self, prepared: _PreparedTask, query: torch.Tensor, visual: torch.Tensor) -> list[dict]:
        g = prepared.task.generation
        out = self.model.generate(lang_x=query, visual_tokens=visual, prefix=prepared.prefix,
                                  max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=g.do_sample,
                                  temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, return_dict=True)
        texts = self.model.decode(out.new_tokens)
        return [{"annotation": t, "score": float(s)} for t, s in zip(texts, out.mean_logprob.tolist())]

    def _classify(self, prepared: _PreparedTask, query: torch.Tensor, visual: torch.Tensor) -> list[dict]:
        task = prepared.task
        scores = self.model.score(query, prepared.candidates, visual_tokens=visual, prefix=prepared.prefix,
                                  length_normalize=task.generation.length_normalize)
        labels = [label.strip() for label in task.labels]   # " two" is scored; "two" is the annotation
        raw = scores.tolist()
        if prepared.prior is None:
            calibrated: list[list[float | None]] = [[None] * len(labels) for _ in raw]
            chosen = raw
        else:
            from flamingo.calibration import calibrate

            calibrated = chosen = calibrate(scores, prepared.prior).tolist()
        results = []
        for row, cal, by in zip(raw, calibrated, chosen):
            best = int(np.argmax(by))
            results.append({"annotation": labels[best], "score": by[best],
                            "label_scores": [{"label": lb, "score": s, "calibrated": c}
                                             for lb, s, c in zip(labels, row, cal)]})
        return results
