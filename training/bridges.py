"""The training core for Flamingo's bridges (resampler, gated blocks, added token rows), plain PyTorch so
the same code runs in a test, a script or a Ray Train worker.

Only parameters with `requires_grad` reach the optimizer: the backbones stay frozen bit for bit, and a
checkpoint holds just the bridges plus what resuming needs (optimizer moments, schedule, step, RNG), as
safetensors + JSON, never a pickle. Batches come from a function of the micro-batch index, so resuming
from step s replays exactly what an uninterrupted run does after step s.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from flamingo.model import Flamingo
from training.optim import adamw_warmup_cosine, clip_gradients
from training.sequences import Batch

PARAMS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class OptimSettings:
    """What the step needs from a run's config (`TrainConfig` has all of these fields)."""

    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    max_grad_norm: float
    grad_accum: int
    gate_lr_scale: float

    @classmethod
    def from_config(cls, config: Any) -> OptimSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def reset_attention_queries(model: Flamingo) -> None:
    """Re-draw every gated block's query projection with its layer's own initialiser. The block's output
    still goes through its trained gate, values and dense part, so the model keeps what it learnt to say
    about an image, while which visual tokens each text position reads is learnt anew."""
    for block in model.gated_cross_attn_layers():
        block.attn.to_q.reset_parameters()


class BridgeTrainer:
    """Optimizer, schedule and step counter around a Flamingo model whose bridges are trained."""

    def __init__(self, model: nn.Module, settings: OptimSettings):
        self.model = model
        self.settings = settings
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        gates = [p for name, p in self.params.items() if name.endswith(("attn_gate", "ff_gate"))]
        self.optimizer, self.scheduler = adamw_warmup_cosine(
            self.params.values(), settings.lr, settings.weight_decay, settings.warmup_steps, settings.steps,
            settings.min_lr_ratio, fast=gates, fast_lr_scale=settings.gate_lr_scale)
        self.step = 0

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _autocast(self):
        """bf16 autocast on CUDA only: CPU bf16 matmuls are slow and change the numbers for no gain."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation: the mean of their losses)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            with self._autocast():
                loss = self.model(**batch.to(self.device).model_inputs()).loss
            (loss / len(micro_batches)).backward()
            total += loss.item()
        _average_gradients_across_workers(self.params.values())
        grad_norm = clip_gradients(self.params.values(), self.settings.max_grad_norm)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": total / len(micro_batches), "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        """Loss on a batch without training (the model is returned to eval mode)."""
        self.model.eval()
        with self._autocast():
            return float(self.model(**batch.to(self.device).model_inputs()).loss)

    def run(self, batch_at: Callable[[int], Batch], until_step: int) -> Iterator[dict[str, float]]:
        """Train until `until_step`; micro-batch k of step s is `batch_at(s * grad_accum + k)`."""
        accum = self.settings.grad_accum
        while self.step < until_step:
            yield self.train_step([batch_at(self.step * accum + k) for k in range(accum)])

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write this step's resumable state to `directory` (replaced atomically if it exists)."""
        directory = Path(directory)
        temporary = directory.with_name(f".{directory.name}.partial")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        safetensors.torch.save_file({n: p.detach().contiguous() for n, p in self.params.items()},
                                    str(temporary / PARAMS_FILE))
        optimizer = self.optimizer.state_dict()
        tensors = {f"state.{index}.{key}": value for index, state in optimizer["state"].items()
                   for key, value in state.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        safetensors.torch.save_file(tensors, str(temporary / OPTIMIZER_FILE))
        state = {"step": self.step, "parameter_names": list(self.params),
                 "param_groups": optimizer["param_groups"], "scheduler": self.scheduler.state_dict()}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore parameters, optimizer, schedule, step and RNG from `save_checkpoint`'s output."""
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if state["parameter_names"] != list(self.params):
            raise ValueError(f"{directory} was saved for other trainable parameters than this model's")
        params = safetensors.torch.load_file(str(directory / PARAMS_FILE), device=str(self.device))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(params[name])
        tensors = safetensors.torch.load_file(str(directory / OPTIMIZER_FILE))
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        groups = [dict(g, betas=tuple(g["betas"])) for g in state["param_groups"]]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(tensors["rng.cpu"])
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The highest-step complete checkpoint directly under `root` (partial ones are hidden names)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def _average_gradients_across_workers(params) -> None:
    """Data parallelism without a DDP wrapper (which would rename every parameter): sum the bridges'
    gradients over workers and divide. A no-op in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:   # every worker must join every all_reduce, used or not
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)
