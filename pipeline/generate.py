"""Generation stage: a Ray actor that holds the LM + gated blocks and, per task, the few-shot prefix.

Each task's demonstrations are encoded and run through the LM once, when the actor starts
(`Flamingo.prepare_prefix`); every query item then pays only for its own tokens. Open-ended tasks
generate, closed-ended ones score every label in one batched pass (and, with `calibrate: true`, divide out the
label prior the prompt gives content-free images, measured once per task: flamingo/calibration.py). Every input
row gives exactly one output row per task, with `error` set when the item could not be annotated: that row
handling, apart from the model, is `pipeline.actor_rows.annotate_rows`, which this actor calls with its model.

The actor is built from one `AnnotatorSpec` (pipeline/annotator_spec.py): Ray pickles it to every actor of the
pool, so it holds the loaded tasks themselves, never paths to load again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from media.decode import DecodeConfig, frames_to_uint8, normalization, resize_transform
from media.isolation import IsolatedDecoder
from media.normalize import normalize
from pipeline.actor_rows import annotate_rows
from pipeline.annotator_spec import AnnotatorSpec
from pipeline.encode import pick_device, visual_tensor
from pipeline.task import Task

if TYPE_CHECKING:  # the model library is loaded in the actor, not where this module is imported
    from flamingo import FewShotPrefix

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
        return annotate_rows(batch, [p.task for p in self.tasks], self.spec.model,
                             lambda index, rows: self._annotate(self.tasks[index], rows))

    def _annotate(self, prepared: _PreparedTask, rows: list[dict]) -> list[dict]:
        """The model's results for `rows` (items with visual tokens), in their order."""
        model, task = self.model, prepared.task
        visual = torch.stack([visual_tensor(r["visual"], r["visual_shape"], r["visual_dtype"]) for r in rows])
        visual = visual[:, None].to(self.device, model.dtype)                        # (B, 1, n, D)
        query = prepared.query_ids.expand(len(rows), -1)
        if task.kind == "classify":
            return self._classify(prepared, query, visual)
        return self._generate(prepared, query, visual)

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
