"""The whole recipe of the bundled miniature model, as one seeded run from a YAML file
(`jobs/train_configs/miniature.yaml`):

  stage 1  contrastive pretraining of a small open_clip vision tower      -> <out_dir>/vision
  stage 2  a BPE tokenizer and a small Llama pretrained on the world's text  -> <out_dir>/lm
  join     both frozen, fresh bridges, gates closed                        -> <out_dir>/miniature
  stage 3  only the bridges train, on interleaved episodes (Ray Train or local) -> <out_dir>/model
  eval     the held-out table of `training.evaluate`                         -> <out_dir>/model/eval.json

A stage whose output folder is complete is skipped, and stage 3 resumes from its latest checkpoint, so
an interrupted recipe continues where it stopped. Each stage's wall time goes to <out_dir>/recipe.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import TrainConfig, build_dataclass, load_dataclass
from training.evaluate import EvalConfig
from training.miniature import BridgeSizes
from training.pretrain_lm import LMPretrainConfig
from training.pretrain_vision import VisionPretrainConfig

RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class RecipeConfig:
    out_dir: str
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    lm: LMPretrainConfig = field(default_factory=LMPretrainConfig)
    bridges: BridgeSizes = field(default_factory=BridgeSizes)
    # Phases of stage 3, in order: each a `flamingo-annotate train` config less its paths, starting
    # from the previous phase's model (a curriculum: e.g. one-object captions first).
    stage3: list = field(default_factory=lambda: [{}])
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.train_configs()        # stage 3's own checks (TrainConfig.__post_init__), before any work

    @property
    def paths(self) -> dict[str, Path]:
        root = Path(self.out_dir)
        return {name: root / name for name in ("vision", "lm", "miniature", "stage3", "model")}

    def train_configs(self) -> list[TrainConfig]:
        """Stage 3's phases as the `TrainConfig`s `flamingo-annotate train` would read; the recipe sets
        the paths: phase i trains from phase i-1's model, and the last phase writes <out_dir>/model."""
        if not self.stage3:
            raise ValueError("stage3: list at least one phase")
        configs, start = [], str(self.paths["miniature"])
        for i, phase in enumerate(self.stage3):
            where = self.paths["stage3"] / f"phase{i + 1}"
            last = i == len(self.stage3) - 1
            paths = {"model": start, "checkpoint_dir": str(where),
                     "run_name": f"recipe-{Path(self.out_dir).name}-{i + 1}",
                     "output_dir": str(self.paths["model"] if last else where / "model")}
            if not isinstance(phase, dict):
                raise TypeError(f"stage3[{i}]: expected a mapping, got {type(phase).__name__}")
            taken = sorted(set(paths) & set(phase))
            if taken:
                raise ValueError(f"stage3[{i}].{taken[0]}: set by the recipe (from out_dir); leave it out")
            configs.append(build_dataclass(TrainConfig, {**phase, **paths}, f"stage3[{i}]."))
            start = configs[-1].output_dir
        return configs


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read a recipe YAML; errors read '<file>: field: problem'."""
    return load_dataclass(path, RecipeConfig)


def run_recipe(config: RecipeConfig, local: bool = False, log_every: int = 100) -> Path:
    """Run every stage not yet done; returns the trained model's folder."""
    from flamingo import load_model
    from training import pretrain_lm, pretrain_vision
    from training.evaluate import evaluate
    from training.miniature import build_miniature
    from training.train import train, train_local

    paths = config.paths
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    record = _read_record(Path(config.out_dir))
    record["config"] = _as_json(config)

    def stage(name: str, done: bool, work) -> None:
        if done:
            print(f"== {name}: already done, skipping", flush=True)
            return
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        result = work()
        record.setdefault("stages", {})[name] = {"seconds": round(time.perf_counter() - start, 1), **(result or {})}
        _write_record(Path(config.out_dir), record)

    def vision() -> dict[str, float]:
        tower = pretrain_vision.pretrain_vision(config.vision, log_every=log_every)
        accuracy = pretrain_vision.retrieval_accuracy(tower, config.vision)
        print(f"held-out image->caption top-1 among 16: {accuracy:.2f} (chance 0.06)", flush=True)
        pretrain_vision.save_vision(tower, config.vision, paths["vision"])
        return {"retrieval_top1": accuracy}

    def lm() -> dict[str, Any]:
        model, tokenizer = pretrain_lm.pretrain_lm(config.lm, log_every=log_every)
        ppl = pretrain_lm.perplexity(model, tokenizer, pretrain_lm.held_out_texts(config.lm))
        binding = pretrain_lm.binding_accuracy(model, tokenizer, config.lm)
        binding_wide = pretrain_lm.binding_accuracy(model, tokenizer, config.lm, words="wide")
        answers = pretrain_lm.answered_accuracy(model, tokenizer, config.lm)
        print(f"held-out perplexity: {ppl:.2f}; binding in text: {binding:.2f}, with the evaluation's wide words "
              f"{binding_wide:.2f} (chance about 0.42); questions about 2-3 objects answered from their caption in "
              f"text: {answers['all']:.2f}", flush=True)
        pretrain_lm.save_lm(model, tokenizer, paths["lm"])
        return {"perplexity": ppl, "text_binding": binding, "text_binding_wide": binding_wide,
                "text_answers": answers}

    def bridges_and_eval() -> dict[str, Any]:
        for i, settings in enumerate(config.train_configs()):
            print(f"-- phase {i + 1}: {settings.steps} steps", flush=True)
            if (Path(settings.output_dir) / "config.json").is_file():
                continue    # a finished phase of an interrupted recipe
            train_local(settings) if local else train(settings)
        report = evaluate(load_model(str(paths["model"])), config.eval)
        report.save(paths["model"] / "eval.json")
        print(report.table(), flush=True)
        return {}

    stage("stage 1: vision tower", (paths["vision"] / pretrain_vision.WEIGHTS_FILE).is_file(), vision)
    stage("stage 2: language model", (paths["lm"] / "config.json").is_file(), lm)
    stage("join: bridges on frozen backbones", (paths["miniature"] / "config.json").is_file(),
          lambda: build_miniature(paths["vision"], paths["lm"], paths["miniature"], config.bridges,
                                  config.train_configs()[0].seed)
          and None)
    stage("stage 3: bridges, then evaluation", (paths["model"] / "eval.json").is_file(), bridges_and_eval)
    return paths["model"]


def _as_json(config: RecipeConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _read_record(root: Path) -> dict[str, Any]:
    path = root / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(root: Path, record: dict[str, Any]) -> None:
    (root / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
