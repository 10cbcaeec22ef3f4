"""Models by name: presets (built, and given their released weights), saved folders and bundled models
(`load_model`), and OpenFlamingo's `create_model_and_transforms`. All of them go through `builder.build`."""

from __future__ import annotations

import dataclasses

import open_clip
import torch

from .builder import build, checked_saved_config, load_pretrained
from .config import FlamingoConfig
from .dtypes import resolve_dtype
from .guards import UntrustedCodeError, check_fits
from .model import Flamingo
from .presets import PRESETS, bundled_models, from_name, is_preset, saved_folder
from .vision import tower_normalisation


def from_preset(name: str, seed: int = 0, load_checkpoint: bool = True, trust_remote_code: bool = False,
                max_bytes: float | None = None, **config_fields) -> Flamingo:
    """Build a preset (`config_fields` change its config). Released models download their backbones and
    checkpoint from the hub; random presets are built from their configs, seeded, without touching the
    global RNG. Presets whose LM ships its own code need `trust_remote_code=True`; a model larger than
    `max_bytes` (None: the memory available now) is refused before anything is allocated."""
    config = dataclasses.replace(from_name(name), **config_fields)
    _refuse_preset_code(name, config, trust_remote_code)
    model = build(config, seed, trust_remote_code=trust_remote_code, max_bytes=max_bytes, name=name)
    if config.openflamingo_checkpoint and load_checkpoint:
        model.load_openflamingo_checkpoint(config.openflamingo_checkpoint)
    return model


def _refuse_preset_code(name: str, config: FlamingoConfig, trust_remote_code: bool) -> None:
    if config.trust_remote_code and not trust_remote_code:
        raise UntrustedCodeError(f"{name} needs its LM's own code from the hub ({config.lang_encoder}); pass "
                                 "trust_remote_code=True if you trust it")


def check_model(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Raise what `load_model` would raise for the name itself -- unknown, or code it may not run -- without
    building or downloading anything. A job's driver calls it before any worker starts, so such a model is
    one line of error rather than a failure in every actor. (Whether the model fits in memory is for the
    machine that builds it to say: `load_model` checks that there.)"""
    folder = saved_folder(name_or_path)
    if folder is not None:
        checked_saved_config(folder, trust_remote_code=trust_remote_code)
    elif is_preset(name_or_path):
        _refuse_preset_code(name_or_path, from_name(name_or_path), trust_remote_code)
    else:
        raise ValueError(_unknown_model(name_or_path))


def _unknown_model(name_or_path: str) -> str:
    return (f"{name_or_path!r} is neither a saved model folder, a bundled model ({', '.join(bundled_models())}) "
            f"nor a preset ({', '.join(sorted(PRESETS))})")


def load_model(name_or_path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False, max_bytes: float | None = None) -> Flamingo:
    """The one way the pipeline gets a model: a `save_pretrained` folder, a bundled model's name
    ('miniature'), or a preset name or hub id.

    No code that comes with a model runs unless the caller passes `trust_remote_code=True`: a folder that
    asks for it is refused (`flamingo.guards.UntrustedCodeError`), whatever its config says. A model that
    would need more than `max_bytes` to build (None: the memory available now, in the dtype it is built in,
    float32 unless its LM config says otherwise) is refused before allocation (`ModelTooLargeError`).

    `dtype` is a torch dtype or a name of `flamingo.dtypes.DTYPES` (`auto`: `resolve_dtype` for `device`);
    None keeps the dtype the model was built in."""
    folder = saved_folder(name_or_path)
    if folder is not None:
        model = load_pretrained(folder, trust_remote_code=trust_remote_code, max_bytes=max_bytes)
    elif is_preset(name_or_path):
        model = from_preset(name_or_path, trust_remote_code=trust_remote_code, max_bytes=max_bytes)
    else:
        raise ValueError(_unknown_model(name_or_path))
    return model.to(device=device, dtype=None if dtype is None else resolve_dtype(dtype, device))


def create_model_and_transforms(clip_vision_encoder_path: str, clip_vision_encoder_pretrained: str | None,
                                lang_encoder_path: str, tokenizer_path: str, cross_attn_every_n_layers: int = 1,
                                decoder_layers_attr_name: str | None = None, trust_remote_code: bool = False,
                                max_bytes: float | None = None, **flamingo_kwargs):
    """OpenFlamingo's factory, same arguments and return: (model, image_processor, tokenizer). Other
    `FlamingoConfig` fields (bridge sizes) may be passed as keywords. `trust_remote_code` lets the LM and
    tokenizer run their own code (MPT-1B needs it); `max_bytes` as in `load_model`."""
    known = {f.name for f in dataclasses.fields(FlamingoConfig)}
    unknown = sorted(set(flamingo_kwargs) - known)
    if unknown:
        raise TypeError(f"unknown arguments: {', '.join(unknown)}")
    config = FlamingoConfig(
        vision_encoder=clip_vision_encoder_path, vision_encoder_pretrained=clip_vision_encoder_pretrained,
        lang_encoder=lang_encoder_path, tokenizer=tokenizer_path, trust_remote_code=trust_remote_code,
        cross_attn_every_n_layers=cross_attn_every_n_layers, decoder_layers_attr_name=decoder_layers_attr_name,
        **flamingo_kwargs,
    )
    # Sized before the tower is made too (build then checks the rest against what is left).
    check_fits(config, name=lang_encoder_path, trust_remote_code=trust_remote_code, max_bytes=max_bytes)
    # The tower first: its image processor and pixel statistics are open_clip's for this name and tag.
    clip, _, image_processor = open_clip.create_model_and_transforms(
        clip_vision_encoder_path, pretrained=clip_vision_encoder_pretrained)
    config = dataclasses.replace(config, **{**tower_normalisation(clip.visual), **flamingo_kwargs})
    model = build(config, vision_encoder=clip, trust_remote_code=trust_remote_code, max_bytes=max_bytes,
                  name=lang_encoder_path)
    return model, image_processor, model.tokenizer
