"""The optimisation recipe every stage shares: AdamW (no decay on gates, norms and biases), linear
warm-up then cosine decay, and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio` at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def adamw_warmup_cosine(params: Iterable[nn.Parameter], lr: float, weight_decay: float, warmup_steps: int,
                        total_steps: int, min_lr_ratio: float, fast: Iterable[nn.Parameter] = (),
                        fast_lr_scale: float = 1.0
                        ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with warm-up + cosine; parameters in `fast` (undecayed) learn at `lr * fast_lr_scale`."""
    fast_ids = {id(p) for p in fast}
    params = [p for p in params if id(p) not in fast_ids]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if fast_ids:
        groups.append({"params": list(fast), "weight_decay": 0.0, "lr": lr * fast_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))
    return optimizer, scheduler


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping); returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"))


def check_optimisation(config) -> None:
    """The checks every stage's config needs on its optimisation fields (lr, weight_decay, warmup_steps,
    max_grad_norm, min_lr_ratio)."""
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup_steps < 0 or config.max_grad_norm < 0:
        raise ValueError("lr must be positive; weight_decay, warmup_steps and max_grad_norm >= 0")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio: must be in [0, 1], got {config.min_lr_ratio}")
