"""The example task files scored on held-out scenes of the synthetic world, as the annotation pipeline runs them.

Here, above both, because it needs the pipeline's task files and demonstration decoding (pipeline.task,
pipeline.generate) and the evaluation's world and scores (training.evaluate), and neither of those packages
imports the other. `flamingo-annotate eval` passes `score_task` to `training.evaluate.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flamingo import Flamingo
from flamingo.calibration import calibrate, label_prior
from media.decode import DecodeConfig
from pipeline.generate import load_demonstration_pixels
from pipeline.task import load_task, load_tasks
from training.evaluate import EvalConfig, caption_task_scores, classify_task_scores, task_scenes, task_truth
from training.sequences import image_transform


def task_path(path: str | Path) -> Path:
    """A task file as given, or else the repository's own (`jobs/tasks/count.yaml` from any directory)."""
    if not Path(path).is_absolute() and not Path(path).exists():
        return Path(__file__).resolve().parents[1] / path
    return Path(path)


def check_task_files(paths: list[str] | tuple[str, ...]) -> None:
    """Raise pipeline.task.TaskError for any problem in the task files, before the model is loaded: each
    task's scores are kept under its `name:`, so two files with one name are refused too."""
    load_tasks([task_path(path) for path in paths], check_remote_media=False)


def score_task(model: Flamingo, path: str | Path, task_index: int, config: EvalConfig
               ) -> tuple[str, dict[str, Any]]:
    """Run one task file on its held-out scenes (`training.evaluate.task_scenes`, drawn for the task's
    `name:` and its place `task_index` in `config.tasks`) as the annotation pipeline does
    (pipeline.generate.Annotator: the demonstrations as a few-shot prefix, the query after each item's
    `<image>`, labels scored with their end-of-chunk, calibrated when the task says `calibrate: true`) and
    score the answers against the scenes' truth. Classify tasks are scored against
    `training.evaluate.task_truth` (count, has_red, binding), per class; generate tasks (caption.yaml) as
    captions."""
    task = load_task(task_path(path), check_remote_media=False)
    scenes = task_scenes(config, task_index, task.name)
    decode = DecodeConfig.for_model(model.config)
    with torch.inference_mode():
        prefix_ids, _ = model.tokenize([task.prefix_text()])
        demos = load_demonstration_pixels(task, decode, {}) if task.demonstrations else None
        prefix = model.prepare_prefix(prefix_ids, vision_x=None if demos is None else demos.to(model.device))
        query_ids, _ = model.tokenize([task.query_text()])
        transform = image_transform(model)
        candidates = [model.tokenizer.encode(c, add_special_tokens=False) for c in task.candidates()]
        prior = None        # `calibrate: true`: the labels' content-free prior, measured once as the pipeline does
        if task.kind == "classify" and task.calibrate:
            prior = label_prior(model, query_ids, candidates, prefix, task.generation.length_normalize)
        outputs: list[str] = []
        for start in range(0, len(scenes), config.batch_size):
            batch = scenes[start:start + config.batch_size]
            pixels = torch.stack([transform(Image.fromarray(s.image()))[None] for s in batch])[:, None]
            visual = model.encode_vision(pixels.to(model.device, model.dtype))
            query = query_ids.expand(len(batch), -1)
            if task.kind == "classify":
                scores = model.score(query, candidates, visual_tokens=visual, prefix=prefix,
                                     length_normalize=task.generation.length_normalize)
                if prior is not None:
                    scores = calibrate(scores, prior)
                labels = [label.strip() for label in task.labels]
                outputs += [labels[int(np.argmax(row))] for row in scores.tolist()]
            else:
                g = task.generation
                out = model.generate(lang_x=query, visual_tokens=visual, prefix=prefix, max_new_tokens=g.max_new_tokens,
                                     num_beams=g.num_beams, do_sample=False, return_dict=True)
                outputs += model.decode(out.new_tokens)
    if task.kind == "generate":
        return task.name, caption_task_scores(scenes, outputs)
    truths = [task_truth(task.name, scene) for scene in scenes]
    if None in truths:
        raise ValueError(f"{path}: task {task.name!r} has no truth in the synthetic world "
                         "(the example tasks count, has_red and binding have)")
    return task.name, classify_task_scores([t for t in truths if t is not None], outputs,
                                           [label.strip() for label in task.labels])
