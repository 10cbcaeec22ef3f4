"""Running a bridge-training job: `train(config)` on Ray Train (`TorchTrainer`), `train_local(config)` in
this process. Both run the same loop (`BridgeTrainer`) on the same batches, resume from the latest
checkpoint of the run, and end by writing the model with `Flamingo.save_pretrained`.

Where checkpoints live:
  train_local  `<checkpoint_dir>/step_XXXXXXXX/` plus `<checkpoint_dir>/metrics.jsonl` (one line per step);
  train        Ray Train's storage, `<checkpoint_dir>/<run_name>/`: running the same run name again
               resumes from its latest reported checkpoint (Ray Train's own restoration).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import flamingo
from flamingo.model import Flamingo
from training.bridges import BridgeTrainer, OptimSettings, checkpoint_name, latest_checkpoint, reset_attention_queries
from training.config import TrainConfig
from training.sequences import TrainingBatches

if TYPE_CHECKING:
    import ray.train

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class LocalResult:
    metrics: list[dict[str, float]]     # one entry per step trained in this call
    checkpoint: Path | None             # the last checkpoint written
    model_dir: Path


def build(config: TrainConfig, device: torch.device | str = "cpu") -> tuple[Flamingo, BridgeTrainer, TrainingBatches]:
    """Model (backbones frozen by `Flamingo` itself), its trainer and its data, seeded from the config."""
    torch.manual_seed(config.seed)
    model = flamingo.load_model(config.model, device=device)
    if config.reset_queries:
        reset_attention_queries(model)
    trainer = BridgeTrainer(model, OptimSettings.from_config(config))
    return model, trainer, TrainingBatches(model, config.data, config.batch_size, config.seed)


def train_local(config: TrainConfig, on_step: Callable[[dict[str, float]], None] | None = None) -> LocalResult:
    """Train in this process (tests, notebooks, a single machine without Ray)."""
    model, trainer, data = build(config)
    root = Path(config.checkpoint_dir)
    resume = latest_checkpoint(root)
    if resume is not None:
        trainer.load_checkpoint(resume)
    log = MetricsLog(root / METRICS_FILE, resumed_at=trainer.step)
    history, last = [], resume
    for metrics in trainer.run(data.batch, config.steps):
        history.append(metrics)
        log.write(metrics)
        _print_progress(metrics, config)
        if on_step is not None:
            on_step(metrics)
        if _is_checkpoint_step(int(metrics["step"]), config):
            last = trainer.save_checkpoint(root / checkpoint_name(int(metrics["step"])))
    model.save_pretrained(config.output_dir)
    return LocalResult(history, last, Path(config.output_dir))


def train(config: TrainConfig) -> ray.train.Result:
    """Train on Ray Train (one `TorchTrainer` worker by default); returns its `ray.train.Result`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = config.checkpoint_dir if "://" in config.checkpoint_dir else str(Path(config.checkpoint_dir).resolve())
    config = _with_local_paths_resolved(config)
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={"config": config.to_dict()},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=config.run_name, storage_path=storage),
    )
    return trainer.fit()


def _ray_worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: resume from Ray's latest checkpoint, train, report, save the model (rank 0)."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["config"], source="train_loop_config")
    rank = ray.train.get_context().get_world_rank()
    model, trainer, data = build(config, ray.train.torch.get_device())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory)
    for metrics in trainer.run(lambda index: data.batch(index, stream=rank), config.steps):
        step = int(metrics["step"])
        if rank == 0:
            _print_progress(metrics, config)
        if _is_checkpoint_step(step, config):
            with tempfile.TemporaryDirectory() as scratch:
                saved = trainer.save_checkpoint(Path(scratch, "checkpoint")) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(saved) if saved else None,
                                 checkpoint_dir_name=checkpoint_name(step))
        elif step % config.log_every == 0:
            ray.train.report(metrics)
    if rank == 0:
        model.save_pretrained(config.output_dir)


class MetricsLog:
    """Per-step metrics as JSON lines; on resume, lines past the resumed step (written after the
    checkpoint by the interrupted run) are dropped so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, resumed_at: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_at]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, metrics: dict[str, float]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(metrics) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _is_checkpoint_step(step: int, config: TrainConfig) -> bool:
    return step % config.checkpoint_every == 0 or step == config.steps


def _print_progress(metrics: dict[str, float], config: TrainConfig) -> None:
    if metrics["step"] % config.log_every == 0 or metrics["step"] == config.steps:
        print(f"step {metrics['step']:>6}/{config.steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
              f"grad_norm {metrics['grad_norm']:.3f}", flush=True)


def _with_local_paths_resolved(config: TrainConfig) -> TrainConfig:
    """Workers run in their own working directory: make relative local paths absolute first."""
    output_dir = config.output_dir if "://" in config.output_dir else str(Path(config.output_dir).resolve())
    model = str(Path(config.model).resolve()) if Path(config.model).is_dir() else config.model
    return replace(config, output_dir=output_dir, model=model)
