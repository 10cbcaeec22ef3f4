"""Contextual calibration of closed-ended answers (Zhao et al., 2021, "Calibrate Before Use").

A few-shot prompt biases the model towards some labels whatever the item shows: the label of the last
demonstration, or the one the demonstrations name most often. The paper measures that bias as the label
distribution the prompt gives to *content-free* inputs, p_cf, and divides it out of every item's distribution:
q = normalise(p / p_cf) (its W = diag(p_cf)^-1, b = 0), the answer being argmax q.

Here the input is an image, so the content-free inputs are images without content, each placed where the item's
`<image>` goes, with the task's prompt unchanged:
  - the mean image: every pixel at the normalisation mean (all zeros once normalised), through the vision tower,
  - zero visual tokens: the gated cross-attention blocks attend to all-zero keys/values (the "N/A" of an image).
p_cf is the mean of their label distributions, as in the paper.

A label's distribution is the softmax over the labels of the scores the task ranks them by (`Flamingo.score`:
total, or with `length_normalize` mean, token log-likelihood), so argmax p is the uncalibrated answer. Everything
is done in log space: log q = log_softmax(scores - log p_cf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generation import FewShotPrefix
    from .model import Flamingo

# The content-free inputs, in the order `content_free_visual_tokens` stacks them.
CONTENT_FREE_INPUTS = ("mean image", "zero visual tokens")


def content_free_visual_tokens(model: Flamingo) -> torch.Tensor:
    """(len(CONTENT_FREE_INPUTS), 1, num_latents, D) visual tokens, one media per input, as items have."""
    size = model.config.image_size
    if size is None:
        raise ValueError("the model's config names no image size; load the model with flamingo.load_model")
    mean_image = torch.zeros(1, 1, 1, 3, size, size, device=model.device, dtype=model.dtype)  # normalised mean
    with torch.inference_mode():
        mean_tokens = model.encode_vision(mean_image)                                  # (1, 1, n, D)
    return torch.cat([mean_tokens, torch.zeros_like(mean_tokens)])


def label_prior(model: Flamingo, query_ids: torch.Tensor, candidates: list[list[int]],
                prefix: FewShotPrefix | None = None, length_normalize: bool = False) -> torch.Tensor:
    """p_cf (K,): the mean over the content-free inputs of the label distribution the prompt gives them.

    `query_ids` (1, Lq), `candidates`, `prefix` and `length_normalize` as the task's items are scored."""
    visual = content_free_visual_tokens(model)
    query = query_ids.expand(visual.shape[0], -1)
    scores = model.score(query, candidates, visual_tokens=visual, prefix=prefix, length_normalize=length_normalize)
    return scores.float().softmax(-1).mean(0)


def calibrate(scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """log q (B, K): the calibrated log-probabilities of the labels, from their scores (B, K) and p_cf (K,).

    q = normalise(softmax(scores) / p_cf); each row's exp sums to 1 over the labels."""
    # a label the content-free inputs never give (underflow) is not divided by zero
    log_prior = prior.to(scores.device).float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return (scores.float() - log_prior).log_softmax(-1)
