"""Config in, model out: `build` is the one way a `FlamingoConfig` becomes a `Flamingo`, for presets, saved
models, OpenFlamingo's factory and the training recipe alike."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backbones import build_lang_encoder, build_tokenizer, build_vision_encoder
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE
from .config import FlamingoConfig
from .guards import UntrustedCodeError, check_fits, refuse_untrusted_code
from .model import Flamingo


def build(config: FlamingoConfig, seed: int = 0, *, vision_encoder: nn.Module | None = None,
          lang_encoder: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
          trust_remote_code: bool = False, max_bytes: float | None = None, name: str | None = None) -> Flamingo:
    """Make the backbones the config names, add Flamingo's tokens and wrap them (`Flamingo(...)`).

    Backbones passed in (already trained ones, or a tokenizer saved beside the weights) are used as they are,
    in place of the ones the config names; they must be what the config describes. Everything random (random
    backbones, the new bridges, new embedding rows) is drawn from `seed` without touching the global RNG.

    `trust_remote_code=True` lets transformers run the LM's or tokenizer's own code; only the caller can
    allow it (a config with `trust_remote_code` set merely says the model needs it, and is refused without).
    Before anything is allocated, the parts to be made are sized on the meta device and refused if they need
    more than `max_bytes` (None: the memory available now; `math.inf`: no check). `name` is the model's name
    in those errors."""
    name = name or config.lang_encoder or "the model"
    if config.trust_remote_code and not trust_remote_code:
        raise UntrustedCodeError(f"{name} needs its LM's own code ({config.lang_encoder or 'lang_encoder_config'}); "
                                 "pass trust_remote_code=True if you trust it")
    with torch.random.fork_rng(devices=[]):
        check_fits(config, name=name, trust_remote_code=trust_remote_code, max_bytes=max_bytes,
                   vision_encoder=vision_encoder, lang_encoder=lang_encoder)
        torch.manual_seed(seed)
        if vision_encoder is None:
            vision_encoder = build_vision_encoder(config.vision_encoder, config.vision_encoder_pretrained,
                                                  config.vision_encoder_config)
        if lang_encoder is None:
            lang_encoder = build_lang_encoder(config.lang_encoder, config.lang_encoder_config, trust_remote_code)
        if tokenizer is None:
            tokenizer = build_tokenizer(config.tokenizer or config.lang_encoder, trust_remote_code)
        return Flamingo(vision_encoder, lang_encoder, tokenizer, config)


def checked_saved_config(path: Path, *, trust_remote_code: bool = False) -> tuple[FlamingoConfig, Path | None]:
    """A saved folder's config and tokenizer folder, after the checks that need no building: the folder
    describes its LM itself, and asks to run no code of its own unless the caller allows it."""
    config = FlamingoConfig.load(path / CONFIG_FILE)
    if config.lang_encoder_config is None:
        raise ValueError(f"{path / CONFIG_FILE} has no lang_encoder_config: a saved model describes its LM "
                         f"itself, and this one would load {config.lang_encoder!r} from elsewhere")
    tokenizer_dir = path / config.tokenizer if config.tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        tokenizer_dir = None
    if not trust_remote_code:
        refuse_untrusted_code(path, config, tokenizer_dir)
    return config, tokenizer_dir


def load_pretrained(path: str | Path, device: str | torch.device | None = None, *, trust_remote_code: bool = False,
                    max_bytes: float | None = None) -> Flamingo:
    """A model saved with `save_pretrained` (safetensors + JSON, no pickles): built from its config with the
    tokenizer saved beside it, then given its weights.

    A folder is data, not code: one whose files ask to run code of their own is refused unless the caller
    passes `trust_remote_code=True` (see `flamingo.guards`). It must describe its LM itself
    (lang_encoder_config, as save_pretrained writes), so loading it never fetches another model. The model
    and the weights file, which is read whole, must fit in `max_bytes` (None: the memory available now)."""
    path = Path(path)
    config, tokenizer_dir = checked_saved_config(path, trust_remote_code=trust_remote_code)
    # The weights come from the file: no pretrained tower to download (save_pretrained writes None there).
    config = replace(config, vision_encoder_pretrained=None)
    weights = path / WEIGHTS_FILE
    check_fits(config, name=str(path), trust_remote_code=trust_remote_code, max_bytes=max_bytes,
               also={WEIGHTS_FILE: weights.stat().st_size if weights.is_file() else 0})
    tokenizer = build_tokenizer(str(tokenizer_dir) if tokenizer_dir else config.tokenizer or config.lang_encoder,
                                trust_remote_code)
    # Sized above, with the weights file.
    model = build(config, tokenizer=tokenizer, trust_remote_code=trust_remote_code, max_bytes=math.inf)
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device or "cpu"))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
