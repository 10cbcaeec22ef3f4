"""One annotation job: read -> decode -> encode (vision actors) -> generate (LM actors) -> write.

`JobConfig` is everything a run needs, the tasks already loaded and validated (`pipeline.task.load_tasks`):
the commands build one and call `run_job`, which checks what else it can before Ray starts. Resume: items
already in the output for every task (same task name and file hash) are not read again; items done for only
some tasks are annotated for the others only, so a re-run never writes a duplicate row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from flamingo import DEFAULT_MODEL
from media.files import DEFAULT_MAX_ITEM_BYTES
from pipeline.task import Task


@dataclass
class StageResources:
    """Ray resources for one actor pool. Fractional CPUs by default: on small machines actors that
    claim whole cores starve the read tasks and the job stalls at 'backpressured'."""

    pool_size: int = 1
    batch_size: int = 16
    num_cpus: float = 0.5
    num_gpus: float = 0.0


def default_generation_resources() -> StageResources:
    """Decoding reads every weight once per step whatever the batch, so larger batches are nearly free
    per item (measured: 8 -> 64 items cut the CPU cost per item by about 3x)."""
    return StageResources(batch_size=64)


@dataclass
class JobSummary:
    items: int            # input items seen this run (resumed ones excluded)
    rows_ok: int
    rows_error: int
    skipped: int          # items already present in the output (resume)
    seconds: float
    output: str

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


@dataclass
class JobConfig:
    tasks: tuple[Task, ...]                  # loaded and validated; names unique
    input_uri: str
    output_uri: str
    model: str = DEFAULT_MODEL
    address: str | None = None               # None: start (and stop) a local Ray instance
    vision: StageResources = field(default_factory=StageResources)
    generation: StageResources = field(default_factory=default_generation_resources)
    num_frames: int | None = None            # video: frames per clip (overrides the task files)
    fps: float | None = None                 # video: sample at this rate instead of evenly
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES  # larger items become error rows, never OOM a worker
    storage_options: dict = field(default_factory=dict)  # fsspec options (endpoint_url, key, secret, ...)
    progress: bool = True
    device: str | None = None                # None: cuda when the actor got a GPU, else cpu


def video_sampling(tasks: Sequence[Task], config: JobConfig) -> tuple[int, float | None]:
    """(num_frames, fps) for video items. Items are decoded once for all tasks, so the tasks must
    agree, unless the job sets the frame count itself."""
    settings = {(t.video.num_frames, t.video.fps) for t in tasks}
    if len(settings) > 1 and config.num_frames is None:
        detail = ", ".join(f"{t.name}: num_frames={t.video.num_frames} fps={t.video.fps}" for t in tasks)
        raise ValueError(f"tasks sample videos differently ({detail}); make them agree or pass --num-frames")
    task_frames, task_fps = next(iter(settings)) if len(settings) == 1 else (None, None)
    num_frames = config.num_frames or task_frames
    if num_frames is None:
        raise ValueError("a job needs at least one task")
    return num_frames, config.fps if config.fps is not None else task_fps


def run_job(config: JobConfig) -> JobSummary:
    import ray

    from flamingo import image_preprocessing
    from media.decode import DecodeConfig
    from media.storage import resolve_storage_options
    from pipeline.decode import decode_items
    from pipeline.encode import VisionEncoder
    from pipeline.generate import Annotator, AnnotatorSpec
    from pipeline.read import read_items
    from pipeline.write import count_rows_since, existing_ids, write_rows

    start = time.perf_counter()
    tasks = config.tasks
    num_frames, fps = video_sampling(tasks, config)  # before any work
    image_size, mean, std = image_preprocessing(config.model)
    out_options = resolve_storage_options(config.output_uri, config.storage_options)
    done = {t.name: existing_ids(config.output_uri, t.name, task_hash=t.sha256, storage_options=out_options)
            for t in tasks}
    done_everywhere = set.intersection(*done.values()) if done else set()
    annotator = AnnotatorSpec(
        model=config.model, tasks=tuple(tasks), device=config.device,
        storage_options={t.name: resolve_storage_options(t.path, config.storage_options) for t in tasks},
        done={name: frozenset(ids - done_everywhere) for name, ids in done.items()})

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = config.progress
        read = read_items(config.input_uri, storage_options=config.storage_options,
                          max_item_bytes=config.max_item_bytes, skip_ids=done_everywhere)
        decode = DecodeConfig(image_size, mean, std, num_frames=num_frames, fps=fps)
        ds = decode_items(read.dataset, decode)
        ds = ds.map_batches(
            VisionEncoder, fn_constructor_kwargs={"model": config.model, "device": config.device},
            batch_format="pyarrow", batch_size=config.vision.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.vision.pool_size),
            num_cpus=config.vision.num_cpus, num_gpus=config.vision.num_gpus)
        ds = ds.map_batches(
            Annotator, fn_constructor_args=(annotator,),
            batch_format="pyarrow", batch_size=config.generation.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.generation.pool_size),
            num_cpus=config.generation.num_cpus, num_gpus=config.generation.num_gpus)
        # Streamed: files land as blocks finish, so a job killed midway keeps what it wrote (resume).
        written_from = datetime.now(timezone.utc)
        write_rows(ds, config.output_uri, storage_options=config.storage_options)
        total, rows_error = count_rows_since(config.output_uri, written_from, storage_options=out_options)
    finally:
        if started_ray:
            ray.shutdown()
    return JobSummary(items=total // max(len(tasks), 1), rows_ok=total - rows_error, rows_error=rows_error,
                      skipped=read.skipped, seconds=time.perf_counter() - start,
                      output=config.output_uri)
