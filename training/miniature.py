"""The miniature Flamingo: the stage-1 vision tower and the stage-2 LM joined by fresh bridges, saved in
the project's format so stage 3 can start from it (`model: <out_dir>` in a `jobs/train_configs` YAML).

The gates start closed (tanh(0) = 0, as in the paper), so before stage 3 the model answers exactly like
its pretrained LM.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from flamingo.model import Flamingo
from training.pretrain_lm import load_lm
from training.pretrain_vision import load_vision

# Bridges sized for 128-wide backbones (the tiny-random preset's, scaled up a little).
BRIDGES: dict[str, Any] = {"num_latents": 16, "resampler_depth": 2, "resampler_heads": 4, "resampler_dim_head": 32,
                           "xattn_heads": 4, "xattn_dim_head": 32, "ff_mult": 2, "max_num_frames": 8}


def build_miniature(vision_dir: str | Path, lm_dir: str | Path, out_dir: str | Path,
                    cross_attn_every_n_layers: int = 1, seed: int = 0, **bridge_overrides: Any) -> Path:
    """Wrap the two pretrained backbones with `Flamingo.from_backbones` (bridges seeded by `seed`) and
    `save_pretrained` the result to `out_dir`, which `flamingo.load_model` then reads offline."""
    clip, clip_config = load_vision(vision_dir)
    lm, tokenizer = load_lm(lm_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flamingo.from_backbones(clip, lm, tokenizer, cross_attn_every_n_layers,
                                        **{**BRIDGES, **bridge_overrides})
    # Where the backbones came from: a custom open_clip tower rebuilt from its config, an LM from its
    # config (save_pretrained fills in lang_encoder_config and the tokenizer folder).
    model.config = dataclasses.replace(model.config, vision_encoder="custom", vision_encoder_pretrained=None,
                                       vision_encoder_config=clip_config, lang_encoder="")
    model.save_pretrained(out_dir)
    return Path(out_dir)
