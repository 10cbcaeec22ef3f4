"""Config in, model out: `build` is the one way a `FlamingoConfig` becomes a `Flamingo`, for presets, saved
models, OpenFlamingo's factory and the training recipe alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .backbones import build_lang_encoder, build_tokenizer, build_vision_encoder
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE
from .config import FlamingoConfig
from .model import Flamingo


def build(config: FlamingoConfig, seed: int = 0, *, vision_encoder: nn.Module | None = None,
          lang_encoder: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> Flamingo:
    """Make the backbones the config names, add Flamingo's tokens and wrap them (`Flamingo(...)`).

    Backbones passed in (already trained ones, or a tokenizer saved beside the weights) are used as they are,
    in place of the ones the config names; they must be what the config describes. Everything random (random
    backbones, the new bridges, new embedding rows) is drawn from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if vision_encoder is None:
            vision_encoder = build_vision_encoder(config.vision_encoder, config.vision_encoder_pretrained,
                                                  config.vision_encoder_config)
        if lang_encoder is None:
            lang_encoder = build_lang_encoder(config.lang_encoder, config.lang_encoder_config,
                                              config.trust_remote_code)
        if tokenizer is None:
            tokenizer = build_tokenizer(config.tokenizer or config.lang_encoder, config.trust_remote_code)
        return Flamingo(vision_encoder, lang_encoder, tokenizer, config)


def load_pretrained(path: str | Path, device: str | torch.device | None = None) -> Flamingo:
    """A model saved with `save_pretrained` (safetensors + JSON, no pickles): built from its config with the
    tokenizer saved beside it, then given its weights."""
    path = Path(path)
    config = FlamingoConfig.load(path / CONFIG_FILE)
    tokenizer_dir = path / config.tokenizer
    tokenizer = build_tokenizer(str(tokenizer_dir) if tokenizer_dir.is_dir() else config.tokenizer,
                                config.trust_remote_code)
    # The weights come from the file: no pretrained tower to download (save_pretrained writes None there).
    model = build(replace(config, vision_encoder_pretrained=None), tokenizer=tokenizer)
    missing, unexpected = safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=False,
                                                       device=str(device or "cpu"))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
